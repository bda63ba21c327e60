"""w8a16.course.timing: the fair timer (no timing assertions: only that it measures what it says)."""

import time

import pytest

from w8a16.course import timing


def test_compare_alternates_and_counts():
    calls = []
    res = timing.compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2)
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up first, per candidate
    assert calls[4:] == ["a", "b"] * 3  # then interleaved
    assert set(res.median_s) == {"a", "b"} and all(len(ts) == 3 for ts in res.times_s.values())


def test_medians_and_ratio():
    res = timing.Comparison({"fast": [1.0, 2.0, 100.0], "slow": [4.0, 4.0, 4.0]})
    assert res.median_s == {"fast": 2.0, "slow": 4.0}
    assert res.ratio("fast", "slow") == 2.0


def test_sleep_is_measured():
    assert timing.median_time(lambda: time.sleep(0.01), repeats=3, warmup=0) >= 0.009


def test_min_time_adds_rounds():
    res = timing.compare({"x": lambda: None}, repeats=1, warmup=0, min_time_s=1e-3)
    assert len(res.times_s["x"]) > 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        timing.compare({"x": lambda: None}, repeats=0)


def test_synchronize_is_safe_everywhere(device):
    timing.synchronize(device)
    timing.synchronize()
    assert timing.time_once(lambda: None, device) >= 0


def test_between_runs_untimed_before_every_timed_call():
    calls = []
    res = timing.compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1,
                         between=lambda: calls.append("-"))
    assert calls == ["a", "b", "-", "a", "-", "b", "-", "a", "-", "b"]  # not before the warm-up calls
    assert all(len(ts) == 2 for ts in res.times_s.values())


def test_prime_calls_each_candidate_untimed_right_before_its_timed_call():
    calls = []
    res = timing.compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=0,
                         between=lambda: calls.append("-"), prime=True)
    assert calls == ["-", "a", "a", "-", "b", "b", "-", "a", "a", "-", "b", "b"]
    assert all(len(ts) == 2 for ts in res.times_s.values())
