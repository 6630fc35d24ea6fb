"""Observers and the scale formula (semantics.md sections 1 and 4) against hand-written references."""

import math

import numpy as np
import pytest
import torch

from hq_lightning.march import March
from hq_lightning.quantization.nonfinite import check_nonfinite
from hq_lightning.quantization.observer import (
    ClipObserver,
    FixedScaleObserver,
    KLObserver,
    MinMaxObserver,
    MixObserver,
    MovingAveragePerChannelMinMaxObserver,
    MovingAveragePerTensorMinMaxObserver,
    MSEObserver,
    PercentileObserver,
)
from hq_lightning.quantization.qparams import compute_scale

EPS32 = float(np.finfo(np.float32).eps)
QRANGE = {"qint8": (-128, 127), "qint16": (-32768, 32767)}


def ref_scale(amax: float, dtype: str, march: str) -> float:
    """semantics.md 1: max(amax, 0) / ((qmax - qmin) / 2) in float32, floored at eps; BERNOULLI snaps."""
    qmin, qmax = QRANGE[dtype]
    scale = np.float32(max(np.float32(amax), np.float32(0.0))) / np.float32((qmax - qmin) / 2)
    scale = max(float(np.float32(scale)), EPS32)
    if march == "bernoulli":
        shift = min(max(math.floor(-math.log2(scale)), 1), 14)
        scale = 2.0**-shift
    return scale


AMAXES = [0.0, 1e-30, EPS32, 1.0, 127.5, 127.5 * 2**-7, 3.0, 1e4, 123456.0] + [
    float(v) for v in torch.rand(20, generator=torch.Generator().manual_seed(0)) * 50
]


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("march", ["bayes", "bernoulli"])
def test_compute_scale_matches_reference(dtype, march):
    amax = torch.tensor(AMAXES, dtype=torch.float32)
    got = compute_scale(amax, dtype, march)
    expected = torch.tensor([ref_scale(a, dtype, march) for a in amax.tolist()], dtype=torch.float32)
    assert torch.equal(got, expected)


def test_scale_examples_from_the_spec():
    # int8 uses amax / 127.5, int16 amax / 32767.5
    assert compute_scale(torch.tensor([127.5]), "qint8", "bayes").item() == 1.0
    assert compute_scale(torch.tensor([32767.5]), "qint16", "bayes").item() == 1.0
    # zeros: floored at eps
    assert compute_scale(torch.tensor([0.0]), "qint8", "bayes").item() == EPS32
    # BERNOULLI: scale 1/127.5 -> floor(6.99) = 6 -> 2^-6; huge clamps at 2^-1, tiny at 2^-14
    assert compute_scale(torch.tensor([1.0]), "qint8", "bernoulli").item() == 2.0**-6
    assert compute_scale(torch.tensor([1e6]), "qint8", "bernoulli").item() == 0.5
    assert compute_scale(torch.tensor([0.0]), "qint8", "bernoulli").item() == 2.0**-14
    # exact power-of-two scale stays: amax = 127.5 * 2^-7 -> scale 2^-7
    assert compute_scale(torch.tensor([127.5 * 2**-7]), "qint8", "bernoulli").item() == 2.0**-7


def ref_ema(batches, c):
    """v <- v + c * (cur - v) in float32, first batch initialises."""
    lo = hi = None
    for b in batches:
        cur_lo, cur_hi = np.float32(b.min()), np.float32(b.max())
        if lo is None:
            lo, hi = cur_lo, cur_hi
        else:
            c32 = np.float32(c)
            lo = np.float32(lo + np.float32(c32 * np.float32(cur_lo - lo)))
            hi = np.float32(hi + np.float32(c32 * np.float32(cur_hi - hi)))
    return lo, hi


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAveragePerTensorMinMaxObserver])
@pytest.mark.parametrize("c", [0.0, 0.01, 0.5, 1.0])
def test_moving_average_per_tensor(cls, c):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 7, generator=g) * (i + 1) + i for i in range(4)]
    obs = cls(averaging_constant=c)
    assert not obs.initialized and obs.min_val.shape == (0,)
    for b in batches:
        assert obs(b) is b
    lo, hi = ref_ema([b.numpy() for b in batches], c)
    assert obs.min_val.item() == lo and obs.max_val.item() == hi
    assert obs.calculate_amax().item() == max(-lo, hi, 0.0)
    if c == 0.0:  # frozen after the first batch
        assert obs.min_val.item() == batches[0].min().item()
    if c == 1.0:  # current batch only
        assert obs.max_val.item() == batches[-1].max().item()
    scale, zero_point = obs.calculate_qparams("bayes")
    assert scale.item() == np.float32(ref_scale(max(-lo, hi, 0.0), "qint8", "bayes"))
    assert zero_point.dtype == torch.int32 and zero_point.item() == 0


def test_edge_inputs_zeros_and_single_value():
    obs = MinMaxObserver(averaging_constant=1.0)
    obs(torch.zeros(3, 3))
    assert obs.calculate_amax().item() == 0.0
    assert obs.calculate_qparams("bayes")[0].item() == EPS32
    obs(torch.tensor([-2.5]))  # one negative value: amax uses -min
    assert obs.calculate_amax().item() == 2.5
    obs(torch.tensor([4.0]))  # one positive value: min is positive, amax = max
    assert obs.calculate_amax().item() == 4.0


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_per_channel_different_ranges(c):
    scales = torch.tensor([1e-3, 1.0, 1e3, 7.0])
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 2, generator=g) * scales.view(4, 1, 1) for _ in range(3)]
    obs = MovingAveragePerChannelMinMaxObserver(ch_axis=0, averaging_constant=c)
    for b in batches:
        obs(b)
    for ch in range(4):
        lo, hi = ref_ema([b[ch].numpy() for b in batches], c)
        assert obs.min_val[ch].item() == lo and obs.max_val[ch].item() == hi
    amax = obs.calculate_amax()
    for march in ("bayes", "bernoulli"):
        expected = [ref_scale(a, "qint8", march) for a in amax.tolist()]
        assert torch.equal(obs.calculate_qparams(march)[0], torch.tensor(expected))


@pytest.mark.parametrize("ch_axis", [1, -1, 2])
def test_per_channel_axes(ch_axis):
    x = torch.randn(2, 3, 5)
    obs = MovingAveragePerChannelMinMaxObserver(ch_axis=ch_axis, averaging_constant=1.0)
    obs(x)
    axis = ch_axis % 3
    expected = x.abs().amax(dim=[d for d in range(3) if d != axis])
    assert torch.equal(obs.calculate_amax(), expected)


def test_per_channel_ch_axis_out_of_range():
    obs = MovingAveragePerChannelMinMaxObserver(ch_axis=3)
    with pytest.raises(ValueError, match=r"Expected `ch_axis` to be an int in \[-3, 3\)"):
        obs(torch.randn(2, 3, 4))


def test_per_channel_channel_count_change():
    obs = MovingAveragePerChannelMinMaxObserver(ch_axis=0)
    obs(torch.randn(3, 2))
    with pytest.raises(ValueError, match="Expected an input with 3 channels"):
        obs(torch.randn(4, 2))


ALL_OBSERVERS = [
    lambda: MinMaxObserver(),
    lambda: MovingAveragePerChannelMinMaxObserver(ch_axis=0),
    lambda: ClipObserver(),
    lambda: PercentileObserver(bins=64),
    lambda: MSEObserver(bins=64),
    lambda: KLObserver(bins=256),
    lambda: MixObserver(bins=64),
]


@pytest.mark.parametrize("make", ALL_OBSERVERS)
def test_nan_and_inf_batches_are_skipped_counted_and_reported(make):
    """No host read in the step: a non-finite batch leaves the statistics as they were and is
    reported by check_nonfinite (which convert_fx, set_fake_quantize and the callback call)."""
    obs = make()
    obs(torch.tensor([[1.0, -2.0], [0.0, 1.0]]))
    before = {name: buffer.clone() for name, buffer in obs.state_dict().items()}
    obs(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    assert all(torch.equal(before[name], buffer) for name, buffer in obs.state_dict().items())
    with pytest.raises(ValueError, match=r"Expected the input of \w+ \(the module given\) to be finite, but 1 batch\(es\) contained NaN"):
        check_nonfinite(obs)
    for bad in (float("inf"), float("-inf")):
        obs(torch.tensor([[1.0, bad], [0.0, 1.0]]))
    assert all(torch.equal(before[name], buffer) for name, buffer in obs.state_dict().items())
    with pytest.warns(UserWarning, match=r"2 batch\(es\) contained \+-inf"):
        assert check_nonfinite(obs, action="warn") == {"": (2, 0)}
    assert check_nonfinite(obs) == {}


def test_a_finite_batch_whose_range_overflows_is_not_skipped():
    """A per-channel batch whose max - min overflows float32 (the host's quick finite test) is
    still finite: the element test decides, and the batch counts."""
    obs = MovingAveragePerChannelMinMaxObserver(ch_axis=0, averaging_constant=1.0)
    obs(torch.tensor([[3e38, -3e38], [1.0, 2.0]]))
    assert torch.equal(obs.min_val, torch.tensor([-3e38, 1.0])) and torch.equal(obs.max_val, torch.tensor([3e38, 2.0]))
    assert check_nonfinite(obs) == {}


@pytest.mark.parametrize("per_channel", [False, True, "weight"])
def test_device_path_equals_the_host_path(per_channel, monkeypatch):
    """The tensor-only decision (CUDA, distributed: foreach updates; compiled: per-tensor ops) gives
    the same statistics and counts as the eager CPU one that reads two scalars. ``"weight"``: a
    conv weight per output channel, which compiled on the CPU reduces in channels-last order."""
    import hq_lightning.quantization.observer as observer_module

    g = torch.Generator().manual_seed(0)
    shape = (5, 3, 2, 3) if per_channel == "weight" else (3, 4)
    batches = [torch.randn(shape, generator=g) * (i + 1) for i in range(6)]
    batches[0].view(-1)[0] = float("nan")  # a non-finite first batch leaves the range at 0
    batches[3].view(-1)[6] = float("inf")
    batches[4].view(-1)[[7, 10]] = torch.tensor([-0.0, -40.0])  # -0.0 and a far outlier
    ch_axis = 0 if per_channel == "weight" else 1
    results = []
    for path in ("host", "device", "compiled"):  # compiled: per-tensor ops where eager uses foreach
        monkeypatch.setattr(observer_module, "_host_reads_are_free", lambda x, host=path == "host": host)
        obs = (MovingAveragePerChannelMinMaxObserver(ch_axis=ch_axis, averaging_constant=0.5) if per_channel
               else MovingAveragePerTensorMinMaxObserver(averaging_constant=0.5))
        obs(batches[0])
        observe = torch.compile(obs, fullgraph=True, backend="aot_eager") if path == "compiled" else obs
        for x in batches[1:]:
            observe(x)
        results.append((obs.min_val.clone(), obs.max_val.clone(), check_nonfinite(obs, action="ignore")))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])
        assert other[2] == {"": (2, 1)}
    assert results[0][2] == {"": (2, 1)}


@pytest.mark.parametrize("make", ALL_OBSERVERS)
def test_reading_range_before_data_is_a_clear_error(make):
    with pytest.raises(RuntimeError, match="to have observed data"):
        make().calculate_amax()


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating point tensor"):
        MinMaxObserver()(torch.arange(4))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="averaging_constant"):
        MinMaxObserver(averaging_constant=1.5)
    with pytest.raises(ValueError, match="Expected `sync`"):
        MinMaxObserver(sync="avg")
    with pytest.raises(ValueError, match="Expected `dtype`"):
        MinMaxObserver(dtype="int8")
    with pytest.raises(ValueError, match="Expected `scale`"):
        FixedScaleObserver(scale=0.0)
    with pytest.raises(ValueError, match="xmin"):
        ClipObserver(xmin=1.0, xmax=-1.0)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=0.0)


def test_clip_observer():
    obs = ClipObserver(xmin=-1.0, xmax=2.0, averaging_constant=1.0)
    obs(torch.tensor([-5.0, 0.5, 9.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 2.0)
    obs(torch.tensor([-0.25, 0.5]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-0.25, 0.5)


def test_fixed_scale_observer():
    obs = FixedScaleObserver(scale=1 / 128)
    assert obs(torch.randn(3)) is not None
    assert obs.calculate_qparams("bayes")[0].item() == 1 / 128
    assert FixedScaleObserver(scale=0.003).calculate_qparams("bayes")[0].item() == np.float32(0.003)
    # BERNOULLI snaps to a power of two with the same rule as observed scales
    assert FixedScaleObserver(scale=0.003).calculate_qparams(March.BERNOULLI)[0].item() == 2.0**-8


def test_per_channel_state_dict_resizes_under_strict():
    fed = MovingAveragePerChannelMinMaxObserver(ch_axis=0)
    fed(torch.randn(5, 3))
    fresh = MovingAveragePerChannelMinMaxObserver(ch_axis=0)
    fresh.load_state_dict(fed.state_dict(), strict=True)
    assert torch.equal(fresh.min_val, fed.min_val) and torch.equal(fresh.max_val, fed.max_val)
    empty = MovingAveragePerChannelMinMaxObserver(ch_axis=0)
    empty.load_state_dict(MovingAveragePerChannelMinMaxObserver().state_dict(), strict=True)
    assert empty.min_val.shape == (0,) and not empty.initialized


# ---------------------------------------------------------------- histogram observers
def ref_histogram(values, rng, bins):
    hist = [0] * bins
    for v in values:
        hist[min(int(math.floor(abs(v) * bins / rng)), bins - 1)] += 1
    return hist


def ref_errors(hist, width, amaxes, qmin, qmax):
    """Squared fake-quant error of the histogram (counts at bin centres), slow loops."""
    out = []
    for a in amaxes:
        scale = max(a / ((qmax - qmin) / 2), EPS32)
        err = 0.0
        for j, count in enumerate(hist):
            c = (j + 0.5) * width
            q = min(max(round(c / scale), qmin), qmax) * scale  # python round: half to even
            err += count * (c - q) ** 2
        out.append(err)
    return out


def test_histogram_binning_and_exact_regrowth():
    bins = 16
    obs = PercentileObserver(bins=bins)
    first = torch.tensor([0.1, -0.3, 0.9, 1.0])  # range 1.0
    obs(first)
    assert obs.hist_range.item() == 1.0
    assert obs.histogram.tolist() == ref_histogram(first.tolist(), 1.0, bins)
    second = torch.tensor([3.5, -0.05])  # needs range 4.0: two doublings, merge groups of 4
    obs(second)
    assert obs.hist_range.item() == 4.0
    # old counts move by whole groups: old bin j -> new bin j // 4 (so 1.0, which sat in the
    # closed last bin of range 1.0, stays in [0.75, 1.0]); the new batch bins at range 4.0
    old = ref_histogram(first.tolist(), 1.0, bins)
    expected = ref_histogram(second.tolist(), 4.0, bins)
    for j, count in enumerate(old):
        expected[j // 4] += count
    assert obs.histogram.tolist() == expected
    assert int(obs.histogram.sum()) == 6


def test_histogram_zeros_then_data():
    obs = PercentileObserver(percentile=100.0, bins=8)
    obs(torch.zeros(4))
    assert obs.calculate_amax().item() == 0.0
    obs(torch.tensor([2.0]))
    assert obs.hist_range.item() == 2.0 and obs.histogram.tolist() == [4, 0, 0, 0, 0, 0, 0, 1]
    assert obs.calculate_amax().item() == 2.0


@pytest.mark.parametrize("percentile", [50.0, 90.0, 99.99, 100.0])
def test_percentile_matches_reference(percentile):
    bins = 32
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    obs = PercentileObserver(percentile=percentile, bins=bins)
    obs(x)
    rng = x.abs().max().item()
    hist = ref_histogram(x.tolist(), rng, bins)
    total, running, index = sum(hist), 0, bins - 1
    for i, count in enumerate(hist):
        running += count
        if running >= total * percentile / 100:
            index = i
            break
    assert obs.calculate_amax().item() == pytest.approx((index + 1) * rng / bins, rel=1e-6)


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_mse_matches_brute_force(dtype):
    bins = 128
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(2000, generator=g), torch.tensor([40.0])])  # one far outlier
    obs = MSEObserver(bins=bins, dtype=dtype)
    obs(x)
    rng = obs.hist_range.item()
    width = rng / bins
    hist = ref_histogram(x.tolist(), rng, bins)
    candidates = [(k + 1) * width for k in range(bins)]
    errors = ref_errors(hist, width, candidates, *QRANGE[dtype])
    best = min(errors)
    chosen = max(i for i, e in enumerate(errors) if e <= best * (1 + 1e-9))
    assert obs.calculate_amax().item() == pytest.approx(candidates[chosen], rel=1e-6)
    if dtype == "qint8":
        assert obs.calculate_amax().item() < rng  # the outlier gets clipped


def ref_kl_threshold(hist, levels):
    bins = len(hist)
    best_i, best_kl = bins, math.inf
    for i in range(levels, bins + 1):
        p = [float(v) for v in hist[:i]]
        p[i - 1] += sum(hist[i:])
        q = [0.0] * i
        for g in range(levels):
            members = [j for j in range(i) if (j * levels) // i == g]
            nonzero = [j for j in members if hist[j] > 0]
            total = sum(hist[j] for j in members)
            for j in nonzero:
                q[j] = total / len(nonzero)
        ps, qs = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                if qj == 0:
                    kl = math.inf
                    break
                kl += pj / ps * math.log((pj / ps) / (qj / qs))
        if kl < best_kl - 1e-12:
            best_i, best_kl = i, kl
    return best_i


def test_kl_matches_reference_and_clips_a_long_tail():
    bins = 160
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(5000, generator=g), torch.tensor([25.0, -30.0])])
    obs = KLObserver(bins=bins)
    obs(x)
    rng = obs.hist_range.item()
    best = ref_kl_threshold(obs.histogram.tolist(), 128)
    assert obs.calculate_amax().item() == pytest.approx(best * rng / bins, rel=1e-6)
    # int16 has more levels than bins: nothing to merge, keeps the full range
    obs16 = KLObserver(bins=bins, dtype="qint16")
    obs16(x)
    assert obs16.calculate_amax().item() == rng


def test_mix_picks_best_percentile_by_l2():
    bins = 512
    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(3000, generator=g), torch.tensor([50.0])])
    percentiles = (90.0, 99.0, 99.9, 100.0)
    obs = MixObserver(percentiles=percentiles, bins=bins)
    obs(x)
    single = [PercentileObserver(percentile=p, bins=bins) for p in percentiles]
    for o in single:
        o(x)
    candidates = [o.calculate_amax().item() for o in single]
    width = obs.hist_range.item() / bins
    errors = ref_errors(obs.histogram.tolist(), width, candidates, -128, 127)
    assert obs.calculate_amax().item() == candidates[errors.index(min(errors))]
    # dense data with one mild outlier: clipping it (99.99 %) beats the full range under L2
    dense = torch.cat([torch.rand(100000, generator=g), torch.tensor([1.3])])
    obs = MixObserver(percentiles=(99.99, 100.0), bins=512)
    obs(dense)
    assert obs.calculate_amax().item() < 1.01


# ---------------------------------------------------------------- outliers (issue 12, item 2)
HISTOGRAM_OBSERVERS = [PercentileObserver, MSEObserver, KLObserver, MixObserver]


def _normal(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls", HISTOGRAM_OBSERVERS)
@pytest.mark.parametrize("batches", [1, 2])
def test_one_huge_outlier_leaves_the_histogram_where_the_data_is(cls, batches):
    """One value of 1e30 among 61k once moved the scale from 0.031 to 3.8e24: the range followed it
    and every other value fell into bin 0. Now it is counted in the overflow and the bins stay."""
    x = _normal(61000, 7)
    parts = list(x.chunk(batches))
    clean, dirty = cls(), cls()
    for i, part in enumerate(parts):
        clean(part)
        dirty(torch.cat([part, torch.tensor([-1e30])]) if i == len(parts) - 1 else part)
    assert dirty.hist_range.item() == clean.hist_range.item() < 10.0
    assert torch.equal(dirty.histogram, clean.histogram)
    assert int(dirty.overflow.sum()) == 1
    got, expected = dirty.calculate_amax().item(), clean.calculate_amax().item()
    if cls in (MSEObserver, KLObserver):  # the searches see the histogram only: same answer
        assert got == expected
    elif cls is PercentileObserver:  # one more value above the 99.99 % rank, as one at the max would be
        twin = cls()
        for i, part in enumerate(parts):
            twin(torch.cat([part, x.abs().max().reshape(1)]) if i == len(parts) - 1 else part)
        assert got == twin.calculate_amax().item()
    else:  # Mix: candidates past the 99.99 % rank are the outlier's octave, judged and refused
        assert got <= clean.hist_range.item() and got == pytest.approx(expected, rel=0.05)
    scale = dirty.calculate_qparams("bayes")[0].item()
    assert scale == pytest.approx(clean.calculate_qparams("bayes")[0].item(), rel=0.05)


def test_outlier_ratio_none_covers_every_value_as_before():
    x = torch.cat([_normal(1000, 8), torch.tensor([1e30])])
    obs = PercentileObserver(bins=64, outlier_ratio=None)
    obs(x)
    assert obs.hist_range.item() == np.float32(1e30) and int(obs.overflow.sum()) == 0
    assert obs.histogram[0].item() == 1000


def test_values_up_to_the_ratio_are_covered_and_beyond_it_are_not():
    # bulk: the 99th percentile of U(0, 1) lies in the octave [0.5, 1), whose upper edge is 1
    x = torch.rand(10000, generator=torch.Generator().manual_seed(9))
    inside, outside = PercentileObserver(bins=64), PercentileObserver(bins=64)
    inside(torch.cat([x, torch.tensor([64.0])]))  # 64 x the bulk's edge: still data
    outside(torch.cat([x, torch.tensor([64.5])]))  # beyond: an outlier
    assert inside.hist_range.item() == 64.0 and int(inside.overflow.sum()) == 0
    assert outside.hist_range.item() == x.max().item() and int(outside.overflow.sum()) == 1
    assert outside.overflow[6].item() == 1  # 64.5 / range lies in [2**6, 2**7)
    with pytest.raises(ValueError, match="Expected `outlier_ratio` to be a power of two >= 2"):
        PercentileObserver(outlier_ratio=100)


def test_percentile_ranks_the_outliers_at_their_octave():
    x = torch.cat([torch.rand(999, generator=torch.Generator().manual_seed(10)), torch.tensor([1e30])])
    obs = PercentileObserver(percentile=100.0, bins=64)
    obs(x)
    assert np.float32(1e30) <= obs.calculate_amax().item() < 2e30  # the upper edge of its octave
    zeros = PercentileObserver(bins=64)
    zeros(torch.cat([torch.zeros(50000), torch.rand(500), torch.tensor([1e30])]))  # sparse: the bulk is non-zero
    assert zeros.hist_range.item() < 1.0 and int(zeros.overflow.sum()) == 1


def test_overflow_moves_into_the_range_when_the_bulk_rises():
    obs = PercentileObserver(bins=2048)
    obs(torch.cat([torch.rand(10000, generator=torch.Generator().manual_seed(11)), torch.tensor([100.0])]))
    first_range = obs.hist_range.item()
    assert int(obs.overflow.sum()) == 1 and first_range < 1.0  # 100 > 64 x the bulk's edge 1
    # the bulk moves to [4, 8): the limit becomes 512 and the range grows 2**8-fold to cover 200
    later = torch.cat([4 + 4 * torch.rand(20000, generator=torch.Generator().manual_seed(12)), torch.tensor([200.0])])
    obs(later)
    assert obs.hist_range.item() == np.float32(first_range) * 2**8
    assert int(obs.overflow.sum()) == 0 and int(obs.histogram.sum()) == 30002
    # 100 was recorded in the octave [2**6, 2**7) x the old range, i.e. new bins [512, 1024),
    # which no other value reaches; its count goes to the first of them
    assert obs.histogram[512].item() == 1 and int(obs.histogram[513:1024].sum()) == 0
    assert int(obs.histogram[:8].sum()) == 10000  # the first batch, merged 256 bins to one

def test_a_state_saved_before_the_overflow_buffers_loads_strictly():
    fed = MSEObserver(bins=64)
    fed(_normal(5000, 13))
    old = {k: v for k, v in fed.state_dict().items() if k not in ("overflow", "octave_counts")}
    fresh = MSEObserver(bins=64)
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.histogram, fed.histogram) and int(fresh.overflow.sum()) == 0
    assert int(fresh.octave_counts.sum()) == 5000
    assert fresh.calculate_amax().item() == fed.calculate_amax().item()
    fresh(torch.tensor([1e30]))  # and it keeps working: the rebuilt octaves find the bulk
    assert fresh.hist_range.item() == fed.hist_range.item() and int(fresh.overflow.sum()) == 1
