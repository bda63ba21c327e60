"""transformers integration: ``quantization_config=W8A16Config(...)`` in ``from_pretrained``, and back out through
``save_pretrained``.

    model = AutoModelForCausalLM.from_pretrained(path_or_id, quantization_config=W8A16Config(exclude=["lm_head"]),
                                                 dtype=torch.bfloat16)   # quantized layer by layer while loading
    model.save_pretrained(d)                                             # int8 safetensors + quantization_config
    AutoModelForCausalLM.from_pretrained(d)                              # after `import w8a16`: the same model

transformers lets a third-party package register a quantization method (`register_quantization_config`,
`register_quantizer`); this module is what w8a16 registers under the name ``"w8a16"``. Importing it costs about a
second (transformers' quantizer package), so ``import w8a16`` does not: `w8a16.io.hf_hook` registers it the moment
transformers loads its quantizers, which ``from_pretrained`` always does first.

How loading works, for a model that is not quantized yet:

1. `W8A16HfQuantizer._process_model_before_weight_loading` sees the model skeleton on the ``meta`` device and asks
   the walker (`quantize_model`) which Linear layers it would replace: the same rules as
   ``Quantizer(model, W8A16LinearLayer, exclude)`` (exclusions, tied weights, MultiheadAttention...), so the two
   ways give bit-identical models. Nothing is replaced yet: the loader needs each Linear's ``weight`` key to exist.
2. For each planned ``<layer>.weight`` in the checkpoint, transformers reads that one tensor (in the requested
   dtype) and hands it to `QuantizeOnLoad`, which swaps an empty `W8A16LinearLayer` into the model and returns
   its ``int8_weights`` and ``scales``. The float tensor is dropped right after: peak memory is the quantized
   model plus about one float layer, never the float model.
3. After loading, the config records exactly which modules hold W8A16 layers (``modules``), so a saved model is
   rebuilt layer for layer.

A saved model (``quantization_config`` with ``"quant_method": "w8a16"`` in config.json) loads the same way minus
step 2: the recorded modules become empty W8A16 layers before loading and their int8 tensors are read as they are.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
# From the submodules, not `transformers.quantizers`: registration may run while that package is still importing.
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import quant
from .. import quantizer as walker
from ..layer import W8A16Conv2d, W8A16LinearLayer, linear_weight, quantize_rows
from ..quantizer import QuantizationReport, footprint_bytes, is_linear_like

QUANT_METHOD = "w8a16"
FORMAT_VERSION = 1
_MAX_NAMES = 1_000_000  # a config listing more modules than this is not a model, it is a denial of service
_MAX_NAME_LEN = 1_000
_QUANTIZED = (W8A16LinearLayer, W8A16Conv2d)
_SAFETENSORS_CODES = {torch.int8: "I8", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class W8A16Config(QuantizationConfigMixin):
    """The ``quantization_config`` for W8A16: int8 weights, one absmax/127 scale per output channel.

    Args:
        exclude: layer names or globs to keep in full precision, as in ``Quantizer(model, W8A16LinearLayer,
            exclude)`` (``["lm_head"]``, ``"model.layers.*.mlp.gate"``).
        quantize_tied: quantize a Linear whose weight is tied to another module (an lm_head tied to the
            embeddings) anyway, untying the pair; off by default, as in `Quantizer`.
        conv2d: also quantize every `nn.Conv2d` (as `W8A16Conv2d`), as
            ``Quantizer(model, [W8A16LinearLayer, W8A16Conv2d], exclude)`` does: for vision models (DETR, ResNet).
        modules: written by w8a16, not by hand: the modules that hold W8A16 layers in a saved model. ``None``
            (a config that has not been used to load yet) means "whatever the rules above choose".
    """

    def __init__(
        self,
        exclude: Iterable[str] | str | None = None,
        quantize_tied: bool = False,
        modules: list[str] | None = None,
        conv2d: bool = False,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ValueError(f"W8A16Config: unknown field(s) {sorted(unknown)[:5]} (a config from a newer w8a16?)")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"W8A16Config: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if type(format_version) is not int or format_version != FORMAT_VERSION:
            raise ValueError(f"W8A16Config: format_version {format_version!r} is not supported (this w8a16 reads "
                             f"version {FORMAT_VERSION})")
        for field, value in (("quantize_tied", quantize_tied), ("conv2d", conv2d)):
            if type(value) is not bool:
                raise ValueError(f"W8A16Config: {field} must be true or false, got {value!r}")
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        # layer name -> ErrorStats, filled while loading if set to a dict (the CLI does); never written to a file
        self.error_stats: dict[str, quant.ErrorStats] | None = None
        self.exclude = _names([exclude] if isinstance(exclude, str) else exclude, "exclude")
        self.quantize_tied = quantize_tied
        self.conv2d = conv2d
        self.modules = None if modules is None else _names(modules, "modules")

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "exclude": list(self.exclude),
            "quantize_tied": self.quantize_tied,
            "conv2d": self.conv2d,
            "modules": None if self.modules is None else list(self.modules),
        }


def _names(value: Any, field: str) -> list[str]:
    """A list of module names from a config (user input or a file): refuse anything else, naming the field."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"W8A16Config: {field} must be a list of module names, got {type(value).__name__}")
    names = list(value)
    if len(names) > _MAX_NAMES:
        raise ValueError(f"W8A16Config: {field} lists {len(names)} names, more than any model has")
    for name in names:
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME_LEN:
            raise ValueError(f"W8A16Config: {field} must hold non-empty module names, got {name!r:.80}")
    return names


class _WeightSlot:
    """An empty (``meta``) W8A16 layer that, while the model loads, still lists a float ``weight`` in its state dict.

    transformers loads only the keys of the model's state dict, so a layer about to be quantized must still offer
    ``<layer>.weight`` for the checkpoint's tensor to reach `QuantizeOnLoad`; the int8 buffers are listed too, so
    the loader places them (memory, or disk under a ``device_map`` with ``offload_buffers``) like any buffer.
    Once its weight is converted, the slot becomes the plain quantized class (``quantized``).
    """

    quantized: type[nn.Module]

    def float_weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = torch.empty(self.float_weight_shape(), dtype=self.scales.dtype,
                                                     device="meta")


class FloatWeightSlot(_WeightSlot, W8A16LinearLayer):
    """The slot of a Linear (or transformers Conv1D, whose checkpoint holds the weight as ``(in, out)``)."""

    quantized = W8A16LinearLayer
    transposed = False

    @classmethod
    def from_linear(cls, linear: nn.Module, *, method: str = "absmax") -> "FloatWeightSlot":
        out_features, in_features = linear_weight(linear).shape
        slot = cls(in_features, out_features, bias=linear.bias is not None, dtype=linear.weight.dtype, device="meta")
        slot.transposed = not isinstance(linear, nn.Linear)
        return slot

    def float_weight_shape(self) -> tuple[int, ...]:
        return (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)


class ConvWeightSlot(_WeightSlot, W8A16Conv2d):
    """The slot of an `nn.Conv2d`."""

    quantized = W8A16Conv2d

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, *, method: str = "absmax") -> "ConvWeightSlot":
        return cls.empty_like(conv)

    def float_weight_shape(self) -> tuple[int, ...]:
        return tuple(self.int8_weights.shape)


class QuantizeOnLoad(ConversionOps):
    """``<layer>.weight`` (float, as read from the checkpoint) -> ``<layer>.int8_weights`` and ``<layer>.scales``,
    computed exactly as `W8A16LinearLayer.from_linear` does; transformers then sets or offloads them."""

    def __init__(self, hf_quantizer: "W8A16HfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, full_layer_name: str | None = None,
                missing_keys: set[str] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        (key, value), = input_dict.items()
        weight = value[0] if isinstance(value, list) else value
        name = key.rpartition(".")[0]
        slot = model.get_submodule(name)
        if not isinstance(slot, _WeightSlot):
            raise ValueError(f"W8A16: {key!r} was to be quantized while loading, but {name!r} is a "
                             f"{type(slot).__name__}")
        if getattr(slot, "transposed", False):
            weight = weight.t()
        # Rows as the quantized layer quantizes them: a Linear's rows, or a convolution's flattened filters.
        rows = weight.reshape(weight.shape[0], -1)
        try:
            int8_weights, scales = quantize_rows(rows, slot.scales.dtype)
        except ValueError as err:
            raise ValueError(f"cannot quantize layer {name!r} while loading: {err}") from err
        stats = self.hf_quantizer.quantization_config.error_stats
        if stats is not None:
            stats[name] = quant.error_stats(rows, int8_weights, scales)
        slot.__class__ = slot.quantized  # converted: from now on an ordinary quantized layer
        slot.__dict__.pop("transposed", None)
        int8_weights = int8_weights.reshape(slot.int8_weights.shape).contiguous()
        if missing_keys is not None:
            missing_keys.discard(key)
        return {f"{name}.int8_weights": int8_weights, f"{name}.scales": scales}


def _swap_in_shell(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace a Linear-like module or a Conv2d (on ``meta``) by an empty W8A16 layer of its shape, dtype, bias."""
    if isinstance(module, nn.Conv2d):
        shell: nn.Module = W8A16Conv2d.empty_like(module)
    elif is_linear_like(module):
        out_features, in_features = linear_weight(module).shape
        shell = W8A16LinearLayer(in_features, out_features, bias=module.bias is not None, dtype=module.weight.dtype,
                                 device="meta")
    else:
        raise ValueError(f"W8A16: module {name!r} is a {type(module).__name__}, not a Linear or Conv2d layer to hold "
                         "int8 weights (does the quantization_config's 'modules' list belong to this model?)")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, shell)


class W8A16HfQuantizer(HfQuantizer):
    """transformers' side of W8A16: choose the layers, quantize them while loading, and describe the result."""

    requires_calibration = False

    def __init__(self, quantization_config: W8A16Config, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.report: QuantizationReport | None = None  # the walk that chose the layers (when quantizing on load)
        self.read: set[str] = set()  # the tensors read from a pre-quantized checkpoint

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and any(str(d).startswith("mps") for d in device_map.values()):
            raise ValueError("W8A16: the mps device has no int8 matmul path here; use the CPU or a CUDA GPU")

    @property
    def quantized_element_size(self) -> float:
        return 1.0  # int8: for transformers' device_map arithmetic

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        name, _, tensor = param_name.rpartition(".")
        if self.pre_quantized or tensor != "weight":
            return False
        return isinstance(model.get_submodule(name), _WeightSlot)

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        """The dtype a checkpoint tensor is read in. transformers would cast a float tensor into an int8 buffer
        (truncating it) and leave an integer one where float scales belong: a damaged file must fail instead."""
        target = (getattr(converter, "target_patterns", None) or [""])[0]
        self.read.add(target)
        stored = param.get_dtype() if hasattr(param, "get_dtype") else _SAFETENSORS_CODES.get(param.dtype, "?")
        if target.endswith(".int8_weights") and stored != "I8":
            raise ValueError(f"W8A16: {target} must be stored as int8 (I8), the checkpoint has {stored}")
        if target.endswith((".scales", ".bias")) and dtype is not None and dtype.is_floating_point \
                and not stored.startswith(("F", "BF")):
            raise ValueError(f"W8A16: {target} must be stored as floating point, the checkpoint has {stored}")
        return super().get_new_dtype(converter, param, dtype)

    def get_quantize_ops(self) -> QuantizeOnLoad:
        return QuantizeOnLoad(self)

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        config = self.quantization_config
        # save_quantized also stores non-persistent buffers (rotary tables...), which from_pretrained rebuilds
        model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()),
                                                    r"^w8a16:nonpersistent/"}
        if self.pre_quantized and config.modules is not None:
            modules = dict(model.named_modules())
            for name in config.modules:
                if name not in modules:
                    raise ValueError(f"W8A16: the quantization_config lists module {name!r}, which this "
                                     f"{type(model).__name__} does not have")
                _swap_in_shell(model, name, modules[name])
        else:  # the walker chooses, as Quantizer(model, W8A16LinearLayer, exclude) would on the float model
            if not self.pre_quantized and config.quantize_tied:
                raise ValueError("W8A16Config(quantize_tied=True) cannot quantize while loading (a tied weight is "
                                 "stored once, under the other module's name): load the model, then "
                                 "Quantizer(model, W8A16LinearLayer, exclude, quantize_tied=True)")
            _tie_on_meta(model)
            targets = [W8A16LinearLayer, W8A16Conv2d] if self.pre_quantized else [FloatWeightSlot, ConvWeightSlot]
            targets = targets if config.conv2d else targets[:1]
            self.report = walker.quantize_model(model, targets, config.exclude, quantize_tied=config.quantize_tied)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        left = [n for n, m in model.named_modules() if isinstance(m, _WeightSlot)]
        if left:
            raise ValueError(f"W8A16: the checkpoint has no weight for {len(left)} layer(s) to quantize, e.g. "
                             f"{left[0]!r}")
        if self.pre_quantized:  # else transformers would leave uninitialised memory in the int8 buffers
            for name in self.quantization_config.modules or []:
                missing = [t for t in ("int8_weights", "scales") if f"{name}.{t}" not in self.read]
                if missing:
                    raise ValueError(f"W8A16: config.json lists {name!r} as a W8A16 layer, but the checkpoint has no "
                                     f"{name}.{missing[0]} (a float checkpoint with another model's "
                                     "quantization_config?)")
        for name, layer in model.named_modules():
            scales = getattr(layer, "scales", None) if isinstance(layer, _QUANTIZED) else None
            if scales is not None and not scales.is_meta and not torch.isfinite(scales).all():  # meta: offloaded
                raise ValueError(f"W8A16: {name}.scales holds NaN or Inf (a damaged checkpoint?)")
        describe(model, self.quantization_config, self.report, own_config=False)  # from_pretrained copied it
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize()``: each W8A16 layer back to an `nn.Linear` holding ``int8 * scales`` (the
        quantization error stays; the memory saving goes). transformers then drops the quantization_config."""
        for name, layer in list(model.named_modules()):
            if not isinstance(layer, _QUANTIZED):
                continue
            weight = layer.dequantized_weight(dtype)
            if isinstance(layer, W8A16Conv2d):
                float_layer: nn.Module = nn.Conv2d(
                    layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                    layer.dilation, layer.groups, bias=layer.bias is not None, padding_mode=layer.padding_mode,
                    device=weight.device, dtype=weight.dtype)
            else:
                float_layer = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                        device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                float_layer.weight.copy_(weight)
                if layer.bias is not None:
                    float_layer.bias.copy_(layer.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, float_layer)
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # gradients flow to the input and to a trainable bias (LoRA/BitFit on a frozen int8 base)

    @property
    def is_compileable(self) -> bool:
        return True


def _tie_on_meta(model: nn.Module) -> None:
    """Share the meta parameters transformers will tie after loading (an lm_head and the input embeddings), so
    that the walker sees the tie and keeps such a Linear, as `Quantizer` does on the loaded float model."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        owner, _, attr = target.rpartition(".")
        try:
            setattr(model.get_submodule(owner) if owner else model, attr, model.get_parameter(source))
        except (AttributeError, KeyError):  # a mapping this model does not follow: transformers will report it
            pass


def _untie_quantized(model: nn.Module, quantized: set[str]) -> None:
    """A tied Linear quantized anyway (``quantize_tied=True``) is no longer tied: say so in the config, or
    transformers would try to tie an int8 layer to the embeddings again when the saved model loads."""
    ties = dict(getattr(model, "all_tied_weights_keys", None) or {})
    untied = {t for t, s in ties.items() if {t.rpartition(".")[0], s.rpartition(".")[0]} & quantized}
    if not untied:
        return
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    model.all_tied_weights_keys = {t: s for t, s in ties.items() if t not in untied}


def _own_config(model: nn.Module) -> None:
    """Give the model a config of its own before changing it. One config object is often shared by several models
    (``config = ...; a = Model(config); b = Model(config)``): quantizing one must not mark the others quantized."""
    memo: dict[int, Any] = {}
    copy.deepcopy(model.config, memo)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and isinstance(memo.get(id(config)), type(config)):
            module.config = memo[id(config)]


def describe(model: nn.Module, config: W8A16Config | None = None, report: QuantizationReport | None = None,
             own_config: bool = True) -> None:
    """Record on a transformers model what holds W8A16 layers, so `save_pretrained` writes a config that
    `from_pretrained` rebuilds exactly: ``config.quantization_config`` and ``model.hf_quantizer``."""
    names = [n for n, m in model.named_modules() if isinstance(m, _QUANTIZED)]
    if own_config:
        _own_config(model)
    if config is None:
        config = getattr(model.config, "quantization_config", None)
        config = config if isinstance(config, W8A16Config) else W8A16Config()
    config.modules = names
    model.config.quantization_config = config
    _untie_quantized(model, set(names))
    if getattr(model, "hf_quantizer", None) is None:
        model.hf_quantizer = W8A16HfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    if report is not None:
        report.bytes_after = footprint_bytes(model)
        model.w8a16_report = report


def _after_quantizer(model: nn.Module, report: QuantizationReport, exclude: list[str], quantize_tied: bool) -> None:
    """`Quantizer` on a transformers model: make ``save_pretrained`` keep the W8A16 layers."""
    from transformers import PreTrainedModel

    layers = [m for m in model.modules() if isinstance(m, _QUANTIZED)]
    if isinstance(model, PreTrainedModel) and layers and not any(isinstance(m, _WeightSlot) for m in layers):
        old = getattr(model.config, "quantization_config", None)
        if old is not None and not isinstance(old, W8A16Config):
            warnings.warn(f"Quantizer: {type(model).__name__} already had a quantization_config of another method "
                          f"({getattr(old, 'quant_method', old)!r}); it is replaced by W8A16's", stacklevel=4)
            old = None
        conv2d = any(isinstance(m, W8A16Conv2d) for m in layers)
        new = W8A16Config(exclude=exclude, quantize_tied=quantize_tied, conv2d=conv2d)
        describe(model, copy.deepcopy(old) if old is not None else new)


def register() -> None:
    """Make ``"w8a16"`` a quantization method transformers knows (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(W8A16Config)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(W8A16HfQuantizer)
    if _after_quantizer not in walker.after_quantize:
        walker.after_quantize.append(_after_quantizer)


register()
