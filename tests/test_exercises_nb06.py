"""Exercise checks of notebook 06: the reference passes, typical wrong answers get their matching hint."""

from __future__ import annotations

import pytest
import torch

from w8a16.course.exercises import nb06


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def test_layer_bytes_reference_passes() -> None:
    verdict = nb06.check_layer_bytes(nb06.layer_bytes, quiet=True)
    assert verdict, verdict


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda i, o, b, d: o * i * _size(d) + o * _size(d) * (2 if b else 1), "stored as int8, one byte each"),
        (lambda i, o, b, d: o * i, "counted only the int8 weights"),
        (lambda i, o, b, d: o * i + i * _size(d) * (2 if b else 1), "one scale per *output* row"),
        (lambda i, o, b, d: o * i + o * 4 * (2 if b else 1), "4-byte scales"),
        (lambda i, o, b, d: o * i + o * _size(d), "you forgot the bias"),
        (lambda i, o, b, d: o * i + 2 * o * _size(d), "this layer has none"),
        (lambda i, o, b, d: o * i + 1, "the file holds"),
        (lambda i, o, b, d: "lots", "return a number of bytes"),
    ],
    ids=["weights-in-bf16", "no-scales", "scales-per-input", "fp32-scales", "no-bias", "always-bias", "generic",
         "not-a-number"],
)
def test_layer_bytes_wrong_answers_get_their_hint(wrong, hint: str) -> None:
    verdict = nb06.check_layer_bytes(wrong, quiet=True)
    assert verdict.status == "failed" and hint in verdict.message, verdict


def test_logits_identical_reference_passes() -> None:
    verdict = nb06.check_logits_identical(nb06.logits_identical, quiet=True)
    assert verdict, verdict


def _allclose(a, b, ids):
    return torch.allclose(a(ids).logits.float(), b(ids).logits.float())


def _eq_all(a, b, ids):
    return bool((a(ids).logits == b(ids).logits).all())


def _equal_no_dtype(a, b, ids):
    return torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (_allclose, "torch.allclose (or a tolerance) hides that"),
        (_eq_all, "bf16 and the other fp32"),
        (_equal_no_dtype, "compare a.dtype == b.dtype"),
        (lambda a, b, ids: a(ids).logits == b(ids).logits, "reduce it to one True/False"),
        (lambda a, b, ids: False, "the answer is True"),
        (lambda a, b, ids: a(ids), "return True or False"),
    ],
    ids=["allclose", "eq-all", "equal-ignores-dtype", "elementwise", "always-false", "not-a-bool"],
)
def test_logits_identical_wrong_answers_get_their_hint(wrong, hint: str) -> None:
    verdict = nb06.check_logits_identical(wrong, quiet=True)
    assert verdict.status == "failed" and hint in verdict.message, verdict


def test_stubs_are_not_attempted() -> None:
    def stub(*args):
        raise NotImplementedError

    assert nb06.check_layer_bytes(stub, quiet=True).status == "not attempted"
    assert nb06.check_logits_identical(stub, quiet=True).status == "not attempted"


def test_the_tricky_pair_really_differs() -> None:
    """The one-step scale change must change the logits (else the allclose hint could never be earned)."""
    _, a, b, want = nb06._pairs()[1]
    ids = torch.tensor([[1, 4, 9, 16, 25, 31, 0, 7]])
    with torch.no_grad():
        x, y = a(ids).logits, b(ids).logits
    assert want is False and not torch.equal(x, y) and torch.allclose(x, y)
