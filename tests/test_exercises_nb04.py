"""Exercise checks of notebook 04: the reference passes, typical mistakes get their hint, a stub is 'not attempted'."""

from __future__ import annotations

from exercise_helpers import fails_with
from torch import nn

from w8a16 import Quantizer, W8A16LinearLayer, footprint_bytes
from w8a16.course.exercises import nb04


def stub(*args, **kwargs):
    raise NotImplementedError


# ---- share of parameters --------------------------------------------------------------------------------------------


def conv_linear_share(model):
    total = sum(p.numel() for p in model.parameters())
    conv = sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())
    linear = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return conv / total, linear / total


def recursive_counting(model):
    """Counts every module's parameters recursively, so containers count their children again."""
    total = sum(p.numel() for p in model.parameters())
    conv = linear = 0
    for module in model.modules():
        n = sum(p.numel() for p in module.parameters())
        has_conv = any(isinstance(m, nn.Conv2d) for m in module.modules())
        has_linear = any(isinstance(m, nn.Linear) for m in module.modules())
        conv += n if has_conv and not has_linear else 0
        linear += n if has_linear and not has_conv else 0
    return conv / total, linear / total


def weights_only(model):
    total = sum(p.numel() for p in model.parameters())
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return conv / total, linear / total


def conv_and_linear_only_denominator(model):
    conv, linear = conv_linear_share(model)
    return conv / (conv + linear), linear / (conv + linear)


def test_share_reference_passes():
    assert nb04.check_conv_linear_share(conv_linear_share)


def test_share_recursive_counting_gets_the_recurse_hint():
    fails_with(nb04.check_conv_linear_share, recursive_counting, "recurse=False")


def test_share_weights_only_gets_the_bias_hint():
    fails_with(nb04.check_conv_linear_share, weights_only, "biases")


def test_share_wrong_denominator_and_percentages():
    fails_with(nb04.check_conv_linear_share, conv_and_linear_only_denominator, "all the model's parameters")
    fails_with(nb04.check_conv_linear_share, lambda m: tuple(100 * s for s in conv_linear_share(m)), "percentages")
    fails_with(nb04.check_conv_linear_share, lambda m: conv_linear_share(m)[::-1], "swapped")


def test_share_stub(capsys):
    assert nb04.check_conv_linear_share(stub).status == "not attempted"
    assert capsys.readouterr().out.startswith("○")


# ---- quantize and measure -------------------------------------------------------------------------------------------


def quantize_and_measure(model):
    before = footprint_bytes(model)
    Quantizer(model, W8A16LinearLayer)
    return before, footprint_bytes(model)


def measured_after_only(model):
    Quantizer(model, W8A16LinearLayer)
    return footprint_bytes(model), footprint_bytes(model)


def parameters_only(model):
    def size(m):
        return sum(p.numel() * p.element_size() for p in m.parameters())

    before = size(model)
    Quantizer(model, W8A16LinearLayer)
    return before, size(model)


def counts_values(model):
    def values(m):
        return sum(t.numel() for t in [*m.parameters(), *m.buffers()])

    before = values(model)
    Quantizer(model, W8A16LinearLayer)
    return before, values(model)


def test_measure_reference_passes():
    assert nb04.check_quantize_and_measure(quantize_and_measure)


def test_measure_after_only_gets_the_order_hint():
    fails_with(nb04.check_quantize_and_measure, measured_after_only, "before quantizing")


def test_measure_parameters_only_gets_the_buffers_hint():
    fails_with(nb04.check_quantize_and_measure, parameters_only, "buffers")


def test_measure_values_not_bytes_and_exclusions():
    fails_with(nb04.check_quantize_and_measure, counts_values, "element_size")

    def keeps_last(model):
        before = footprint_bytes(model)
        last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
        Quantizer(model, W8A16LinearLayer, last)
        return before, footprint_bytes(model)

    fails_with(nb04.check_quantize_and_measure, keeps_last, "still an nn.Linear")


def test_measure_stub():
    assert nb04.check_quantize_and_measure(stub, quiet=True).status == "not attempted"
