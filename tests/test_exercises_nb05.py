"""Exercise checks of notebook 05: the reference passes, typical mistakes get their specific hint."""

import statistics
import time

import torch
from exercise_helpers import fails_with

from w8a16.course.exercises import nb05
from w8a16.course.exercises._core import NOT_ATTEMPTED


def _timer(warmup=1, sync=True, reduce=statistics.median):
    def fair_time(fn, sync_fn, repeats):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if sync:
                sync_fn()
            start = time.perf_counter()
            fn()
            if sync:
                sync_fn()
            times.append(time.perf_counter() - start)
        return reduce(times)
    return fair_time


def test_fair_timer_reference_passes():
    assert nb05.check_fair_timer(_timer(), quiet=True)


def test_fair_timerstub_is_not_attempted():
    def stub(fn, sync, repeats):
        raise NotImplementedError
    assert nb05.check_fair_timer(stub, quiet=True).status == NOT_ATTEMPTED


def test_fair_timer_without_sync():
    fails_with(nb05.check_fair_timer, _timer(sync=False), "sync()")


def test_fair_timer_without_warmup():
    fails_with(nb05.check_fair_timer, _timer(warmup=0), "no warm-up")


def test_fair_timer_with_the_mean():
    fails_with(nb05.check_fair_timer, _timer(reduce=statistics.mean), "median")


def test_fair_timer_returning_milliseconds():
    fails_with(nb05.check_fair_timer, _timer(reduce=lambda ts: 1e3 * statistics.median(ts)), "seconds")


def test_fair_timer_that_crashes_gets_one_line():
    fails_with(nb05.check_fair_timer, lambda fn, sync, repeats: 1 / 0, "ZeroDivisionError")


def _gbps(n_out, n_in, bytes_per_weight, seconds):
    return n_out * n_in * bytes_per_weight / seconds / 1e9


def test_gbps_reference_passes():
    assert nb05.check_weight_gbps(_gbps, quiet=True)
    assert nb05.check_weight_gbps(lambda *a: torch.tensor(_gbps(*a), dtype=torch.float64), quiet=True)


def test_gbps_counting_weights_not_bytes():
    fails_with(nb05.check_weight_gbps, lambda o, i, b, s: o * i / s / 1e9, "bytes_per_weight")


def test_gbps_in_gib():
    fails_with(nb05.check_weight_gbps, lambda o, i, b, s: o * i * b / s / 2**30, "2**30")


def test_gbps_in_bits():
    fails_with(nb05.check_weight_gbps, lambda o, i, b, s: 8 * o * i * b / s / 1e9, "bits")


def test_gbps_other_mistake_gets_the_generic_hint():
    fails_with(nb05.check_weight_gbps, lambda o, i, b, s: o * i * b * s, "bytes read / seconds")
