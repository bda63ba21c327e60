"""Checks for the final project, notebook 09: W4A16 with per-group scales, int4 packing and clipping.

1. `check_quantize_w4`: symmetric int4 codes in [−7, 7] with one scale per group of ``group_size`` inputs.
2. `check_pack_int4` / unpacking: two 4-bit codes per byte (even input in the low nibble), and back, signs included.
3. `check_clip_scales`: per group, the clipping ratio (of absmax) that gives the least squared error.
"""

from __future__ import annotations

import torch

from ._core import Failed, call, exercise
from .quiz import Question, Quiz

__all__ = ["QUIZ", "check_clip_scales", "check_pack_int4", "check_quantize_w4", "clip_scales", "dequantize_w4",
           "pack_int4", "quantize_w4", "unpack_int4"]

QMAX = 7  # symmetric int4: codes −7 … 7 (−8 is left out, as −128 is in int8)


# ----------------------------------------------------------------------------------------- references


def quantize_w4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 (out, in) in [−7, 7], scales fp32 (out, in // group_size))``, scale = group absmax / 7."""
    out_f, in_f = w.shape
    groups = w.float().reshape(out_f, in_f // group_size, group_size)
    scales = groups.abs().amax(-1) / QMAX
    return _codes(groups, scales).reshape(out_f, in_f), scales


def _codes(groups: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    return torch.round(groups / safe[..., None]).clamp(-QMAX, QMAX).to(torch.int8)


def dequantize_w4(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out_f, in_f = codes.shape
    g = in_f // scales.shape[-1]
    return (codes.float().reshape(out_f, -1, g) * scales[..., None]).reshape(out_f, in_f)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` codes in [−8, 7] -> ``(out, in // 2)`` uint8: input 2k in the low nibble, 2k + 1 in the high."""
    c = codes.to(torch.int16) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 codes, the 4-bit two's complement sign-extended (8 … 15 -> −8 … −1)."""
    p = packed.to(torch.int16)
    low, high = p & 0xF, (p >> 4) & 0xF
    both = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def clip_scales(w: torch.Tensor, group_size: int, ratios: torch.Tensor) -> torch.Tensor:
    """Per group, ``r · absmax / 7`` for the ratio ``r`` in ``ratios`` with the least squared rounding error."""
    out_f, in_f = w.shape
    groups = w.float().reshape(out_f, in_f // group_size, group_size)
    absmax = groups.abs().amax(-1)
    errs = []
    for r in ratios.tolist():
        s = r * absmax / QMAX
        back = _codes(groups, s).float() * s[..., None]
        errs.append((back - groups).pow(2).sum(-1))
    best = torch.stack(errs).argmin(0)
    return ratios.float()[best] * absmax / QMAX


# ------------------------------------------------------------------------------------------------ inputs


def _matrices() -> list[tuple[str, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(901)
    plain = 0.02 * torch.randn(8, 64, generator=g)
    outlier = 0.02 * torch.randn(6, 48, generator=g)
    outlier[2, 5] = 0.5
    zero = 0.02 * torch.randn(4, 32, generator=g)
    zero[1, :16] = 0.0  # an all-zero group
    return [
        ("an 8×64 matrix, group_size=32", plain, 32),
        ("a 6×48 matrix with an outlier, group_size=16", outlier, 16),
        ("a 4×32 matrix with an all-zero group, group_size=16", zero, 16),
        ("an 8×64 bf16 matrix, group_size=64", plain.bfloat16(), 64),
    ]


def _pair(got: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(got, (tuple, list)) or len(got) != 2 or not all(isinstance(t, torch.Tensor) for t in got):
        raise Failed("return two tensors, (codes, scales).")
    return got[0], got[1]


# ----------------------------------------------------------------------------------------- task 1


@exercise("Task 1 — int4 codes and group scales", passed="correct on 4 matrices (outlier, zero group and bf16 included).")
def check_quantize_w4(fn):
    for case, w, gs in _matrices():
        codes, scales = _pair(call(fn, w.clone(), gs))
        ref_codes, ref_scales = quantize_w4(w, gs)
        out_f, in_f = w.shape
        if tuple(scales.shape) != tuple(ref_scales.shape):
            if scales.numel() == out_f:
                raise Failed(f"on {case} you made one scale per row: W4 needs one per *group* of {gs} inputs, "
                             f"shape (out, in // group_size) = {tuple(ref_scales.shape)}.")
            raise Failed(f"on {case} expected scales of shape {tuple(ref_scales.shape)}, got {tuple(scales.shape)}.")
        if not torch.isfinite(scales.float()).all() or (codes.is_floating_point() and not torch.isfinite(codes).all()):
            raise Failed(f"on {case} you got NaN/Inf: an all-zero group has scale 0 — do not divide by it (its codes are 0).")
        s = scales.detach().float()
        if not torch.allclose(s, ref_scales, rtol=1e-2 if w.dtype == torch.bfloat16 else 1e-5):
            ref_abs = ref_scales * QMAX
            for div, hint in ((8, "the int4 grid is symmetric here: ±7, so divide by 7, not 8."),
                              (127, "127 is int8's range; 4 bits give codes −7 … 7: divide the absmax by 7."),
                              (15, "15 is the number of codes, not the largest one: divide the absmax by 7.")):
                if torch.allclose(s, ref_abs / div, rtol=1e-2):
                    raise Failed(f"on {case} {hint}")
            raise Failed(f"on {case} your scales differ from the group absmax / 7.")
        if tuple(codes.shape) != (out_f, in_f):
            raise Failed(f"on {case} return the codes with the weight's shape {(out_f, in_f)}, got {tuple(codes.shape)}.")
        c = codes.detach()
        if c.is_floating_point():
            raise Failed("return the codes as integers, .to(torch.int8) (they are packed in task 2).")
        if (c.abs() > QMAX).any():
            raise Failed(f"on {case} some codes are beyond ±7: clamp to [−7, 7].")
        if not torch.equal(c.to(torch.int8), ref_codes):
            if w.dtype != torch.float32:
                groups = w.reshape(out_f, in_f // gs, gs)  # the same computation left in the input's dtype
                low = _codes(groups, groups.abs().amax(-1) / QMAX).reshape(out_f, in_f)
                if torch.equal(c.to(torch.int8), low):
                    raise Failed(f"on {case} you computed in {str(w.dtype).removeprefix('torch.')}: w / scale is "
                                 "rounded to that dtype's few bits before torch.round sees it, so codes near a .5 "
                                 "move. Compute in fp32: start from w.float().")
            raise Failed(f"on {case} your codes differ: round(w / scale) per group, with the group's own scale "
                         "(reshape to (out, in // group_size, group_size) and broadcast scales[..., None]).")


# ----------------------------------------------------------------------------------------- task 2


def _code_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(902)
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(2, 1)  # every 4-bit value, in pairs (−8, −7), …
    return [
        ("every code from −8 to 7", every),
        ("random codes in a 5×12 matrix", torch.randint(-7, 8, (5, 12), generator=g, dtype=torch.int8)),
        ("all −1 (binary 1111)", torch.full((3, 4), -1, dtype=torch.int8)),
    ]


@exercise("Task 2 — pack two codes per byte", passed="pack matches the layout and unpack(pack(c)) == c on 3 matrices, every 4-bit value included.")
def check_pack_int4(pack, unpack):
    for case, c in _code_cases():
        packed = call(pack, c.clone())
        if not isinstance(packed, torch.Tensor):
            raise Failed(f"pack returned a {type(packed).__name__}; return a tensor of bytes.")
        want = pack_int4(c)
        if tuple(packed.shape) != tuple(want.shape):
            raise Failed(f"on {case} pack should halve the last dim: {tuple(c.shape)} -> {tuple(want.shape)}, "
                         f"got {tuple(packed.shape)}.")
        if packed.element_size() != 1:
            raise Failed(f"pack returned {packed.dtype}: the point is one byte per two codes — .to(torch.uint8).")
        p = packed.detach().to(torch.uint8)
        if not torch.equal(p, want):
            swapped = ((c.to(torch.int16)[..., 0::2] & 0xF) << 4 | (c.to(torch.int16)[..., 1::2] & 0xF)).to(torch.uint8)
            if torch.equal(p, swapped):
                raise Failed(f"on {case} your nibbles are swapped: the even input goes in the *low* 4 bits, the odd one "
                             "in the high 4 bits (shifted left by 4).")
            raise Failed(f"on {case} your bytes differ from (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4): "
                         "mask each code to 4 bits (& 0xF) before shifting — a negative int8 has its high bits set.")
        back = call(unpack, want.clone())
        if not isinstance(back, torch.Tensor) or tuple(back.shape) != tuple(c.shape):
            raise Failed(f"on {case} unpack should return the codes' shape {tuple(c.shape)}.")
        b = back.detach().to(torch.int16)
        if torch.equal(b, c.to(torch.int16)):
            continue
        if torch.equal(b, c.to(torch.int16) & 0xF):
            raise Failed(f"on {case} unpack gave 8 … 15 for the negative codes: a 4-bit value ≥ 8 is negative in two's "
                         "complement — subtract 16 from those.")
        raise Failed(f"on {case} unpack(pack(c)) != c: take low = byte & 0xF, high = byte >> 4 & 0xF, interleave them "
                     "(even inputs first), and sign-extend.")


# ----------------------------------------------------------------------------------------- task 3

RATIOS = torch.tensor([1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7])


@exercise("Task 3 — clipping calibration", passed="the least-error clipping ratio of every group, on 3 matrices.")
def check_clip_scales(fn):
    for case, w, gs in _matrices()[:3]:
        got = call(fn, w.clone(), gs, RATIOS.clone())
        if not isinstance(got, torch.Tensor):
            raise Failed(f"your function returned a {type(got).__name__}; return the tensor of scales.")
        ref = clip_scales(w, gs, RATIOS)
        if tuple(got.shape) != tuple(ref.shape):
            raise Failed(f"on {case} expected scales of shape {tuple(ref.shape)} (one per group), got {tuple(got.shape)}.")
        s = got.detach().float()
        if torch.allclose(s, ref, rtol=1e-5, atol=1e-12):
            continue
        out_f, in_f = w.shape
        groups = w.float().reshape(out_f, in_f // gs, gs)
        absmax = groups.abs().amax(-1)
        if torch.allclose(s, absmax / QMAX, rtol=1e-5):
            raise Failed(f"on {case} those are the unclipped scales (ratio 1 everywhere): try each ratio and keep, per "
                         "group, the one whose quantize → dequantize error is smallest.")
        totals = []
        for r in RATIOS.tolist():
            sc = r * absmax / QMAX
            totals.append(((_codes(groups, sc).float() * sc[..., None] - groups) ** 2).sum())
        one = RATIOS[int(torch.stack(totals).argmin())]
        if torch.allclose(s, one * absmax / QMAX, rtol=1e-5):
            raise Failed(f"on {case} you chose one ratio for the whole matrix; choose per group (argmin over the ratios "
                         "for each group separately).")
        maxerr = torch.stack([(_codes(groups, r * absmax / QMAX).float() * (r * absmax / QMAX)[..., None] - groups)
                              .abs().amax(-1) for r in RATIOS.tolist()]).argmin(0)
        if torch.allclose(s, RATIOS[maxerr] * absmax / QMAX, rtol=1e-5):
            raise Failed(f"on {case} you minimised the *largest* error; calibrate on the squared error summed over the "
                         "group (what the layer's output feels).")
        raise Failed(f"on {case} your scales differ: for each ratio r, scale = r · absmax / 7, quantize (clamp to ±7), "
                     "dequantize, sum the squared error per group; keep the best r per group.")


# ------------------------------------------------------------------------------------------------- quiz

QUIZ = Quiz("09", [
    Question("How many bytes does a W4A16 weight take, packed, before counting the scales?",
             ("0.5", "1", "2"), "a",
             "Two 4-bit codes share one byte.",
             {"b": "one byte per weight is W8; packing puts two 4-bit codes in each byte.",
              "c": "two bytes is bf16, the unquantized weight."}),
    Question("Why does W4 almost always use per-group scales, when W8 gets by with one per row?",
             ("int4 cannot be stored per row", "with only 15 levels, one outlier in a row would leave the rest of the "
              "row on a handful of codes", "groups make packing possible"), "b",
             "The step is 127 / 7 ≈ 18× coarser than int8's for the same absmax; small groups keep it local.",
             {"a": "storage is not the issue; accuracy is.", "c": "packing works with any scale layout."}),
    Question("Clipping sets the scale from a fraction of the absmax. What does it trade?",
             ("a larger error on the few largest weights for a finer step for all the others",
              "memory for speed", "nothing: it is always better"), "a",
             "Weights beyond the clipped range are clamped, but every other weight gets a finer grid; calibration "
             "picks the ratio where the total error is least.",
             {"b": "the stored bytes are the same.", "c": "too much clipping (small ratios) makes the error worse: that is why it is searched."}),
])
