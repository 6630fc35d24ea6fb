"""Reduction of observer statistics across distributed ranks.

When ``torch.distributed`` is initialised with more than one rank, every observer reduces the
statistics of the **current batch** before it updates its running state, so all ranks see the
same batch statistics and end with identical scales. Without an initialised process group these
functions return their input untouched and cost nothing.

Modes (observer argument ``sync``):

* ``"minmax"`` (default): min of the ranks' minima, max of their maxima - the range of the
  global batch, exactly what a single process would have seen.
* ``"mean"``: average of the ranks' minima and maxima (less sensitive to one rank's outlier).
* ``"none"``: no communication; ranks may drift apart (only for debugging).

Histogram observers always reduce the range with max (so every rank bins into the same edges)
and then sum the histograms; ``"none"`` switches that off too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["SYNC_MODES", "check_sync_mode", "is_distributed", "reduce_min_max", "reduce_max", "reduce_sum"]

SYNC_MODES = ("minmax", "mean", "none")


def check_sync_mode(sync: str) -> str:
    """Validate a ``sync`` mode string."""
    if sync not in SYNC_MODES:
        raise ValueError(f"Expected `sync` to be one of {SYNC_MODES}, but got {sync!r}.")
    return sync


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_min_max(
    min_val: torch.Tensor, max_val: torch.Tensor, sync: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce per-rank batch minima/maxima according to ``sync`` (no-op when not distributed)."""
    if sync == "none" or not is_distributed():
        return min_val, max_val
    both = torch.stack([min_val.float(), max_val.float()])
    if sync == "minmax":
        # min(a) == -max(-a): one MAX all-reduce instead of two calls
        both[0].neg_()
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        both[0].neg_()
    elif sync == "mean":
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        both /= dist.get_world_size()
    else:
        check_sync_mode(sync)
    return both[0], both[1]


def reduce_max(value: torch.Tensor, sync: str = "minmax") -> torch.Tensor:
    """Maximum over ranks (no-op when not distributed or ``sync == "none"``)."""
    return _all_reduce_copy(value, sync, "MAX")


def reduce_sum(value: torch.Tensor, sync: str = "minmax") -> torch.Tensor:
    """Sum over ranks (no-op when not distributed or ``sync == "none"``)."""
    return _all_reduce_copy(value, sync, "SUM")


def _all_reduce_copy(value: torch.Tensor, sync: str, op: str) -> torch.Tensor:
    # the op is named, not passed as dist.ReduceOp: that attribute is only read once distributed
    if sync == "none" or not is_distributed():
        return value
    value = value.clone()  # all_reduce works in place; the caller's tensor is left as it is
    dist.all_reduce(value, op=getattr(dist.ReduceOp, op))
    return value
