"""Final-project checks (notebook 09): the references pass, typical wrong answers get their matching hint."""

import pytest
import torch
from exercise_helpers import fails_with, stub

from w8a16.course.exercises import nb09
from w8a16.course.exercises._core import NOT_ATTEMPTED


def test_references_pass_and_round_trip():
    assert nb09.check_quantize_w4(nb09.quantize_w4, quiet=True)
    assert nb09.check_pack_int4(nb09.pack_int4, nb09.unpack_int4, quiet=True)
    assert nb09.check_clip_scales(nb09.clip_scales, quiet=True)
    codes = torch.randint(-8, 8, (7, 10), dtype=torch.int8)
    packed = nb09.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 5)
    assert torch.equal(nb09.unpack_int4(packed), codes)


def test_clipping_never_does_worse_than_absmax():
    w = 0.02 * torch.randn(32, 128)
    base = nb09.quantize_w4(w, 32)[1]
    clipped = nb09.clip_scales(w, 32, nb09.RATIOS)  # ratio 1.0 is among the candidates
    groups = w.reshape(32, 4, 32)

    def err(s):
        return ((nb09._codes(groups, s).float() * s[..., None] - groups) ** 2).sum(-1)

    assert (err(clipped) <= err(base) + 1e-12).all()


def _w4(div=7, per_row=False, clamp=True, float_codes=False):
    def fn(w, gs):
        out_f, in_f = w.shape
        groups = w.float().reshape(out_f, in_f // gs, gs)
        if per_row:
            s = w.float().abs().amax(-1) / div
            return torch.round(w.float() / s[:, None]).to(torch.int8), s
        s = groups.abs().amax(-1) / div
        safe = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.round(groups / safe[..., None])
        q = q.clamp(-7, 7) if clamp else q
        q = q.reshape(out_f, in_f)
        return (q if float_codes else q.to(torch.int8)), s
    return fn


def _w4_in_input_dtype(w, gs):
    """Right in fp32, but a bf16 matrix is divided and rounded in bf16."""
    out_f, in_f = w.shape
    groups = w.reshape(out_f, in_f // gs, gs)
    s = groups.abs().amax(-1) / 7
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.round(groups / safe[..., None]).clamp(-7, 7).reshape(out_f, in_f).to(torch.int8), s


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (_w4(div=8), "divide by 7, not 8"),
        (_w4(div=127), "127 is int8's range"),
        (_w4(div=15), "15 is the number of codes"),
        (_w4(per_row=True), "one scale per row"),
        (_w4(float_codes=True), "as integers"),
        (lambda w, gs: (torch.zeros(1), torch.zeros(1)), "expected scales of shape"),
        (lambda w, gs: nb09.quantize_w4(w, gs)[0], "return two tensors"),
        (_w4_in_input_dtype, "start from w.float()"),
    ],
    ids=["by-8", "by-127", "by-15", "per-row", "float-codes", "bad-shape", "one-tensor", "bf16-maths"],
)
def test_quantize_w4_wrong_answers(wrong, hint):
    fails_with(nb09.check_quantize_w4, wrong, hint)


def _swapped(c):
    c = c.to(torch.int16)
    return (((c[..., 0::2] & 0xF) << 4) | (c[..., 1::2] & 0xF)).to(torch.uint8)


def _no_mask(c):
    c = c.to(torch.int16)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def _unpack_unsigned(p):
    p = p.to(torch.int16)
    return torch.stack([p & 0xF, (p >> 4) & 0xF], -1).reshape(p.shape[0], -1).to(torch.int8)


@pytest.mark.parametrize(
    "pack, unpack, hint",
    [
        (_swapped, nb09.unpack_int4, "nibbles are swapped"),
        (_no_mask, nb09.unpack_int4, "mask each code to 4 bits"),
        (lambda c: c.to(torch.uint8), nb09.unpack_int4, "pack should halve the last dim"),
        (lambda c: nb09.pack_int4(c).to(torch.int32), nb09.unpack_int4, "one byte per two codes"),
        (nb09.pack_int4, _unpack_unsigned, "subtract 16"),
        (nb09.pack_int4, lambda p: torch.zeros(p.shape[0], p.shape[1] * 2, dtype=torch.int8), "unpack(pack(c)) != c"),
    ],
    ids=["swapped", "no-mask", "no-packing", "int32", "no-sign-extension", "generic-unpack"],
)
def test_pack_wrong_answers(pack, unpack, hint):
    fails_with(lambda fn, **kw: nb09.check_pack_int4(fn, unpack, **kw), pack, hint)


def _clip(mode):
    def fn(w, gs, ratios):
        out_f, in_f = w.shape
        groups = w.float().reshape(out_f, in_f // gs, gs)
        absmax = groups.abs().amax(-1)
        if mode == "none":
            return absmax / 7
        errs = []
        for r in ratios.tolist():
            s = r * absmax / 7
            e = nb09._codes(groups, s).float() * s[..., None] - groups
            errs.append((e**2).sum(-1) if mode != "max" else e.abs().amax(-1))
        errs = torch.stack(errs)
        if mode == "global":
            return ratios[int(errs.sum((1, 2)).argmin())] * absmax / 7
        return ratios[errs.argmin(0)] * absmax / 7
    return fn


@pytest.mark.parametrize(
    "wrong, hint",
    [(_clip("none"), "unclipped scales"), (_clip("global"), "one ratio for the whole matrix"),
     (_clip("max"), "minimised the *largest* error"), (lambda w, gs, r: [1.0], "return the tensor of scales")],
    ids=["no-clipping", "one-ratio", "max-error", "not-a-tensor"],
)
def test_clip_wrong_answers(wrong, hint):
    fails_with(nb09.check_clip_scales, wrong, hint)


def test_stubs_are_not_attempted():
    assert nb09.check_quantize_w4(stub, quiet=True).status == NOT_ATTEMPTED
    assert nb09.check_pack_int4(stub, stub, quiet=True).status == NOT_ATTEMPTED
    assert nb09.check_clip_scales(stub, quiet=True).status == NOT_ATTEMPTED
