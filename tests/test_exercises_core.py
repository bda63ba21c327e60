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
    assert check_double(lambda x: None).status == "not attempted"
    assert capsys.readouterr().out.startswith("○ Double it: not attempted yet")


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
