"""Exercise checks of notebook 08: the references pass, typical wrong answers get their matching hint."""

from __future__ import annotations

import pytest
import torch

from w8a16 import quant
from w8a16.course.exercises import nb08

from exercise_helpers import fails_with, stub


def test_mse_scales_reference_passes():
    verdict = nb08.check_mse_scales(nb08.mse_scales, quiet=True)
    assert verdict, verdict


def test_a_plain_loop_solution_passes():
    def loop(w, bits):
        q = 2 ** (bits - 1) - 1
        out = []
        for row in w.float():
            amax, best, best_err = row.abs().max(), None, None
            for k in range(51):
                s = amax * (1 - k / 100) / q
                deq = torch.round(row / s).clamp(-q, q) * s if s > 0 else torch.zeros_like(row)
                err = (row - deq).pow(2).sum()
                if best_err is None or err < best_err:
                    best, best_err = s, err
            out.append(best)
        return torch.stack(out)

    verdict = nb08.check_mse_scales(loop, quiet=True)
    assert verdict, verdict


def _no_clamp(w, bits):
    q, w = quant.q_max(bits), w.float()
    amax = w.abs().amax(-1)
    best, best_err = amax / q, None
    for r in quant.MSE_RATIOS:
        s = amax * r / q
        safe = torch.where(s == 0, torch.ones_like(s), s)[:, None]
        err = (w - torch.round(w / safe) * safe).pow(2).sum(-1)  # no clamp: nothing saturates
        best = torch.where(err < best_err, s, best) if best_err is not None else s
        best_err = err if best_err is None else torch.minimum(err, best_err)
    return best


def _grid_without_one(w, bits):
    q, w = quant.q_max(bits), w.float()
    amax = w.abs().amax(-1)
    s = amax * 0.9 / q  # a fixed clip, never absmax
    return s


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (stub, None),
        (lambda w, b: quant.per_channel_scales(w, bits=8, method="mse"), "not 127"),
        (lambda w, b: quant.per_tensor_scale(w), "one scale for the whole matrix"),
        (lambda w, b: quant.per_channel_scales(w, bits=b, method="mse") * (w.abs().amax(-1) / w.abs().amax(-1)),
         "NaN"),
        (lambda w, b: torch.full((w.shape[0],), 0.9), "clipping ratios"),
        (_no_clamp, "clamp round(W/s)"),
        (_grid_without_one, "include r = 1.00"),
        (lambda w, b: quant.per_channel_scales(w, bits=b, method="mse")[:-1], "one per row"),
        (lambda w, b: "scales", "return a tensor"),
    ],
    ids=["stub", "q-127-at-4-bits", "per-tensor", "nan-on-zero-row", "ratios", "no-clamp", "no-absmax-candidate",
         "wrong-shape", "not-a-tensor"],
)
def test_mse_scales_wrong_answers_get_their_hint(wrong, hint):
    if hint is None:
        assert nb08.check_mse_scales(wrong, quiet=True).status == "not attempted"
    else:
        fails_with(nb08.check_mse_scales, wrong, hint)


def test_fake_quant_ste_reference_passes():
    verdict = nb08.check_fake_quant_ste(nb08.fake_quant_ste, quiet=True)
    assert verdict, verdict


def _plain_round(w, bits):
    s = quant.per_channel_scales(w.detach(), bits=bits)[:, None]
    q = quant.q_max(bits)
    return torch.round(w / s).clamp(-q, q) * s  # zero gradient


def _through_the_scale(w, bits):
    q = quant.q_max(bits)
    s = (w.abs().amax(-1) / q)[:, None]  # not detached
    safe = torch.where(s == 0, torch.ones_like(s), s)
    r = w / safe
    return (r + (torch.round(r).clamp(-q, q) - r).detach()) * s


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (_plain_round, "zero gradient"),
        (_through_the_scale, "flows through the scale"),
        (lambda w, b: nb08.fake_quant_ste(w, 8), "forward values"),
        (lambda w, b: nb08.fake_quant_ste(w, b).detach(), "does not require grad"),
        (lambda w, b: nb08.fake_quant_ste(w, b)[:1], "weight's shape"),
    ],
    ids=["plain-round", "grad-through-scale", "always-8-bits", "detached", "wrong-shape"],
)
def test_fake_quant_ste_wrong_answers_get_their_hint(wrong, hint):
    fails_with(nb08.check_fake_quant_ste, wrong, hint)
