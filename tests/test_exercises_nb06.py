"""Exercise checks of notebook 06: the reference passes, typical wrong answers get their matching hint."""

from __future__ import annotations

import json

import pytest
import torch

from w8a16.course.exercises import nb06


def test_tensor_bytes_reference_passes() -> None:
    verdict = nb06.check_tensor_bytes(nb06.tensor_bytes, quiet=True)
    assert verdict, verdict


def _reader(length_order="little", seek=lambda n, begin: 8 + n + begin, size=lambda begin, end: end - begin,
            as_tensor=False):
    def read(path, name):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), length_order)
            header = json.loads(f.read(n))
            begin, end = header[name]["data_offsets"]
            f.seek(seek(n, begin))
            data = f.read(size(begin, end))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if as_tensor else data
    return read


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (_reader(length_order="big"), "little-endian unsigned integer"),
        (_reader(seek=lambda n, begin: begin), "you read from the start of the file"),
        (_reader(size=lambda begin, end: end), "both are positions"),
        (_reader(seek=lambda n, begin: 8 + n + begin + 1), "the length is right but not the bytes"),
        (_reader(as_tensor=True), "you returned a tensor"),
        (lambda path, name: name, "return the raw bytes"),
        (lambda path, name: None, "did you forget `return`?"),
    ],
    ids=["big-endian-length", "offsets-from-file-start", "end-as-length", "off-by-one", "tensor", "str", "no-return"],
)
def test_tensor_bytes_wrong_answers_get_their_hint(wrong, hint: str) -> None:
    verdict = nb06.check_tensor_bytes(wrong, quiet=True)
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

    assert nb06.check_tensor_bytes(stub, quiet=True).status == "not attempted"
    assert nb06.check_logits_identical(stub, quiet=True).status == "not attempted"


def test_the_tricky_pair_really_differs() -> None:
    """The one-step scale change must change the logits (else the allclose hint could never be earned)."""
    _, a, b, want = nb06._pairs()[1]
    ids = torch.tensor([[1, 4, 9, 16, 25, 31, 0, 7]])
    with torch.no_grad():
        x, y = a(ids).logits, b(ids).logits
    assert want is False and not torch.equal(x, y) and torch.allclose(x, y)
