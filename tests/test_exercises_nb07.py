"""Exercise checks of notebook 07: the references pass, typical wrong forwards get their matching hint."""

import pytest
import torch
import torch.nn.functional as F
from exercise_helpers import fails_with, stub

from w8a16.course.exercises import nb07
from w8a16.course.exercises._core import NOT_ATTEMPTED
from w8a16.ops.reference import reference_linear


def test_the_outlier_case_overflows_the_seed_and_not_the_reference():
    x, q, s, b = nb07.outlier_case()
    assert x.dtype == torch.float16
    assert not torch.isfinite(nb07.naive_forward(x, q, s, b)).all()
    ref = reference_linear(x, q, s, b)
    assert torch.isfinite(ref).all() and ref.abs().max() < 1000  # the true outputs are modest
    assert torch.equal(nb07.w8a16_forward(x, q, s, b), ref)


def test_references_pass():
    assert nb07.check_naive_forward(nb07.naive_forward, quiet=True)
    assert nb07.check_naive_forward(nb07.w8a16_forward, quiet=True)  # the fix is also right where the seed is
    assert nb07.check_forward(nb07.w8a16_forward, quiet=True)
    assert nb07.check_forward(reference_linear, quiet=True)
    assert nb07.check_naive_overflows(nb07.naive_overflows, quiet=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda x, q, s, b: F.linear(x, q) * s, "cast the int8 weights first"),
        (lambda x, q, s, b: F.linear(x, q.to(x.dtype)) * s, "you forgot the bias"),
        (lambda x, q, s, b: F.linear(x, q.to(x.dtype)) * s[:, None], "one entry per *output* feature"),
        (lambda x, q, s, b: F.linear(x, q.to(x.dtype)), "with no scales"),
        (lambda x, q, s, b: nb07.naive_forward(x, q, 1 / s, b), "you divided by the scales"),
        (lambda x, q, s, b: None, "did you forget `return`?"),
    ],
    ids=["no-cast", "no-bias", "scales-on-rows-of-output", "no-scales", "divided", "no-return"],
)
def test_naive_forward_wrong_answers(wrong, hint):
    fails_with(nb07.check_naive_forward, wrong, hint)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (nb07.naive_forward, "you scaled *after* the matmul"),
        (lambda x, q, s, b: nb07.w8a16_forward(x, q, s), "you forgot the bias"),
        (lambda x, q, s, b: F.linear(x.float(), q.float() * s.float()[:, None], None if b is None else b.float()),
         "round once, at the end"),
        (lambda x, q, s, b: nb07.w8a16_forward(x, q, s.half() if x.dtype == torch.float16 else s, b),
         "scales were rounded to fp16"),
        (lambda x, q, s, b: (F.linear(x.float(), q.float()) * 1e5).to(x.dtype), "some intermediate left"),
        (lambda x, q, s, b: nb07.w8a16_forward(x, q, s, b) + 1, "differs from the reference"),
    ],
    ids=["scale-after-matmul", "no-bias", "fp32-output", "fp16-scales", "overflow-elsewhere", "generic"],
)
def test_fixed_forward_wrong_answers(wrong, hint):
    fails_with(nb07.check_forward, wrong, hint)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda x, q, s: bool(torch.isinf(reference_linear(x, q, s)).any()), "*before* multiplying by the scales"),
        (lambda x, q, s: bool(x.float().abs().max() * 127 > 65504), "the sum of in_features of them"),
        (lambda x, q, s: bool((x.float().abs() @ q.float().abs().T).max() > 65504), "the signs cancel"),
        (lambda x, q, s: "yes", "return True or False"),
    ],
    ids=["final-output", "one-product", "upper-bound", "not-a-bool"],
)
def test_overflow_wrong_answers(wrong, hint):
    fails_with(nb07.check_naive_overflows, wrong, hint)


def test_per_element_bound_gets_the_sum_hint_on_the_uniform_case():
    """A predictor that only sees single products is caught on the case built for it as well."""
    verdict = nb07.check_naive_overflows(lambda x, q, s: bool(x.float().abs().max() * 127 > 65504), quiet=True)
    assert "one product" in verdict.message


def test_stubs_are_not_attempted():
    for check in (nb07.check_naive_forward, nb07.check_forward, nb07.check_naive_overflows):
        assert check(stub, quiet=True).status == NOT_ATTEMPTED


def test_quiz_answers_and_feedback():
    right = [q.answer for q in nb07.QUIZ.questions]
    assert all(nb07.QUIZ.verdicts(right))
    assert [v.status for v in nb07.QUIZ.verdicts(["?", None])] == [NOT_ATTEMPTED] * 3
    wrong = nb07.QUIZ.verdicts(["a", "a", "b"])
    assert not any(wrong) and "exact in fp16" in wrong[0].message
