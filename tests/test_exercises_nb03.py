"""Exercise checks of notebook 03: the reference passes, typical mistakes get their hint, a stub is 'not attempted'."""

from __future__ import annotations

import torch
from exercise_helpers import fails_with
from torch import nn

from w8a16 import W8A16LinearLayer, footprint_bytes
from w8a16.course.exercises import nb03


def stub(*args, **kwargs):
    raise NotImplementedError


# ---- the walker -----------------------------------------------------------------------------------------------------


def replace_linear(model, target_class, exclude):
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            if name not in exclude:
                setattr(model, name, target_class.from_linear(child))
        else:
            replace_linear(child, target_class, exclude)
    return model


def replace_in_place_returning_none(model, target_class, exclude):
    replace_linear(model, target_class, exclude)


def top_level_only(model, target_class, exclude):
    for name, child in model.named_children():
        if isinstance(child, nn.Linear) and name not in exclude:
            setattr(model, name, target_class.from_linear(child))
    return model


def ignores_exclusions(model, target_class, exclude):
    return replace_linear(model, target_class, [])


def fresh_layers(model, target_class, exclude):
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            if name not in exclude:
                setattr(model, name, target_class(child.in_features, child.out_features, bias=child.bias is not None,
                                                  dtype=child.weight.dtype))
        else:
            fresh_layers(child, target_class, exclude)
    return model


def full_name_exclusions(model, target_class, exclude):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name not in exclude:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, target_class.from_linear(module))
    return model


def test_walker_reference_passes():
    assert nb03.check_replace_linear(replace_linear)
    assert nb03.check_replace_linear(replace_in_place_returning_none)


def test_walker_top_level_only_gets_the_recursion_hint():
    fails_with(nb03.check_replace_linear, top_level_only, "only top-level children")


def test_walker_ignoring_exclusions_gets_the_exclusion_hint():
    fails_with(nb03.check_replace_linear, ignores_exclusions, "excludes it")


def test_walker_matching_full_names_gets_the_child_name_hint():
    fails_with(nb03.check_replace_linear, full_name_exclusions, "child name")


def test_walker_fresh_layers_get_the_from_linear_hint():
    fails_with(nb03.check_replace_linear, fresh_layers, "from_linear")


def test_walker_doing_nothing_and_crashing():
    fails_with(nb03.check_replace_linear, lambda m, c, e: m, "no layer was replaced")
    fails_with(nb03.check_replace_linear, lambda m, c, e: 1 / 0, "ZeroDivisionError")


def test_walker_stub_is_not_attempted(capsys):
    verdict = nb03.check_replace_linear(stub)
    assert verdict.status == "not attempted"
    assert capsys.readouterr().out.startswith("○")


# ---- bytes of one layer ---------------------------------------------------------------------------------------------


def nbytes(dtype):
    return torch.empty((), dtype=dtype).element_size()


def layer_bytes(out_features, in_features, bias, dtype):
    size = nbytes(dtype)
    return out_features * in_features + out_features * size + (out_features * size if bias else 0)


def test_layer_bytes_reference_passes_and_matches_the_real_layer():
    assert nb03.check_w8a16_layer_bytes(layer_bytes)
    assert layer_bytes(7, 5, True, torch.bfloat16) == footprint_bytes(W8A16LinearLayer(5, 7, dtype=torch.bfloat16))


def test_layer_bytes_everything_one_byte():
    verdict = nb03.check_w8a16_layer_bytes(lambda o, i, b, d: o * i + o + (o if b else 0), quiet=True)
    assert verdict.status == "failed" and "1 byte each" in verdict.message and "scales" in verdict.message


def test_layer_bytes_forgot_bias():
    fails_with(nb03.check_w8a16_layer_bytes, lambda o, i, b, d: o * i + o * nbytes(d), "forgot the bias")


def test_layer_bytes_original_size():
    fails_with(nb03.check_w8a16_layer_bytes, lambda o, i, b, d: (o * i + (o if b else 0)) * nbytes(d), "original nn.Linear")


def test_layer_bytes_stub():
    assert nb03.check_w8a16_layer_bytes(stub, quiet=True).status == "not attempted"


# ---- whole-model footprint ------------------------------------------------------------------------------------------


def expected_footprint(model, exclude):
    total = footprint_bytes(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in exclude:
            w = module.weight
            total -= footprint_bytes(module)
            total += layer_bytes(module.out_features, module.in_features, module.bias is not None, w.dtype)
    return total


def only_quantized_layers(model, exclude):
    return sum(
        layer_bytes(m.out_features, m.in_features, m.bias is not None, m.weight.dtype)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in exclude
    )


def test_expected_footprint_reference_passes():
    assert nb03.check_expected_footprint(expected_footprint)


def test_expected_footprint_only_linear_layers():
    fails_with(nb03.check_expected_footprint, only_quantized_layers, "rest of the model")


def test_expected_footprint_ignoring_exclusions():
    fails_with(nb03.check_expected_footprint, lambda m, e: expected_footprint(m, []), "excluded layers")


def test_expected_footprint_quantizing_the_model_is_caught():
    from w8a16 import quantize_model

    def cheat(model, exclude):
        return quantize_model(model, W8A16LinearLayer, exclude).bytes_after

    fails_with(nb03.check_expected_footprint, cheat, "do not change it")


def test_expected_footprint_stub():
    assert nb03.check_expected_footprint(stub, quiet=True).status == "not attempted"
