"""What every exercise-check test needs: a stub, and "this answer fails with that hint"."""

from w8a16.course.exercises._core import FAILED


def stub(*args):
    """An untouched exercise cell."""
    raise NotImplementedError


def fails_with(check, fn, hint: str) -> None:
    """``check(fn)`` fails, its message contains ``hint``, and no traceback reaches the learner."""
    verdict = check(fn, quiet=True)
    assert verdict.status == FAILED, verdict
    assert hint in verdict.message, verdict.message
    assert "Traceback" not in verdict.message
