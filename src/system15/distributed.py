"""Splitting evaluation over processes without losing or duplicating an example.

Samplers that pad the last shard (so every process gets the same count) return some
examples twice, which biases an accuracy. Here each process takes a contiguous slice of
the examples, slices differ in length by at most one, and gathering concatenates the
slices in rank order, so the gathered list is the input order, one result per example.
With one process every function is the identity.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def shard_indices(n: int, rank: int, world: int) -> range:
    """Indices of process `rank` of `world`: contiguous, the first n % world ranks get one extra."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError(f"shard_indices: need n >= 0 and 0 <= rank < world, got n={n}, rank={rank}, world={world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _state():
    """The process group (accelerate's shared state). On a machine without CUDA the state must
    be made with cpu=True, or a multi-process launch silently runs as independent processes."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def shard(items: Sequence[T]) -> list[T]:
    """This process's slice of `items`."""
    state = _state()
    return [items[i] for i in shard_indices(len(items), state.process_index, state.num_processes)]


def gather(local: list[R]) -> list[R]:
    """Every process's `local` list, concatenated in rank order, on every process.

    Objects travel between the processes of this job (torch.distributed), never via disk."""
    from accelerate.utils import gather_object

    state = _state()
    return list(local) if state.num_processes == 1 else gather_object(list(local))


def shard_map(fn: Callable[[list[T]], list[R]], items: Sequence[T]) -> list[R]:
    """fn over this process's slice, gathered: one result per item, in the order of `items`.

    Every process must call it (it is a collective)."""
    mine = shard(items)
    out = list(fn(mine)) if mine else []
    if len(out) != len(mine):
        raise ValueError(f"shard_map: fn returned {len(out)} results for {len(mine)} items")
    return gather(out)
