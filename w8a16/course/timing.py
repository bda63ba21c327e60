"""A small, fair timer: warm-up, CUDA synchronisation, alternated runs, medians.

Three mistakes make most home-made benchmarks wrong, and each one is handled here:

* no warm-up: the first call pays for lazy initialisation, page faults and cold caches;
* no synchronisation on CUDA: kernels are launched asynchronously, so ``time.perf_counter()`` around a call
  measures the launch (microseconds), not the work;
* timing A then B: the machine changes underneath (other processes, clock boost, thermals), so whichever ran
  in the quieter minute wins. Alternating A, B, A, B... and taking medians compares like with like.

    from w8a16.timing import compare
    result = compare({"dense": lambda: linear(x), "w8a16": lambda: layer(x)})
    result.median_s["w8a16"], result.ratio("w8a16", "dense")
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait until every queued kernel has finished (a no-op on the CPU)."""
    device = torch.device(device) if device is not None else None
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds taken by one call of ``fn``, with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Comparison:
    """Per-candidate run times (seconds) from `compare`, and their medians."""

    times_s: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median_s(self) -> dict[str, float]:
        return {name: statistics.median(ts) for name, ts in self.times_s.items()}

    def ratio(self, name: str, baseline: str) -> float:
        """How many times faster ``name`` is than ``baseline`` (> 1: faster), from the medians."""
        med = self.median_s
        return med[baseline] / med[name]


def compare(
    candidates: dict[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 2,
    device: torch.device | str | None = None,
    min_time_s: float = 0.0,
    between: Callable[[], object] | None = None,
    prime: bool = False,
) -> Comparison:
    """Time every candidate ``repeats`` times, interleaved (A B C A B C ...), after ``warmup`` calls each.

    ``min_time_s`` adds rounds (beyond ``repeats``) until every candidate has run at least that long in total,
    so that very fast calls still get enough samples for a stable median. ``between``, if given, runs untimed
    before every timed call: for example reading a buffer larger than the cache, so that no candidate pays for
    the cache state the previous one left (a large temporary it wrote must be written back to memory first).
    ``prime`` calls the candidate once more, untimed, right before each timed call (after ``between``): its code
    and Python objects are then in the cache, as in a loop that just ran it, while data it has not touched yet
    (the next weight copy of a rotation) is where ``between`` left it.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be ≥ 1 and warmup ≥ 0")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    result = Comparison({name: [] for name in candidates})
    rounds = 0
    while rounds < repeats or min(sum(ts) for ts in result.times_s.values()) < min_time_s:
        for name, fn in candidates.items():
            if between is not None:
                between()
            if prime:
                fn()
            result.times_s[name].append(time_once(fn, device))
        rounds += 1
        if rounds >= 10 * repeats:
            break
    return result


def median_time(
    fn: Callable[[], object], repeats: int = 7, warmup: int = 2, device: torch.device | str | None = None
) -> float:
    """Median seconds of ``fn`` (one candidate; use `compare` to compare several fairly)."""
    return compare({"fn": fn}, repeats=repeats, warmup=warmup, device=device).median_s["fn"]
