"""Checks for the exercises of notebook 05 (timing).

Exercise 1 has the learner write a fair timer. The check times fake workloads whose true cost is known:
one that is slow on its first call (lazy initialisation), one that is "asynchronous" like a CUDA kernel (the
call returns at once and the work only happens when ``sync()`` is called), and one with rare slow outliers
(another process stealing the CPU). A timer without warm-up, without synchronisation or with the mean instead
of the median gets the matching hint. Exercise 2 turns a time into achieved memory bandwidth.
"""

from __future__ import annotations

import time
from typing import Callable

from .quiz import Question, Quiz
from ._core import Failed, call, exercise

__all__ = ["QUIZ", "check_fair_timer", "check_weight_gbps"]

WORK_S = 0.02  # the true cost of one call of every fake workload


def _sleep(seconds: float) -> None:
    end = time.perf_counter() + seconds
    time.sleep(seconds)
    while time.perf_counter() < end:  # sleep can return a hair early on some systems
        pass


class _Workload:
    """A fake layer: ``fn`` to call, ``sync`` to wait for it, and a record of how it was used."""

    def __init__(self, kind: str) -> None:
        self.kind, self.calls, self.pending = kind, 0, 0.0

    def fn(self) -> None:
        self.calls += 1
        if self.kind == "cold" and self.calls == 1:
            _sleep(20 * WORK_S)  # first call: lazy initialisation, page faults, cold caches
        elif self.kind == "async":
            self.pending += WORK_S  # queued, like a CUDA launch: returns immediately
            return
        elif self.kind == "outliers" and self.calls % 3 == 0:
            _sleep(10 * WORK_S)  # every third call another process steals the CPU
        _sleep(WORK_S)

    def sync(self) -> None:
        _sleep(self.pending)  # the queued work happens now
        self.pending = 0.0


def _seconds(got: object) -> float:
    if isinstance(got, (int, float)):
        return float(got)
    try:
        return float(got)  # a one-element tensor or numpy number
    except (TypeError, ValueError):
        raise Failed(
            f"your timer returned a {type(got).__name__}; return the median time in seconds (a float)."
        ) from None


@exercise("A fair timer", passed="warm-up, synchronisation and the median: right on all three workloads.")
def check_fair_timer(fair_time: Callable[..., float]) -> None:
    """``fair_time(fn, sync, repeats)`` must return the median seconds of one call, after warm-up, synced."""
    repeats = 5
    for kind in ("async", "cold", "outliers"):
        work = _Workload(kind)
        got = _seconds(call(fair_time, work.fn, work.sync, repeats))
        if kind == "async" and got < WORK_S / 2:
            raise Failed(
                f"on an asynchronous workload your timer measured {got * 1e3:.2f} ms for {WORK_S * 1e3:.0f} ms "
                "of work: the call only *queued* it. Call sync() before starting the clock and again before stopping it "
                "(on a GPU: torch.cuda.synchronize())."
            )
        if kind == "cold" and work.calls <= repeats:
            raise Failed(
                f"your timer called fn {work.calls} time(s) for {repeats} repeats: no warm-up. The first call pays "
                "for lazy initialisation and cold caches; call fn once (untimed) before timing."
            )
        if kind == "outliers" and got > 1.5 * WORK_S:
            raise Failed(
                f"with a few slow outlier runs your timer reported {got * 1e3:.1f} ms for a {WORK_S * 1e3:.0f} ms "
                "call: the mean is pulled up by outliers (another process, a page fault). Report the median."
            )
        if kind == "cold" and got > 3 * WORK_S:
            raise Failed(f"your timer reported {got * 1e3:.1f} ms for a {WORK_S * 1e3:.0f} ms call; time each call "
                         "separately and return the median of the warmed-up runs.")
        if not 0.8 * WORK_S <= got <= 3 * WORK_S:
            raise Failed(
                f"on the {kind!r} workload your timer reported {got * 1e3:.2f} ms for a {WORK_S * 1e3:.0f} ms call. "
                "Return seconds (time.perf_counter() differences), one call's time, not the total."
            )


def _gbps_reference(n_out: int, n_in: int, bytes_per_weight: float, seconds: float) -> float:
    return n_out * n_in * bytes_per_weight / seconds / 1e9


@exercise("Achieved bandwidth", passed="right for int8, bf16 and fp32 weights.")
def check_weight_gbps(weight_gbps: Callable[..., float]) -> None:
    """``weight_gbps(n_out, n_in, bytes_per_weight, seconds)``: GB/s (1e9 bytes) spent reading the weight."""
    for n_out, n_in, nbytes, secs in [(4096, 4096, 1, 2e-3), (4096, 4096, 2, 3.5e-3), (1000, 17, 4, 1e-6)]:
        got = _seconds(call(weight_gbps, n_out, n_in, nbytes, secs))
        want = _gbps_reference(n_out, n_in, nbytes, secs)
        if abs(got - want) <= 1e-6 * want:
            continue
        if nbytes != 1 and abs(got - want / nbytes) <= 1e-6 * want:
            raise Failed("you counted weights, not bytes: multiply by bytes_per_weight (2 for bf16, 4 for fp32).")
        if abs(got - want * 1e9 / 2**30) <= 1e-6 * want:
            raise Failed("you divided by 2**30 (GiB); bandwidth is quoted in GB = 1e9 bytes.")
        if abs(got - want * 8) <= 1e-6 * want * 8:
            raise Failed("you reported gigabits; count bytes, not bits.")
        raise Failed(f"for a {n_out}×{n_in} weight of {nbytes} byte(s) read in {secs:g} s you returned {got:.4g} GB/s; "
                     "bandwidth = bytes read / seconds / 1e9.")


# ------------------------------------------------------------------------------------------------- quiz

QUIZ = Quiz("05", [
    Question("At batch size 1, W8A16 beats dense bf16 because…",
             ("int8 multiplications are faster than bf16 ones", "it reads half the bytes, and M = 1 is memory-bound",
              "it skips the bias"), "b",
             "There is no int8 arithmetic: the codes become floats. The gain is the bytes read per token.",
             {"a": "W8A16 never multiplies in int8; it dequantizes and multiplies in floating point.",
              "c": "the bias is added as usual."}),
    Question("A prefill batch of 256 rows on a GPU with bf16 tensor cores: how fast is W8A16 compared with dense bf16?",
             ("about 2× faster", "no faster: the same multiplications, plus the dequantization", "4× faster"), "b",
             "With many rows each weight is reused many times: the layer is compute-bound, and halving the bytes "
             "does not help.",
             {"a": "2× is the memory-bound limit, for small M.", "c": "no: 4× would need a quarter of the bytes and a memory-bound layer."}),
    Question("Why time a warm-up call before the measured ones?",
             ("the first call pays one-time costs (allocation, compilation, cold caches)",
              "the processor needs to heat up", "to warm the int8 weights into bf16"), "a",
             "A first call can be many times slower than later ones; it is not what a model in service pays.",
             {"b": "heat slows a processor down if anything.", "c": "nothing is converted ahead of time by a warm-up."}),
])
