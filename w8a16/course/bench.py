"""Benchmark: dense ``nn.Linear`` vs the seed's naive W8A16 forward vs ours, one layer and whole models.

    python -m w8a16.bench            # full run (several minutes on a 2-core CPU: it compiles two models too)
    python -m w8a16.bench --quick    # seconds: small shapes, a tiny model (for notebooks and tests)

Everything is timed in one process with `w8a16.timing.compare` (warm-up, CUDA sync, alternated runs, medians),
so ratios are fair even on a busy machine; absolute numbers are not. Each layer benchmark rotates through
several copies of the weights whose int8 bytes alone exceed a CPU's last-level cache, so no candidate is timed
on weights that are already cached (they would not be, in a real model). `layer_rows` and `decode_rows` return
plain rows (lists of dicts) for notebooks to plot; `detr_rows` compares a DETR-ResNet-50 forward before and after
quantizing every Linear and Conv2d.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import os
import platform
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..layer import W8A16Conv2d, W8A16LinearLayer
from .models import build_random_codegen, build_random_detr, shipped_config
from ..quantizer import Quantizer, footprint_bytes
from .timing import compare

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROTATE_BYTES = 64 << 20  # int8 bytes of weights to rotate through: twice a 32 MiB L3


# ---------------------------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the numbers were measured on."""
    device = torch.device(device)
    info = {
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


def gpu_note(device: torch.device | str) -> str:
    """The plain statement every report carries about GPUs."""
    if torch.device(device).type == "cuda":
        return f"GPU measured: {torch.cuda.get_device_name(device)}"
    if torch.cuda.is_available():
        return "GPU present but not measured in this run (device=cpu)"
    return "No GPU was measured: no CUDA device on this machine; all numbers are CPU numbers"


def stream_read_gbps(device: torch.device | str = "cpu", mib: int = 256, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best median of two read-only kernels (``sum``, gemv) over ``mib`` MiB."""
    device = torch.device(device)
    big = torch.ones(mib << 18, device=device)  # fp32: mib MiB
    vec = torch.ones(4096, device=device)
    mat = big.view(-1, 4096)
    res = compare({"sum": big.sum, "gemv": lambda: torch.mv(mat, vec)}, repeats=repeats, device=device)
    return big.numel() * 4 / min(res.median_s.values()) / 1e9


# ---------------------------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------------------------


def seed_naive_linear(x: torch.Tensor, layer: W8A16LinearLayer) -> torch.Tensor:
    """The seed's forward: cast int8 to x.dtype, matmul, *then* scale (overflows fp16; a full temporary)."""
    out = F.linear(x, layer.int8_weights.to(x.dtype)) * layer.scales.to(x.dtype)
    return out + layer.bias.to(x.dtype) if layer.bias is not None else out


def third_party_status() -> dict[str, str]:
    """Whether optimum-quanto and torchao are installed (they are compared when they are)."""
    names = {"optimum-quanto": "optimum.quanto", "torchao": "torchao"}
    status = {}
    for label, module in names.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        status[label] = "installed" if found else "not installed"
    return status


def _third_party_layer(label: str, linear: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """An int8-weight-only copy of ``linear`` made by a third-party library (raises if its API differs)."""
    module = nn.Sequential(copy.deepcopy(linear))
    if label == "optimum-quanto":
        from optimum.quanto import freeze, qint8, quantize

        quantize(module, weights=qint8)
        freeze(module)
    else:
        from torchao.quantization import quantize_

        try:
            from torchao.quantization import Int8WeightOnlyConfig as config
        except ImportError:  # older torchao
            from torchao.quantization import int8_weight_only as config
        quantize_(module, config())
    return module


# ---------------------------------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------------------------------


def layer_rows(
    dtypes: tuple[str, ...] = ("bf16", "fp32", "fp16"),
    ms: tuple[int, ...] = (1, 16, 256),
    shapes: tuple[tuple[int, int], ...] = ((4096, 4096),),
    device: torch.device | str = "cpu",
    repeats: int = 5,
    rotate_bytes: int = ROTATE_BYTES,
    stream_gbps: float | None = None,
    third_party: bool = True,
    measure_stream: bool = False,
    scrub: bool = False,
) -> list[dict]:
    """One row per (shape, dtype, M, implementation): median ms, ratio vs dense, achieved weight bandwidth.

    ``shapes`` are ``(in_features, out_features)``. Bandwidth counts the weight bytes each implementation must
    read (dense: 2 or 4 bytes per weight; int8: 1 byte plus the scales); ``pct_stream`` compares it with
    ``stream_gbps``, a measured read bandwidth — or, with ``measure_stream``, with a read of 64 MiB timed in the
    same alternated rounds as the candidates (``stream_GBps`` in each row): a shared host's memory bandwidth
    moves from minute to minute (23 to 39 GB/s between two runs here), so only a reading taken alongside is fair.
    ``scrub`` (on a CPU) reads 64 MiB untimed before every timed call, so that no candidate pays for the cache
    state the previous one left: the seed's forward writes a dense weight as large as that, and whichever
    candidate ran next paid for writing it back (+0.15 ms measured). Then the candidate runs once untimed on the
    previous weight copy (`compare`'s ``prime``), and the timed call reads the next copy: its weights come from
    memory while its code and Python objects are warm, as in a decode loop where the layer before just ran the
    same code. Without that step every call started from cold caches, Python's objects included, which cost
    ours 0.10 ms more per call than in a loop (0.66 vs 0.56 ms, 4096×4096 bf16 at M=1: 83 vs 98 % of the stream
    read taken the same way), and small layers most (a 1024×4096 layer: 0.3 → 0.8 ms dense bf16).
    """
    device = torch.device(device)
    status = third_party_status() if third_party else {}
    scrub_buf = torch.ones(16 << 20, device=device) if scrub and device.type == "cpu" else None
    # The stream read's own buffer: 64 MiB on a CPU (twice a 32 MiB L3), 256 MiB past a GPU's L2.
    stream_buf = torch.ones((16 if device.type == "cpu" else 64) << 20, device=device) if measure_stream else None
    rows = []
    for n_in, n_out in shapes:
        copies = max(2, -(-rotate_bytes // (n_in * n_out)))
        for dname in dtypes:
            dtype = DTYPE_NAMES[dname]
            linears = [nn.Linear(n_in, n_out, dtype=dtype, device=device).eval() for _ in range(copies)]
            layers = [W8A16LinearLayer.from_linear(lin) for lin in linears]
            extra = {}
            for label, state in status.items():
                if state == "installed":
                    try:
                        extra[label] = [_third_party_layer(label, lin) for lin in linears]
                    except Exception as err:  # a changed third-party API must not break the benchmark
                        extra[label] = f"error: {type(err).__name__}: {err}"[:120]
            for m in ms:
                x = torch.randn(m, n_in, device=device).to(dtype)
                turn = {"i": 0}

                def rotating(fn, pool):
                    def call():
                        turn["i"] += 1
                        return fn(pool[turn["i"] % len(pool)])
                    return call

                with torch.no_grad():
                    cands = {
                        "dense": rotating(lambda lin: lin(x), linears),
                        "seed-naive": rotating(lambda q: seed_naive_linear(x, q), layers),
                        "w8a16": rotating(lambda q: q(x), layers),
                    }
                    for label, mods in extra.items():
                        if not isinstance(mods, str):
                            cands[label] = rotating(lambda mod: mod(x), mods)
                    if measure_stream:
                        cands["stream"] = stream_buf.sum
                    res = compare(cands, repeats=repeats, warmup=1, device=device, min_time_s=0.2,
                                  between=None if scrub_buf is None else scrub_buf.sum, prime=scrub_buf is not None)
                med = res.median_s
                if measure_stream:
                    stream_gbps = stream_buf.numel() * 4 / med.pop("stream") / 1e9
                path = ops.choose_path(x, layers[0].int8_weights, layers[0].scales, layers[0].bias)
                for impl, secs in med.items():
                    dense_bytes = n_in * n_out * x.element_size()
                    wbytes = dense_bytes if impl == "dense" else n_in * n_out + n_out * layers[0].scales.element_size()
                    gbps = wbytes / secs / 1e9
                    rows.append({
                        "device": device.type, "dtype": dname, "in": n_in, "out": n_out, "M": m, "impl": impl,
                        "path": path if impl == "w8a16" else "", "ms": secs * 1e3,
                        "vs_dense": med["dense"] / secs, "weight_GBps": gbps,
                        "pct_stream": 100 * gbps / stream_gbps if stream_gbps else float("nan"),
                        "stream_GBps": stream_gbps if stream_gbps else float("nan"),
                    })
                for label, mods in extra.items():
                    if isinstance(mods, str):
                        rows.append({"device": device.type, "dtype": dname, "in": n_in, "out": n_out, "M": m,
                                     "impl": label, "path": mods, "ms": float("nan"), "vs_dense": float("nan"),
                                     "weight_GBps": float("nan"), "pct_stream": float("nan")})
            del linears, layers, extra
    return rows


# ---------------------------------------------------------------------------------------------------------------
# A whole model: greedy decode
# ---------------------------------------------------------------------------------------------------------------

CODEGEN_350M = shipped_config("codegen-350M-mono")  # the real model's architecture, as w8a16.models builds it
CODEGEN_TINY = dict(CODEGEN_350M, n_layer=2, n_embd=128, n_head=4, rotary_dim=16, vocab_size=512, eos_token_id=2)


def build_codegen(config: dict, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> nn.Module:
    """A CodeGen model with ``config`` and seeded random weights (timing only: its outputs mean nothing)."""
    from transformers import CodeGenConfig

    return build_random_codegen(dtype, CodeGenConfig.from_dict(config)).to(device)


@torch.no_grad()
def greedy_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy steps with the KV cache: one token in, one logit row out, per step."""
    # transformers ≥ 5.2x calls the KV cache ``cache``; older versions ``past_key_values``.
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(prompt, use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out = model(tokens[-1], use_cache=True, **{kw: getattr(out, kw)})
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


class seed_naive_forward:  # noqa: N801 — used as a context manager, like torch.no_grad
    """Within the block, every `W8A16LinearLayer` of ``model`` runs the seed's naive forward."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, W8A16LinearLayer)]

    def __enter__(self) -> None:
        for layer in self.layers:
            layer.forward = types.MethodType(_naive_method, layer)

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            del layer.forward


def _naive_method(self: W8A16LinearLayer, x: torch.Tensor) -> torch.Tensor:
    return seed_naive_linear(x, self)


def decode_rows(
    config: dict = CODEGEN_350M,
    new_tokens: int = 16,
    prompt_len: int = 8,
    repeats: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    naive: bool = True,
    compiled: bool = False,
) -> list[dict]:
    """Greedy-decode tokens/s: dense model vs the same model after ``Quantizer(model, W8A16LinearLayer, ["lm_head"])``.

    Random weights (timing only). ``naive=True`` also times the quantized model with the seed's forward.
    ``compiled=True`` also times both models with ``torch.compile``d forwards — the fair comparison for anyone
    who compiles, since compiling removes most of the per-token Python work from the dense model too; each
    compiled model's ratio is against the compiled dense one.
    """
    device = torch.device(device)
    dense = build_codegen(config, dtype, device)
    quantized = Quantizer(copy.deepcopy(dense), W8A16LinearLayer, ["lm_head"])
    prompt = torch.randint(0, config["vocab_size"], (1, prompt_len), device=device)

    def naive_run():
        with seed_naive_forward(quantized):
            greedy_decode(quantized, prompt, new_tokens)

    cands = {"dense": lambda: greedy_decode(dense, prompt, new_tokens),
             "w8a16": lambda: greedy_decode(quantized, prompt, new_tokens)}
    if naive:
        cands["seed-naive"] = naive_run
    res = compare(cands, repeats=repeats, warmup=1, device=device)
    label = f"codegen({config['n_layer']} layers, n_embd={config['n_embd']}), random weights"

    def rows(median_s: dict[str, float], models: dict[str, nn.Module], suffix: str = "") -> list[dict]:
        base = median_s["dense"]
        return [{"device": device.type, "model": label, "dtype": str(dtype).replace("torch.", ""), "impl": impl + suffix,
                 "tokens_per_s": new_tokens / secs, "vs_dense": base / secs,
                 "MB": sum(t.numel() * t.element_size() for t in [*models[impl].parameters(), *models[impl].buffers()]) / 1e6}
                for impl, secs in median_s.items()]

    models = {"dense": dense, "w8a16": quantized, "seed-naive": quantized}
    out = rows(res.median_s, models)
    if compiled:
        compiled_models = {name: _compiled(copy.deepcopy(m)) for name, m in (("dense", dense), ("w8a16", quantized))}
        cands = {name: (lambda m=m: greedy_decode(m, prompt, new_tokens)) for name, m in compiled_models.items()}
        # Two warm-up runs: the prefill shape and the first decode shapes compile (dynamic shapes after that).
        res = compare(cands, repeats=repeats, warmup=2, device=device)
        out += rows(res.median_s, compiled_models, " (compiled)")
    return out


def _compiled(model: nn.Module) -> nn.Module:
    """``model`` with its forward compiled by ``torch.compile`` (dynamic shapes: the KV cache grows every step)."""
    model.forward = torch.compile(model.forward, dynamic=True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# A vision model: DETR-ResNet-50, one forward
# ---------------------------------------------------------------------------------------------------------------

DETR_TINY = dict(
    shipped_config("detr-resnet-50"), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
    backbone_config=dict(shipped_config("detr-resnet-50")["backbone_config"], embedding_size=16,
                         hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
)


def detr_rows(
    config: dict | None = None,
    image_hw: tuple[int, int] = (480, 640),
    repeats: int = 5,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """One fp32 DETR forward: the float model vs every Linear quantized vs every Linear and Conv2d quantized.

    Random weights (timing only), built from the shipped config (``config`` overrides it). Activations stay
    fp32 (W8A32): DETR is published in fp32, and on a CPU that is how it runs. A W8A16Conv2d dequantizes its
    filters on every call, so this measures whether that costs anything next to the convolutions themselves.
    """
    from transformers import DetrConfig

    device = torch.device(device)
    float_model = build_random_detr(torch.float32, DetrConfig.from_dict(config) if config else None).to(device)
    models = {
        "float": float_model,
        "linear-only": Quantizer(copy.deepcopy(float_model), W8A16LinearLayer),
        "linear+conv2d": Quantizer(copy.deepcopy(float_model), [W8A16LinearLayer, W8A16Conv2d]),
    }
    pixels = torch.randn(1, 3, *image_hw, generator=torch.Generator().manual_seed(0)).to(device)

    @torch.no_grad()
    def forward(model: nn.Module) -> None:
        model(pixel_values=pixels)

    res = compare({name: (lambda m=m: forward(m)) for name, m in models.items()}, repeats=repeats, warmup=1,
                  device=device)
    name = "detr-resnet-50" if config is None else "detr-resnet-50 (custom config)"
    label = f"{name}, {image_hw[0]}×{image_hw[1]}, random weights"
    base = res.median_s["float"]
    return [{"device": device.type, "model": label, "dtype": "fp32", "impl": name, "ms": secs * 1e3,
             "vs_float": base / secs, "MB": footprint_bytes(models[name]) / 1e6}
            for name, secs in res.median_s.items()]


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


PEERS = ("optimum-quanto", "torchao")


def summary_rows(rows: list[dict]) -> list[dict]:
    """`layer_rows` as one line per (shape, dtype, M): dense ms, every implementation's speed relative to dense
    (> 1: faster), the path ours took and its share of the stream bandwidth. Peers not installed are left out."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["dtype"], r["in"], r["out"], r["M"])
        line = out.setdefault(key, {"dtype": r["dtype"], "shape": f"{r['in']}x{r['out']}", "M": r["M"]})
        if r["impl"] == "dense":
            line["dense_ms"] = r["ms"]
        else:
            line[r["impl"]] = r["vs_dense"]
        if r["impl"] == "w8a16":
            line["path"], line["pct_stream"] = r["path"], r["pct_stream"]
    return list(out.values())


def target_rows(layer: list[dict], decode: list[dict] | None = None) -> list[dict]:
    """The speed targets (issue #14) checked against one run: GEMV at ≥ 80 % of stream bandwidth at M=1; ours ≥ 0.9×
    dense and ≥ each installed peer at every M and dtype; CodeGen decode ≥ 1.8× dense eager, ≥ 1.5× compiled."""
    checks = []
    for line in summary_rows(layer):
        where = f"{line['dtype']} {line['shape']} M={line['M']}"
        ours = line.get("w8a16", float("nan"))
        if line["M"] == 1:
            checks.append({"target": f"{where}: % of stream bandwidth", "value": line["pct_stream"], "goal": 80.0})
        checks.append({"target": f"{where}: vs dense", "value": ours, "goal": 0.9})
        for peer in PEERS:
            if isinstance(line.get(peer), float) and line[peer] == line[peer]:  # installed, and it ran
                checks.append({"target": f"{where}: ours / {peer}", "value": ours / line[peer], "goal": 1.0})
    for r in decode or []:
        goal = {"w8a16": 1.8, "w8a16 (compiled)": 1.5}.get(r["impl"])
        if goal is not None and r["dtype"] == "bfloat16":
            checks.append({"target": f"decode {r['impl']} vs dense{' (compiled)' if 'compiled' in r['impl'] else ''}",
                           "value": r["vs_dense"], "goal": goal})
    for c in checks:
        c["met"] = "yes" if c["value"] >= c["goal"] else "NO"
    return checks


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as a fixed-width text table."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 1e4 else f"{v:,.0f}" if isinstance(v, float) else str(v)
    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m w8a16.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and a tiny model: seconds, for tests")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bf16,fp32,fp16")
    parser.add_argument("--ms", default=None, help="batch sizes M, comma separated")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per decode")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model decode")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile decode comparison")
    parser.add_argument("--no-detr", action="store_true", help="skip the DETR forward (float vs Linear+Conv2d int8)")
    parser.add_argument("--verbose", action="store_true", help="also print every layer row (ms, GB/s)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtypes = tuple(args.dtypes.split(","))
    if args.quick:
        ms, shapes, repeats, rotate, config, tokens = (1, 64), ((256, 128),), 2, 1 << 16, CODEGEN_TINY, 3
    else:
        ms, repeats, rotate, config, tokens = (1, 4, 16, 64, 256), 5, ROTATE_BYTES, CODEGEN_350M, 16
        shapes = ((4096, 4096), (4096, 14336)) if device.type == "cuda" else ((4096, 4096),)
    ms = tuple(int(m) for m in args.ms.split(",")) if args.ms else ms
    repeats = args.repeats or repeats
    tokens = args.tokens or tokens

    info = machine_info(device)
    print(f"machine: {info['cpu']} | {info['cpu_threads']} threads | {info['cpu_capability']} | "
          f"torch {info['torch']} | device {info['device']}" + (f" ({info['gpu']})" if info["gpu"] else ""))
    print(gpu_note(device))
    print("third-party: " + ", ".join(f"{k} {v}" for k, v in third_party_status().items()))
    print("(medians of alternated runs in one process; on a shared machine compare the ratios, not the ms)\n")

    rows = layer_rows(dtypes, ms, shapes, device, repeats, rotate, measure_stream=True, scrub=True)
    streams = sorted(r["stream_GBps"] for r in rows if r["impl"] == "w8a16")  # one reading per (dtype, M)
    print(f"stream-read bandwidth (a 64 MiB sum, timed alternately with each layer's candidates): "
          f"{streams[0]:.1f} to {streams[-1]:.1f} GB/s; pct_stream uses the reading taken alongside\n")
    if args.verbose:
        columns = ["dtype", "in", "out", "M", "impl", "path", "ms", "vs_dense", "weight_GBps", "pct_stream"]
        print(format_table(rows, columns) + "\n")
    summary = summary_rows(rows)
    peers = [p for p in PEERS if any(p in line for line in summary)]
    print("One layer, speed relative to nn.Linear of the same dtype (> 1: faster); w8a16's path and % of stream:")
    print(format_table(summary, ["dtype", "shape", "M", "dense_ms", "seed-naive", "w8a16", *peers, "path",
                                 "pct_stream"]))
    drows = []
    if not args.no_model:
        print()
        drows = decode_rows(config, new_tokens=tokens, repeats=2 if args.quick else 5, device=device,
                            compiled=not (args.quick or args.no_compile))
        print(format_table(drows, ["model", "dtype", "impl", "tokens_per_s", "vs_dense", "MB"]))
    if not args.no_detr:
        print()
        detr = detr_rows(DETR_TINY, (64, 80), repeats=2) if args.quick else detr_rows(repeats=repeats, device=device)
        print(format_table(detr, ["model", "dtype", "impl", "ms", "vs_float", "MB"]))
    if not args.quick:  # the targets are for the full-size shapes and model
        print("\nTargets (medians of this run):")
        print(format_table(target_rows(rows, drows), ["target", "value", "goal", "met"]))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
