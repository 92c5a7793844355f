"""Capacity planner: per-rank memory of MeZO and of backprop fine-tuning, and the fewest GPUs.

    python -m mezo_dist.plan --model_name_or_path facebook/opt-30b --gpus 1 --gpu_memory_gb 80 \\
        --seq_len 400 --batch_size 1 --dtype fp16

The model of memory is deliberately simple, a sum of named terms per rank (bytes):

* parameters: ``numel * bytes_per_param(dtype)``; divided by the world size when sharded (zero3,
  fsdp), zero on the device with ZeRO-3 parameter offload (the partitions live in host memory).
* gathered: what a sharded forward holds unsharded at once: the root group (embeddings, final
  norm, tied head) plus two transformer blocks (the one running and the one prefetched).
* activations: MeZO runs inference, so nothing is kept between layers for a backward; the peak is
  the working set of one layer and the logits (the forwards pass ``use_cache=False``, so no key/value
  cache is built). Backprop keeps every layer's activations for the backward pass:
  ``s*b*h*(34 + 5*a*s/h)`` bytes per layer in 16-bit (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", no recomputation), twice that in fp32.
* optimizer: AdamW in mixed precision keeps an fp32 master copy and two fp32 moments per
  trainable parameter, 12 bytes; with the 16-bit weights and gradients that is the usual 16 bytes
  per parameter (Rajbhandari et al. 2020, ZeRO). In fp32: the two moments, 8 bytes. MeZO: none.
* gradients: backprop, one per trainable parameter in the training dtype. MeZO: none; it holds
  one 4 MiB block of noise instead (``mezo_dist.zo.noise.BLOCK`` fp32 elements).
* runtime: ``--runtime_overhead_gb`` per rank (0 by default). On a GPU the CUDA context and the
  allocator's slack come on top; on a CPU the Python/torch process itself costs a few hundred MB,
  which the measured resident set includes (tests/distributed/test_plan_memory.py measures it).

Batch and sequence length are per rank (the micro-batch): data parallelism does not shrink them.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from mezo_dist.errors import ConfigError

GiB = 2**30
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
NOISE_BLOCK = 1 << 20  # equals mezo_dist.zo.noise.BLOCK; not imported, so the planner needs no torch

# OPT sizes (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models", Table 1), as in
# the hub's config.json files: hidden, layers, ffn, vocab, heads. All have 2048 positions.
OPT = {
    "125m": (768, 12, 3072, 50272, 12),
    "350m": (1024, 24, 4096, 50272, 16),
    "1.3b": (2048, 24, 8192, 50272, 32),
    "2.7b": (2560, 32, 10240, 50272, 32),
    "6.7b": (4096, 32, 16384, 50272, 32),
    "13b": (5120, 40, 20480, 50272, 40),
    "30b": (7168, 48, 28672, 50272, 56),
    "66b": (9216, 64, 36864, 50272, 72),
}

METHODS = ("mezo", "mezo_lora", "mezo_prefix", "adam_full", "adam_lora")
BACKENDS = ("single", "fsdp", "zero3", "zero3_offload")
# The MeZO reference's parameter-efficient settings (large_models/mezo.sh and run.py): LoRA rank 8
# on the query and value projections, prefix tuning with 5 prefix tokens per layer.
LORA_R, LORA_MATRICES, PREFIX_TOKENS = 8, 2, 5


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: int  # all parameters, tied ones once
    block_params: int  # the largest transformer block
    root_params: int  # everything outside the blocks (embeddings, final norm, untied head)
    largest_param: int  # the biggest single tensor (sizes MeZO's noise buffer)
    hidden: int
    layers: int
    ffn: int
    vocab: int
    heads: int


def opt_shape(size: str) -> ModelShape:
    """Exact parameter counts of an OPT size, from its dimensions (OPTForCausalLM's modules)."""
    h, n, ffn, vocab, heads = OPT[size]
    # q, k, v, out projections with biases; fc1, fc2 with biases; two layer norms (weight, bias).
    block = 4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * 2 * h
    embed = 512 if size == "350m" else h  # OPT-350m embeds in 512 dims and projects in and out
    root = vocab * embed + (2048 + 2) * h  # tied token embedding / head, learned positions (+2 offset)
    if size == "350m":
        root += 2 * embed * h  # project_in, project_out; post-norm: no final layer norm
    else:
        root += 2 * h
    largest = max(vocab * embed, h * ffn)
    return ModelShape(f"facebook/opt-{size}", root + n * block, block, root, largest, h, n, ffn, vocab, heads)


def builtin_name(name: str) -> str | None:
    key = name.lower().removeprefix("facebook/").removeprefix("opt-")
    return key if key in OPT else None


def shape_from_folder(name: str) -> ModelShape:
    """Read config.json (local folder, or the local hub cache; never the network) and count
    parameters on the meta device, so any ``AutoModelForCausalLM`` architecture is counted exactly."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read config.json of {name}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    model.tie_weights()
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    total = sum(p.numel() for p in model.parameters())  # tied parameters once
    block_sizes = []
    for module in model.modules():
        if type(module).__name__ in blocks:
            block_sizes.append(sum(p.numel() for p in module.parameters()))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    return ModelShape(
        name=name, params=total, block_params=max(block_sizes, default=0), root_params=total - sum(block_sizes),
        largest_param=max(p.numel() for p in model.parameters()),
        hidden=hidden, layers=_first(text, "num_hidden_layers", "n_layer", "num_layers"),
        ffn=_first(text, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden) or 4 * hidden,
        vocab=_first(text, "vocab_size"), heads=_first(text, "num_attention_heads", "n_head"),
    )


def _first(config, *names: str, default: int | None = None) -> int:
    for n in names:
        value = getattr(config, n, None)
        if isinstance(value, int):
            return value
    if default is not None:
        return default
    raise ConfigError(f"config.json has none of {', '.join(names)}; cannot size the model")


def resolve_model(name: str) -> ModelShape:
    size = builtin_name(name)
    if size is not None:
        return opt_shape(size)
    p = Path(name).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"model folder {name} has no config.json")
    if not p.is_dir() and ("/" not in name or name.startswith((".", "/", "~"))):
        raise ConfigError(
            f"unknown model {name!r}: not a built-in OPT size ({', '.join('opt-' + s for s in OPT)}) "
            "and not a local folder with config.json"
        )
    return shape_from_folder(name)


@dataclass(frozen=True)
class Setting:
    gpus: int
    seq_len: int
    batch_size: int
    dtype: str = "fp16"
    runtime_overhead_bytes: int = 0


@dataclass(frozen=True)
class Estimate:
    method: str
    backend: str
    gpus: int
    parameters: int
    gathered: int
    activations: int
    optimizer: int
    gradients: int
    noise: int
    runtime: int
    host: int  # per rank, in host memory (offloaded parameters and optimizer states)

    @property
    def total(self) -> int:
        """Device bytes per rank."""
        return self.parameters + self.gathered + self.activations + self.optimizer + self.gradients + self.noise + self.runtime


def largest_trainable(shape: ModelShape, method: str) -> int:
    if method in ("mezo", "adam_full"):
        return shape.largest_param
    return (LORA_R if "lora" in method else PREFIX_TOKENS) * shape.hidden


def trainable_params(shape: ModelShape, method: str) -> int:
    if method in ("mezo", "adam_full"):
        return shape.params
    if method in ("mezo_lora", "adam_lora"):
        # A (r x h) and B (h x r) per adapted square projection.
        return shape.layers * LORA_MATRICES * 2 * LORA_R * shape.hidden
    # Prefix tuning: a key and a value vector per prefix token per layer.
    return shape.layers * 2 * PREFIX_TOKENS * shape.hidden


def inference_working_set(shape: ModelShape, s: Setting, seq: int) -> int:
    """Peak transient memory of one forward without stored activations.

    * one layer's live tensors: residual, normed input, attention output and context (4 x hidden),
      the ffn-wide output and its activation (2 x ffn), attention scores and their softmax;
    * no key/value cache: a Hugging Face forward keeps every layer's keys and values until it
      returns (2 x hidden per token per layer, most of the working set on a small model) unless
      called with ``use_cache=False``, which every training and scoring forward here passes;
    * the logits, with the loss's fp32 upcast and log-softmax (8 more bytes each).
    """
    w, b, h, a = BYTES[s.dtype], s.batch_size, shape.hidden, shape.heads
    layer = b * seq * (4 * h + 2 * shape.ffn) * w + 2 * b * a * seq * seq * w
    logits = b * seq * shape.vocab * (w + 8)
    return layer + logits


def backprop_activations(shape: ModelShape, s: Setting, seq: int) -> int:
    """Activations stored for the backward pass: Korthikanti et al.'s 34 + 5as/h bytes per token
    and hidden unit per layer in 16-bit (scaled with the dtype), plus the logits and their gradient."""
    w, b, h, a = BYTES[s.dtype], s.batch_size, shape.hidden, shape.heads
    per_layer = seq * b * h * (34 + 5 * a * seq / h) * (w / 2)
    logits = b * seq * shape.vocab * (w + 8)
    return int(shape.layers * per_layer) + logits


def estimate(shape: ModelShape, method: str, backend: str, s: Setting) -> Estimate:
    """Per-rank memory of ``method`` on ``backend`` with ``s.gpus`` ranks."""
    w, n = BYTES[s.dtype], s.gpus
    sharded = backend != "single"
    trainable = trainable_params(shape, method)
    extra = 0 if method in ("mezo", "adam_full") else trainable  # adapters or prefixes on top
    weights = (shape.params + extra) * w
    seq = s.seq_len + (PREFIX_TOKENS if method == "mezo_prefix" else 0)
    backprop = method.startswith("adam")
    # Mixed precision keeps fp32 master weights beside the two fp32 moments; fp32 needs no master.
    opt = trainable * ((12 if w < 4 else 8) if backprop else 0)
    grads = trainable * w if backprop else 0
    share = n if sharded else 1
    params, opt_dev, host = math.ceil(weights / share), math.ceil(opt / share), 0
    if backend == "zero3_offload":
        # offload_param (and, for Adam, offload_optimizer): partitions live in host memory and
        # stream to the device layer by layer; only gathered layers occupy the device.
        host, params = params + opt_dev, 0
        opt_dev = 0
    gathered = (shape.root_params + 2 * shape.block_params) * w if sharded else 0
    acts = backprop_activations(shape, s, seq) if backprop else inference_working_set(shape, s, seq)
    # MeZO draws z one block at a time into one fp32 buffer sized by the largest trainable tensor.
    noise = 0 if backprop else min(NOISE_BLOCK, largest_trainable(shape, method)) * 4
    return Estimate(method, backend, n, params, gathered, acts, opt_dev, math.ceil(grads / share), noise,
                    s.runtime_overhead_bytes, host)


def fits(shape: ModelShape, method: str, backend: str, s: Setting, gpu_bytes: int) -> bool:
    return estimate(shape, method, backend, s).total <= gpu_bytes


def min_gpus(shape: ModelShape, method: str, backend: str, s: Setting, gpu_bytes: int, limit: int = 4096) -> int | None:
    """The fewest ranks whose per-rank memory fits ``gpu_bytes``; None if none up to ``limit``.
    Replicated (single) placements do not shrink with more ranks: 1 or None."""
    if backend == "single":
        return 1 if fits(shape, method, backend, replace(s, gpus=1), gpu_bytes) else None
    lo, hi = 1, limit
    if not fits(shape, method, backend, replace(s, gpus=hi), gpu_bytes):
        return None
    while lo < hi:  # per-rank memory falls as ranks grow: bisect
        mid = (lo + hi) // 2
        if fits(shape, method, backend, replace(s, gpus=mid), gpu_bytes):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _gib(x: int) -> str:
    return f"{x / GiB:8.2f}"


def report(shape: ModelShape, s: Setting, gpu_bytes: int) -> str:
    head = (f"{shape.name}: {shape.params / 1e9:.3f}B parameters, {shape.layers} layers, hidden {shape.hidden}, "
            f"largest block {shape.block_params / 1e6:.1f}M, outside blocks {shape.root_params / 1e6:.1f}M\n"
            f"{s.gpus} GPU(s) of {gpu_bytes / GiB:g} GiB, micro-batch {s.batch_size} x {s.seq_len} tokens per rank, "
            f"{s.dtype}, runtime overhead {s.runtime_overhead_bytes / GiB:g} GiB per rank; GiB per rank:\n")
    cols = ("method", "backend", "params", "gathered", "activ.", "optim.", "grads", "total", "host", "fits", "min GPUs")
    rows = [f"{cols[0]:<12} {cols[1]:<14}" + "".join(f"{c:>9}" for c in cols[2:])]
    for method in METHODS:
        for backend in BACKENDS:
            e = estimate(shape, method, backend, s)
            need = min_gpus(shape, method, backend, s, gpu_bytes)
            rows.append(
                f"{method:<12} {backend:<14} {_gib(e.parameters)} {_gib(e.gathered)} {_gib(e.activations)} "
                f"{_gib(e.optimizer)} {_gib(e.gradients)} {_gib(e.total)} {_gib(e.host)} "
                f"{'yes' if e.total <= gpu_bytes else 'no':>8} {need if need is not None else '-':>8}"
            )
    return head + "\n".join(rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mezo_dist.plan", description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", required=True,
                   help="A built-in OPT size (facebook/opt-125m ... opt-66b) or a folder with config.json.")
    p.add_argument("--gpus", type=int, default=1, help="Ranks (GPUs) to plan for.")
    p.add_argument("--gpu_memory_gb", type=float, default=80.0, help="Memory per GPU in GiB (an 80 GB A100 has 80 GiB).")
    p.add_argument("--seq_len", type=int, default=400, help="Tokens per example.")
    p.add_argument("--batch_size", type=int, default=1, help="Examples per rank (micro-batch).")
    p.add_argument("--dtype", default="fp16", help="Parameter dtype: fp16, bf16 or fp32.")
    p.add_argument("--runtime_overhead_gb", type=float, default=0.0,
                   help="Fixed memory per rank on top of the model (process runtime, CUDA context), GiB.")

    def one_line(message: str) -> None:  # argparse would print the usage and exit itself
        raise ConfigError(message)

    p.error = one_line  # type: ignore[method-assign]
    args = p.parse_args(argv)
    if args.dtype not in BYTES:
        raise ConfigError(f"unknown --dtype {args.dtype!r}; choose one of {', '.join(BYTES)}")
    for name in ("gpus", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (args.gpu_memory_gb > 0 and math.isfinite(args.gpu_memory_gb)):
        raise ConfigError(f"--gpu_memory_gb must be > 0, got {args.gpu_memory_gb}")
    if not (args.runtime_overhead_gb >= 0 and math.isfinite(args.runtime_overhead_gb)):
        raise ConfigError(f"--runtime_overhead_gb must be >= 0, got {args.runtime_overhead_gb}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        shape = resolve_model(args.model_name_or_path)
    except ConfigError as e:
        print(f"mezo_dist: error: {e}", file=sys.stderr, flush=True)
        return 2
    s = Setting(gpus=args.gpus, seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype,
                runtime_overhead_bytes=int(args.runtime_overhead_gb * GiB))
    print(report(shape, s, int(args.gpu_memory_gb * GiB)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
