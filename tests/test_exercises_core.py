"""The verdict machinery every exercise check uses."""

from w8a16.course.exercises import Failed, exercise
from w8a16.course.exercises._core import call


@exercise("Double it", passed="correct on 3 inputs.")
def check_double(fn):
    for x in (0, 1, -7):
        got = call(fn, x)
        if got == x != 0:
            raise Failed("you returned the input unchanged — multiply it by 2.")
        if got != 2 * x:
            raise Failed(f"double({x}) should be {2 * x}, got {got}.")


def test_correct_answer_passes_and_prints_a_tick(capsys):
    verdict = check_double(lambda x: 2 * x)
    assert verdict and verdict.status == "passed"
    assert capsys.readouterr().out == "✓ Double it: correct on 3 inputs.\n"


def test_stub_is_not_attempted_and_does_not_raise(capsys):
    def stub(x):
        raise NotImplementedError

    assert check_double(stub).status == "not attempted"
    assert capsys.readouterr().out.startswith("○ Double it: not attempted yet")


def test_returning_none_is_a_forgotten_return_not_a_stub():
    def forgot(x):
        y = 2 * x  # noqa: F841 — computed, never returned

    verdict = check_double(forgot, quiet=True)
    assert verdict.status == "failed" and "did you forget `return`?" in verdict.message


def test_wrong_answer_gets_the_matching_hint():
    verdict = check_double(lambda x: x, quiet=True)
    assert not verdict and "multiply it by 2" in verdict.message


def test_crash_is_reported_in_one_line_without_traceback(capsys):
    verdict = check_double(lambda x: 1 / 0)
    out = capsys.readouterr().out
    assert verdict.status == "failed" and "ZeroDivisionError" in out and "Traceback" not in out


def test_a_broken_check_does_not_stop_the_notebook():
    @exercise("Broken")
    def check_broken(fn):
        return {}["missing"]

    assert check_broken(lambda: 1, quiet=True).status == "failed"


# ---- hints every check gets from `call` --------------------------------------------------------------------------

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from exercise_helpers import fails_with  # noqa: E402


@exercise("Row maxima")
def check_row_max(fn):
    w = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    got = call(fn, w)
    if not torch.equal(got, w.abs().amax(-1)):
        raise Failed("not the row maxima.")


@exercise("RMS")
def check_rms(fn):
    s = torch.tensor([0.1, 0.2, 0.4])
    got = call(fn, s)
    if not torch.allclose(got, s / 12**0.5):
        raise Failed("not s / √12.")


@pytest.mark.parametrize(
    "check, wrong, hint",
    [
        (check_row_max, lambda w: w.abs().max(dim=-1), "returns both the maxima and where they are"),
        (check_row_max, lambda w: w.abs().max(dim=-1) / 1, "`.max(dim=...)` (and `.min(dim=...)`) returns a pair"),
        (check_row_max, lambda w: w.abs().max(dim=-1).clamp(min=0), "use `.max(dim=...).values`"),
        (check_rms, lambda s: math.sqrt(s**2 / 12), "use the torch version (torch.sqrt"),
        (check_rms, lambda s: s / torch.sqrt(12), "was given a plain Python number"),
    ],
    ids=["returns-the-pair", "divides-the-pair", "calls-a-method-on-the-pair", "math-sqrt-on-a-tensor", "torch-sqrt-on-an-int"],
)
def test_common_api_mistakes_get_their_hint(check, wrong, hint):
    fails_with(check, wrong, hint)


def test_the_right_answers_pass():
    assert check_row_max(lambda w: w.abs().amax(dim=-1), quiet=True)
    assert check_row_max(lambda w: w.abs().max(dim=-1).values, quiet=True)
    assert check_rms(lambda s: s / math.sqrt(12), quiet=True)
    assert check_rms(lambda s: torch.sqrt(s**2 / 12), quiet=True)
