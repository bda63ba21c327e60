"""The two real models of the course, loaded the real way when the hub is reachable — and honestly not otherwise.

    from w8a16.models import load_codegen, load_detr
    loaded = load_codegen()              # Salesforce/codegen-350M-mono in bf16
    print(loaded)                        # what was loaded, with a loud banner if the weights are random
    model = loaded.model

Both loaders try ``from_pretrained`` first. When the Hugging Face hub cannot be reached (``HF_HUB_OFFLINE=1``,
CI, an air-gapped machine) and the model is not in the local cache, they build the *same architecture* from a
config shipped with this package (``w8a16/course/configs/*.json``, the real models' values) and fill it with seeded
random weights. Shapes, parameter counts, footprints and timings are then real; the model's *outputs* are
meaningless, and the loader prints a banner that says so. A random-weight model is never presented as the
real one: check ``loaded.is_pretrained`` before interpreting an output.

`LoadedModel` is a small dataclass: ``.model`` (in eval mode), ``.tokenizer`` / ``.processor`` (``None``
when offline), ``.is_pretrained``, ``.source`` (a one-line description of what was loaded) and helpers that
work either way: ``encode``/``decode`` for text (a byte-level stand-in tokenizer offline, which says so) and
``preprocess`` for images (`preprocess_image`, resize + ImageNet normalisation, when the processor is missing).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn

CODEGEN_ID = "Salesforce/codegen-350M-mono"
DETR_ID = "facebook/detr-resnet-50"
DETR_REVISION = "no_timm"  # transformers' own ResNet backbone: no timm needed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_FALLBACK_SEED = 0  # the random-weight models are the same on every run (nbval compares outputs)
_TRUE = {"1", "ON", "YES", "TRUE"}


# --------------------------------------------------------------------------------------------------------------
# What a loader returns
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model plus what it needs to read inputs, and an honest record of where its weights came from."""

    model: nn.Module
    model_id: str
    is_pretrained: bool
    source: str
    tokenizer: Any | None = None
    processor: Any | None = None
    reason: str = ""  # why the fallback was used (empty when pretrained)
    _standin: "StandInTokenizer | None" = field(default=None, repr=False)

    def __str__(self) -> str:
        if self.is_pretrained:
            return f"Loaded {self.source}."
        return random_weights_banner(self.model_id, self.source, self.reason)

    # ---- text -------------------------------------------------------------------------------------------
    @property
    def text_tokenizer(self) -> Any:
        """The real tokenizer, or the `StandInTokenizer` when none could be loaded."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self._standin is None:
            self._standin = StandInTokenizer(getattr(self.model.config, "vocab_size", 256))
        return self._standin

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text``, shape ``(1, n)``."""
        return self.text_tokenizer(text, return_tensors="pt")["input_ids"]

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text for ``ids`` with the real tokenizer; offline, the ids themselves (see `StandInTokenizer`)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.text_tokenizer.decode(ids, skip_special_tokens=True)

    # ---- images -----------------------------------------------------------------------------------------
    def preprocess(self, image: Any, shortest_edge: int = 800, longest_edge: int = 1333) -> torch.Tensor:
        """``pixel_values`` ``(1, 3, H, W)`` in fp32: the real image processor if loaded, else `preprocess_image`.

        ``shortest_edge``/``longest_edge`` apply to both paths (the DETR processor's defaults are 800/1333).
        """
        if self.processor is not None:
            size = {"shortest_edge": shortest_edge, "longest_edge": longest_edge}
            return self.processor(images=image, size=size, return_tensors="pt")["pixel_values"]
        return preprocess_image(image, shortest_edge, longest_edge)


def random_weights_banner(model_id: str, source: str, reason: str = "") -> str:
    """The loud message shown whenever a model has random weights."""
    rule = "!" * 100
    lines = [
        rule,
        f"!!  RANDOM WEIGHTS — this is NOT the pretrained {model_id}.",
        f"!!  {reason or 'The Hugging Face hub is not reachable and the model is not in the local cache.'}",
        f"!!  Built instead: {source}.",
        "!!  Same architecture, same shapes: parameter counts, memory footprints and timings are real.",
        "!!  Its OUTPUTS ARE MEANINGLESS (generated text, detections): compare them before/after quantization,",
        "!!  never read them as what the real model would say. Run online to get the real weights.",
        rule,
    ]
    return "\n".join(lines)


class StandInTokenizer:
    """Offline stand-in for a text tokenizer: token ids are the UTF-8 bytes of the text (0–255).

    It is NOT the model's tokenizer (CodeGen uses a GPT-2 byte-pair vocabulary), so ``decode`` does not pretend
    to produce text: it shows the ids, e.g. ``"⟨ids 100 101 102⟩"``. Only use it to feed a random-weight model.
    """

    name = "stand-in byte tokenizer (ids = UTF-8 bytes; not the model's real tokenizer)"

    def __init__(self, vocab_size: int = 256) -> None:
        if vocab_size < 256:
            raise ValueError("the stand-in tokenizer needs a vocabulary of at least 256 ids")
        self.vocab_size = vocab_size
        self.eos_token_id = None
        self.pad_token_id = None

    def __call__(self, text: str, return_tensors: str | None = "pt") -> dict[str, Any]:
        ids = list(text.encode("utf-8"))
        if return_tensors != "pt":
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        input_ids = torch.tensor([ids], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return "⟨ids " + " ".join(str(i) for i in ids) + "⟩"

    def __repr__(self) -> str:
        return f"StandInTokenizer({self.name})"


# --------------------------------------------------------------------------------------------------------------
# The two loaders
# --------------------------------------------------------------------------------------------------------------


def load_codegen(
    dtype: torch.dtype = torch.bfloat16, model_id: str = CODEGEN_ID, *, verbose: bool = True
) -> LoadedModel:
    """``Salesforce/codegen-350M-mono`` (a causal LM, 356.7 M parameters) in ``dtype``, with its tokenizer.

    Offline: the same architecture from ``configs/codegen-350M-mono.json`` with random weights (see the module
    docstring); ``tokenizer`` is then ``None`` and ``encode``/``decode`` use the `StandInTokenizer`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def pretrained(local_files_only: bool) -> LoadedModel:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=local_files_only)
        return LoadedModel(model.eval(), model_id, True, f"{model_id} (pretrained weights, {_dtype_name(dtype)})", tokenizer)

    def fallback(reason: str) -> LoadedModel:
        model = build_random_codegen(dtype)
        source = f"CodeGenForCausalLM from w8a16/course/configs/codegen-350M-mono.json, random N(0, 0.02²) weights, {_dtype_name(dtype)}"
        return LoadedModel(model, model_id, False, source, reason=reason)

    return _load(model_id, pretrained, fallback, verbose)


def load_detr(
    dtype: torch.dtype = torch.float32,
    model_id: str = DETR_ID,
    revision: str = DETR_REVISION,
    *,
    verbose: bool = True,
) -> LoadedModel:
    """``facebook/detr-resnet-50`` (revision ``no_timm``, 41.5 M parameters) in ``dtype``, with its image processor.

    Offline: the same architecture from ``configs/detr-resnet-50.json`` with random weights; ``processor`` is then
    ``None`` and ``preprocess`` uses `preprocess_image`.
    """
    from transformers import AutoImageProcessor, DetrForObjectDetection

    def pretrained(local_files_only: bool) -> LoadedModel:
        model = DetrForObjectDetection.from_pretrained(
            model_id, revision=revision, dtype=dtype, local_files_only=local_files_only
        )
        processor = AutoImageProcessor.from_pretrained(model_id, revision=revision, local_files_only=local_files_only)
        source = f"{model_id}@{revision} (pretrained weights, {_dtype_name(dtype)})"
        return LoadedModel(model.eval(), model_id, True, source, processor=processor)

    def fallback(reason: str) -> LoadedModel:
        model = build_random_detr(dtype)
        source = f"DetrForObjectDetection from w8a16/course/configs/detr-resnet-50.json, random weights (library init), {_dtype_name(dtype)}"
        return LoadedModel(model, model_id, False, source, reason=reason)

    return _load(model_id, pretrained, fallback, verbose)


def _load(
    model_id: str,
    pretrained: Callable[[bool], LoadedModel],
    fallback: Callable[[str], LoadedModel],
    verbose: bool,
) -> LoadedModel:
    """Try ``from_pretrained``; fall back to random weights only when the hub cannot be reached.

    "Cannot be reached" means ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set or a TCP connect to the hub
    fails, *and* the model is not in the local cache (transformers then raises ``OSError``). Anything else — a
    typo in the id, a transformers too old for the checkpoint, out of memory, a corrupt download — is a real
    problem that random weights would only hide, so it raises `ModelLoadError` saying what to do.
    """
    offline = hub_offline()
    reachable = not offline and hub_reachable()
    try:
        # Quiet: transformers/huggingface_hub log retries and warnings to stderr, which notebooks must not show.
        with _quiet():
            loaded = pretrained(not reachable)
    except OSError as err:
        if reachable and hub_reachable():  # the hub answered, so this is not a connectivity problem
            raise ModelLoadError(_advice(model_id, err)) from err
        if offline:
            reason = f"HF_HUB_OFFLINE is set and {model_id} is not in the local cache."
        else:
            reason = f"The Hugging Face hub is not reachable and {model_id} is not in the local cache."
        loaded = fallback(reason)
    except Exception as err:  # noqa: BLE001 — re-raised with advice, never swallowed
        raise ModelLoadError(_advice(model_id, err)) from err
    if verbose:
        print(loaded)
    return loaded


class ModelLoadError(RuntimeError):
    """``from_pretrained`` failed for a reason other than an unreachable hub (see `_load`)."""


def _advice(model_id: str, err: BaseException) -> str:
    first = (str(err).splitlines() or [""])[0][:300]
    return (
        f"Loading {model_id} failed ({type(err).__name__}: {first}). This is not a missing network, so no "
        "random-weight stand-in was built. Check the model id, upgrade transformers "
        "(pip install -U transformers) if the checkpoint is newer than it, and make sure there is memory for "
        "the model; or set HF_HUB_OFFLINE=1 to work with the random-weight stand-in on purpose."
    )


# --------------------------------------------------------------------------------------------------------------
# Is the hub there?
# --------------------------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), read now."""
    return any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connect to the hub (``HF_ENDPOINT``), so an air-gapped machine does not sit through retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# The random-weight fallbacks
# --------------------------------------------------------------------------------------------------------------


def shipped_config(name: str) -> dict:
    """The config dict shipped in ``w8a16/course/configs/<name>.json`` (without its ``_comment``)."""
    text = resources.files("w8a16.course").joinpath("configs", f"{name}.json").read_text(encoding="utf-8")
    config = json.loads(text)
    config.pop("_comment", None)
    return config


def build_random_codegen(dtype: torch.dtype = torch.bfloat16, config: Any | None = None) -> nn.Module:
    """CodeGenForCausalLM with the shipped config (or ``config``) and seeded random weights, in eval mode.

    Built without the library's initialisation (slow for 357 M parameters on a CPU), then filled in one pass:
    Linear and Embedding weights ~ N(0, initializer_range²) (0.02, as the library initialises them), biases 0,
    LayerNorm weight 1 and bias 0.
    """
    from transformers import CodeGenConfig, CodeGenForCausalLM
    from transformers.initialization import no_init_weights

    if config is None:
        config = CodeGenConfig.from_dict(shipped_config("codegen-350M-mono"))
    with no_init_weights():
        model = CodeGenForCausalLM._from_config(config, dtype=dtype)
    _fill_normal(model, std=getattr(config, "initializer_range", 0.02), seed=_FALLBACK_SEED)
    # Non-persistent buffers (the rotary table) as from_pretrained computes them: in fp32, not under the bf16
    # default dtype the model was built with, so that save_pretrained + from_pretrained gives back this model.
    with torch.no_grad():
        for module in model.modules():
            if module._non_persistent_buffers_set:
                model._init_weights(module)
    return model.eval()


def build_random_detr(dtype: torch.dtype = torch.float32, config: Any | None = None) -> nn.Module:
    """DetrForObjectDetection with the shipped config (or ``config``) and the library's own random init, seeded.

    DETR is small (41.5 M), so the library's initialisation is cheap: Linear weights ~ N(0, 0.02²) (``init_std``),
    Kaiming-normal convolutions in the ResNet backbone, identity frozen batch norms. The global RNG is left as
    it was.
    """
    from transformers import DetrConfig, DetrForObjectDetection

    if config is None:
        # backbone=None + backbone_config: never ask the hub (or timm) for a backbone.
        config = DetrConfig.from_dict(shipped_config("detr-resnet-50"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_FALLBACK_SEED)
        model = DetrForObjectDetection(config)
    model = model.to(dtype)
    _check_finite(model)
    return model.eval()


@torch.no_grad()
def _fill_normal(model: nn.Module, std: float, seed: int, pool_size: int = 1 << 20) -> None:
    """Fill ``model`` in place: weights ~ N(0, std²), biases 0, norm weights 1. Fast and deterministic.

    Drawing 357 M fresh normals takes several seconds on a busy 2-core machine, so each weight is tiled from one
    pool of ``pool_size`` seeded N(0, std²) samples, every tile starting at a random offset. Each row then looks
    like an i.i.d. normal sample — which is all the quantization statistics need from random weights.
    """
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(pool_size, generator=gen).mul_(std)
    pools: dict[torch.dtype, torch.Tensor] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower():
                param.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                param.zero_()
            else:
                if param.dtype not in pools:
                    pools[param.dtype] = torch.cat([pool, pool]).to(param.dtype)
                twice = pools[param.dtype]
                flat = param.view(-1)
                offsets = torch.randint(0, pool_size, ((flat.numel() + pool_size - 1) // pool_size,), generator=gen)
                for i, start in enumerate(range(0, flat.numel(), pool_size)):
                    n = min(pool_size, flat.numel() - start)
                    o = int(offsets[i])
                    flat[start : start + n].copy_(twice[o : o + n])
    # Every value came from the pool, so checking the pool is checking the model (isfinite over 357 M bf16
    # values would take longer than the fill itself).
    assert torch.isfinite(pool).all()


def _check_finite(model: nn.Module) -> None:
    # One reduction per tensor: a NaN or Inf anywhere makes the sum non-finite (much cheaper than isfinite).
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor.detach().sum()):
            raise RuntimeError(f"random init produced non-finite values in {name}")


# --------------------------------------------------------------------------------------------------------------
# Images without the processor
# --------------------------------------------------------------------------------------------------------------


def preprocess_image(image: Any, shortest_edge: int = 800, longest_edge: int = 1333) -> torch.Tensor:
    """``pixel_values`` ``(1, 3, H, W)`` fp32 for DETR: resize (keep the aspect ratio) + ImageNet normalisation.

    ``image``: a PIL image, or an ``(H, W, 3)`` array/tensor of uint8 (0–255) or floats (0–1). The shorter side
    goes to ``shortest_edge`` unless the longer one would pass ``longest_edge``, as DETR's image processor does.
    """
    import numpy as np

    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] < 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    pixels = torch.from_numpy(np.array(array[..., :3], dtype=np.float32))
    if array.dtype == np.uint8:
        pixels /= 255.0
    pixels = pixels.permute(2, 0, 1)[None]  # (1, 3, H, W)
    height, width = pixels.shape[-2:]
    new_h, new_w = resized_size(height, width, shortest_edge, longest_edge)
    pixels = nn.functional.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    return (pixels - mean) / std


def resized_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """(H, W) after resizing the short side to ``shortest_edge``, capped so the long side stays ≤ ``longest_edge``."""
    short, long = min(height, width), max(height, width)
    scale = min(shortest_edge / short, longest_edge / long)
    return max(1, round(height * scale)), max(1, round(width * scale))


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def _quiet():
    """Silence stderr chatter (warnings, hub retries) while trying the real model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                from transformers.utils import logging as hf_logging

                level = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()
            except ImportError:  # pragma: no cover
                level = None
            try:
                yield
            finally:
                if level is not None:
                    hf_logging.set_verbosity(level)
