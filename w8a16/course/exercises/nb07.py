"""Checks for the exercises of notebook 07 (write the layer's forward yourself).

1. `check_naive_forward`: the seed's forward, ``F.linear(x, int8_weights.to(x.dtype)) * scales + bias``, on
   inputs where it is fine (fp32, bf16, small fp16) — compared with `w8a16.ops.reference.reference_linear`.
2. `check_forward`: the fixed forward — weights dequantized in fp32 *before* the matmul, fp32 accumulation, one
   rounding to ``x.dtype`` — on fp16 inputs with outliers where the seed's forward overflows, and tiny fp16
   scales; wrong answers recognised: scaling after the matmul, no bias, fp32 output, scales rounded to fp16.
3. `check_naive_overflows`: predict whether the seed's forward overflows fp16 for given inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops.reference import reference_linear
from ._core import Failed, call, exercise
from .quiz import Question, Quiz

__all__ = ["QUIZ", "check_forward", "check_naive_forward", "check_naive_overflows", "naive_forward",
           "naive_overflows", "outlier_case", "w8a16_forward"]

FP16_MAX = torch.finfo(torch.float16).max  # 65504


# ----------------------------------------------------------------------------------------- references


def naive_forward(x, int8_weights, scales, bias=None):
    """The seed's forward: cast the int8 weights to x.dtype, matmul, *then* scale, then add the bias."""
    out = F.linear(x, int8_weights.to(x.dtype)) * scales.to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


def w8a16_forward(x, int8_weights, scales, bias=None):
    """The fix, as `reference_linear`: dequantize in fp32, accumulate in fp32, round once to x.dtype."""
    weight = int8_weights.float() * scales.float()[:, None]
    return F.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)


def naive_overflows(x, int8_weights, scales):
    """Whether the seed's fp16 matmul ``x @ int8ᵀ`` (before the scales) leaves the fp16 range somewhere."""
    return bool((x.float() @ int8_weights.float().T).abs().max() > FP16_MAX)


# ------------------------------------------------------------------------------------------------ inputs


def _layer(gen: torch.Generator, n_in: int, n_out: int, std: float = 0.02) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = std * torch.randn(n_out, n_in, generator=gen)
    scales = w.abs().amax(-1) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales, 0.1 * torch.randn(n_out, generator=gen)


def outlier_case(seed: int = 7, n_in: int = 512, n_out: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp16 activations with a few large features, and weight rows whose codes reach ±127 on those features.

    The true outputs are modest (below 100), but ``x @ int8ᵀ`` — the seed's intermediate, before the scales shrink it
    — goes past fp16's 65504 on some rows. (Large activation features in a few channels are what LLM.int8()
    reported for large language models.)
    """
    gen = torch.Generator().manual_seed(seed)
    q, scales, bias = _layer(gen, n_in, n_out)
    x = torch.randn(4, n_in, generator=gen)
    hot = torch.arange(0, n_in, n_in // 8)[:8]  # 8 outlier features
    x[:, hot] = 100.0 * torch.sign(torch.randn(8, generator=gen))  # the same features, same signs, in every token
    q[: n_out // 4, hot] = (127 * torch.sign(x[0, hot])).to(torch.int8)  # rows that line up with them
    return x.half(), q, scales.half(), bias.half()


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    g, r = got.detach().float(), ref.float()
    return g.shape == r.shape and bool(((g - r).abs() <= tol * r.abs().max().clamp_min(1e-6) + 1e-6).all())


def _tensor(got: object, case: str) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise Failed(f"on {case} your function returned a {type(got).__name__}; return the output tensor.")
    return got


def _cast_hint(message: str) -> str:
    if "Char" in message or "int8" in message.lower() or "same dtype" in message:
        return (" F.linear needs both operands in one float dtype: cast the int8 weights first "
                "(int8_weights.to(x.dtype), or .float() for the fixed forward).")
    if "shapes cannot be multiplied" in message or "must match the size" in message:
        return (" W is (out, in) and F.linear(x, W) computes x @ Wᵀ; scales has one entry per *output* "
                "feature, so it multiplies the last dim of the output (or the rows of W: scales[:, None]).")
    return ""


def _call(fn, *args):
    try:
        return call(fn, *args)
    except Failed as err:
        hint = _cast_hint(str(err))
        raise Failed(f"{err}.{hint}" if hint else str(err)) from None


# ----------------------------------------------------------------------------------------- exercise 1


def _benign_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(701)
    q, s, b = _layer(gen, 48, 24)
    q2, s2, _ = _layer(gen, 32, 16)
    return [
        ("fp32, 3 rows", torch.randn(3, 48, generator=gen), q, s, b),
        ("bf16, a (2, 5, 48) batch", torch.randn(2, 5, 48, generator=gen).bfloat16(), q, s.bfloat16(), b.bfloat16()),
        ("fp16 with small activations, no bias", torch.randn(4, 32, generator=gen).half(), q2, s2.half(), None),
    ]


@exercise("The seed's forward", passed="matches the reference on 3 benign inputs (fp32, a bf16 batch, fp16 without bias).")
def check_naive_forward(fn):
    """``fn(x, int8_weights, scales, bias)``: ``F.linear(x, int8_weights.to(x.dtype)) * scales + bias``."""
    for case, x, q, s, b in _benign_cases():
        got = _tensor(_call(fn, x.clone(), q.clone(), s.clone(), None if b is None else b.clone()), case)
        ref = reference_linear(x, q, s, b)
        if got.shape != ref.shape:
            raise Failed(f"on {case} expected shape {tuple(ref.shape)} = (..., out_features), got {tuple(got.shape)}.")
        if _close(got, ref, x.dtype):
            continue
        if b is not None and _close(got, reference_linear(x, q, s), x.dtype):
            raise Failed(f"on {case} you forgot the bias: add it after scaling (it is in output units already).")
        if _close(got, F.linear(x.float(), q.float()), x.dtype):
            raise Failed(f"on {case} your output is x @ int8ᵀ with no scales: multiply by scales (one per output feature).")
        if _close(got, F.linear(x.float(), q.float()) / s.float() + (0 if b is None else b.float()), x.dtype):
            raise Failed(f"on {case} you divided by the scales: dequantizing *multiplies* the codes by their scale.")
        raise Failed(f"on {case} your output differs from the reference (x @ (int8 · scales[:, None])ᵀ + bias).")


# ----------------------------------------------------------------------------------------- exercise 2


def _fix_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(702)
    x, q, s, b = outlier_case()
    tq, _, tb = _layer(gen, 64, 32, std=1e-5)  # tiny weights: fp16 cannot hold their scales (~1e-7) accurately
    ts = (torch.rand(32, generator=gen) * 3e-7 + 1e-7)
    tx = torch.randn(3, 64, generator=gen).half() * 100
    q32, s32, b32 = _layer(gen, 40, 20)
    return [
        ("fp16 activations with outliers (the seed's forward gives inf here)", x, q, s, b),
        ("fp16, tiny fp32 scales (~1e-7, below fp16's normal range)", tx, tq, ts, None),
        ("a bf16 (2, 3, 40) batch", torch.randn(2, 3, 40, generator=gen).bfloat16(), q32, s32.bfloat16(), b32.bfloat16()),
        ("fp32", torch.randn(5, 40, generator=gen), q32, s32, b32),
    ]


@exercise("The fixed forward", passed="matches the reference on 4 cases: fp16 outliers (finite, where the seed gives inf), tiny scales, bf16, fp32.")
def check_forward(fn):
    """``fn(x, int8_weights, scales, bias)`` -> ``reference_linear(x, int8_weights, scales, bias)``."""
    for case, x, q, s, b in _fix_cases():
        got = _tensor(_call(fn, x.clone(), q.clone(), s.clone(), None if b is None else b.clone()), case)
        ref = reference_linear(x, q, s, b)
        if got.shape != ref.shape:
            raise Failed(f"on {case} expected shape {tuple(ref.shape)}, got {tuple(got.shape)}.")
        if torch.isfinite(ref).all() and not torch.isfinite(got).all():
            if not torch.isfinite(naive_forward(x, q, s, b)).all() and torch.equal(
                torch.isfinite(got), torch.isfinite(naive_forward(x, q, s, b))
            ):
                raise Failed(
                    f"on {case} your output has inf/NaN: you scaled *after* the matmul. x @ int8ᵀ is summed before "
                    "the scales shrink it, and here it passes fp16's 65504. Dequantize the weights first "
                    "(int8 · scales[:, None], in fp32) and do the matmul in fp32."
                )
            raise Failed(
                f"on {case} your output has inf/NaN where the true result is finite: some intermediate left the "
                "fp16 range. Do the arithmetic in fp32 and round to x.dtype only at the end."
            )
        if got.dtype != x.dtype:
            raise Failed(
                f"on {case} your output is {str(got.dtype).removeprefix('torch.')}, the input "
                f"{str(x.dtype).removeprefix('torch.')}: a layer returns its input's dtype — round once, at the end, "
                "with .to(x.dtype)."
            )
        if _close(got, ref, x.dtype):
            continue
        if b is not None and _close(got, reference_linear(x, q, s), x.dtype):
            raise Failed(f"on {case} you forgot the bias: add it (in fp32) to the matmul's result.")
        if s.dtype == torch.float32 and x.dtype == torch.float16 and _close(got, reference_linear(x, q, s.half()), x.dtype):
            raise Failed(
                f"on {case} your scales were rounded to fp16 first: ~1e-7 is below fp16's normal range, so they lose "
                "most of their digits. Dequantize in fp32: int8_weights.float() * scales.float()[:, None]."
            )
        raise Failed(
            f"on {case} your output differs from the reference: dequantize in fp32 (int8 · scales[:, None]), "
            "F.linear in fp32 with the bias, then .to(x.dtype)."
        )


# ----------------------------------------------------------------------------------------- exercise 3


def _overflow_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
    gen = torch.Generator().manual_seed(703)
    x, q, s, _ = outlier_case()
    q2, s2, _ = _layer(gen, 256, 16)
    big = torch.full((2, 256), 400.0).half()  # each product ≤ 400·127 = 50800 < 65504, their sum is not
    q3 = torch.full((16, 256), 127, dtype=torch.int8)
    q4 = q3.clone()
    q4[:, 1::2] = -127  # signs alternate: the sum cancels to 0
    return [
        ("small fp16 activations", torch.randn(3, 256, generator=gen).half(), q2, s2.half(), False),
        ("fp16 activations with outliers (notebook section 3)", x, q, s, True),
        ("|x| = 400 everywhere, codes all +127", big, q3, torch.full((16,), 1e-4).half(), True),
        ("|x| = 400 everywhere, codes alternating ±127", big, q4, torch.full((16,), 1e-4).half(), False),
    ]


@exercise("Predict the overflow", passed="right on 4 cases, including one where each product fits and their sum does not.")
def check_naive_overflows(fn):
    """``fn(x, int8_weights, scales)`` -> True exactly when the seed's ``x @ int8ᵀ`` exceeds fp16's range."""
    for case, x, q, s, want in _overflow_cases():
        got = _call(fn, x.clone(), q.clone(), s.clone())
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = bool(got.item())
        if not isinstance(got, bool):
            raise Failed(f"your function returned a {type(got).__name__}; return True or False (bool(...) of a one-element tensor).")
        if got == want:
            continue
        if want and "outliers" in case:
            raise Failed(
                f"on {case} you said no overflow. The final output is small, but the seed computes x @ int8ᵀ "
                "*before* multiplying by the scales: look at that intermediate, in fp32, against 65504 — one product "
                "(≤ |x|·127) fits easily; the sum of in_features of them is what overflows."
            )
        if want and "all +127" in case:
            raise Failed(
                f"on {case} you said no overflow: every single product fits (400·127 = 50800), but the matmul sums "
                "256 of them. Compute the whole x @ int8ᵀ (in fp32) and compare its largest |value| with 65504."
            )
        if not want and "alternating" in case:
            raise Failed(
                f"on {case} you said overflow: Σ|x|·|q| is a bound, but here the signs cancel and x @ int8ᵀ is 0. "
                "Compute the actual product (in fp32), not a bound."
            )
        raise Failed(f"on {case} you said {got}, the answer is {want}: compare (x.float() @ int8.float().T).abs().max() with 65504.")


# ------------------------------------------------------------------------------------------------- quiz

QUIZ = Quiz("07", [
    Question(
        "The seed computes F.linear(x, int8.to(x.dtype)) * scales in fp16. Where can it overflow?",
        ("in the cast of the int8 codes to fp16", "in x @ int8ᵀ, before the scales shrink the sums",
         "in the multiplication by the scales"),
        "b",
        "The codes (≤ 127) are exact in fp16, and the scales only make numbers smaller; the sums of x · code, "
        "up to ~127× the true output, are what can pass 65504.",
        {"a": "every integer up to 2048 is exact in fp16; 127 is no problem.",
         "c": "the scales are small (≈ max|w| / 127): multiplying by them makes values smaller, not larger."},
    ),
    Question(
        "Why does the fixed forward compute in fp32 and round to x.dtype once, at the end?",
        ("fp32 is faster than fp16 on every machine", "so that neither the partial sums nor tiny scales leave the "
         "range or precision of a 16-bit format; one rounding at the end is the least error",
         "because int8 weights can only be multiplied in fp32"),
        "b",
        "fp32 has 8 exponent bits like bf16 and 24 bits of precision: sums and ~1e-7 scales are safe, and the "
        "result is rounded to the activation dtype only once.",
        {"a": "speed is not the reason (and it is not true on GPUs with fast fp16); accuracy is.",
         "c": "int8 codes convert exactly to fp16 and bf16 too; the problem is the range of the sums."},
    ),
    Question(
        "A bias is stored per output feature. When do you add it?",
        ("after the weights are dequantized and multiplied, in output units", "to the int8 codes before the matmul",
         "it is already folded into the scales"),
        "a",
        "The bias is in the output's units: add it to x @ Ŵᵀ (in fp32, in the fixed forward).",
        {"b": "the codes are weights (out, in); the bias has one value per output, added to the result.",
         "c": "scales multiply; a bias adds — it cannot be folded into a multiplication."},
    ),
])
