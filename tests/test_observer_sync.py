"""Distributed observer sync: a real 2-process gloo run on CPU, ranks see different data."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hq_lightning.quantization import FakeQuantize
from hq_lightning.quantization.observer import (
    MovingAveragePerChannelMinMaxObserver,
    MovingAveragePerTensorMinMaxObserver,
    MSEObserver,
    PercentileObserver,
)
from hq_lightning.quantization.sync import is_distributed, reduce_min_max


def _batches(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(4, 3, 5, generator=g) * (1 + 3 * rank) + rank


def _with_outlier(x, rank, step):
    # rank 1's second batch holds a value far beyond the data: it must land in the overflow of
    # every rank's histogram alike (the range decision uses only reduced statistics)
    if rank == 1 and step == 1:
        x = x.clone()
        x.view(-1)[7] = -1e30
    return x


def _build():
    return {
        "tensor_minmax": FakeQuantize(observer=MovingAveragePerTensorMinMaxObserver, averaging_constant=0.1),
        "tensor_mean": FakeQuantize(
            observer=MovingAveragePerTensorMinMaxObserver, averaging_constant=0.1, sync="mean"
        ),
        "channel": FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=1, averaging_constant=0.1),
        "percentile": FakeQuantize(observer=PercentileObserver, bins=64, percentile=99.0),
        "mse": FakeQuantize(observer=MSEObserver, bins=64),
        "outlier": FakeQuantize(observer=PercentileObserver, bins=64, percentile=99.0),
        "unsynced": FakeQuantize(
            observer=MovingAveragePerTensorMinMaxObserver, averaging_constant=0.1, sync="none"
        ),
    }


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        assert is_distributed()
        modules = _build()
        for step in range(3):
            x = _batches(rank, step)
            for name, m in modules.items():
                m(_with_outlier(x, rank, step) if name == "outlier" else x)
        state = {name: (m.scale.clone(), m.activation_post_process.state_dict()) for name, m in modules.items()}
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_gloo_sync_gives_identical_scales(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("tensor_minmax", "tensor_mean", "channel", "percentile", "mse", "outlier"):
        assert torch.equal(r0[name][0], r1[name][0]), name
        for key, value in r0[name][1].items():
            assert torch.equal(value, r1[name][1][key]), (name, key)
    assert not torch.equal(r0["unsynced"][0], r1["unsynced"][0])

    # the synced min/max equals one process observing both ranks' batches as one global batch
    single = _build()
    for step in range(3):
        both = torch.cat([_batches(0, step), _batches(1, step)])
        for name in ("tensor_minmax", "channel", "percentile"):
            single[name](both)
        single["outlier"](torch.cat([_batches(0, step), _with_outlier(_batches(1, step), 1, step)]))
    for name in ("tensor_minmax", "channel", "percentile", "outlier"):
        assert torch.equal(single[name].scale, r0[name][0]), name
    outlier_state = single["outlier"].activation_post_process.state_dict()
    for key, value in outlier_state.items():
        assert torch.equal(value, r0["outlier"][1][key]), key
    assert int(outlier_state["overflow"].sum()) == 1 and outlier_state["hist_range"].item() < 100
    # "mean" averages the ranks' batch extremes before the moving average
    ref = MovingAveragePerTensorMinMaxObserver(averaging_constant=0.1)
    for step in range(3):
        lo = (_batches(0, step).min() + _batches(1, step).min()) / 2
        hi = (_batches(0, step).max() + _batches(1, step).max()) / 2
        ref(torch.stack([lo, hi]))
    assert torch.allclose(ref.min_val, r0["tensor_mean"][1]["min_val"], rtol=1e-6)
    assert torch.allclose(ref.max_val, r0["tensor_mean"][1]["max_val"], rtol=1e-6)


def test_no_process_group_means_no_reduction():
    assert not is_distributed()
    lo, hi = torch.tensor([1.0]), torch.tensor([2.0])
    assert reduce_min_max(lo, hi) == (lo, hi)
