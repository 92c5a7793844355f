"""Capacity planner: per-rank memory of MeZO and of backprop fine-tuning, and the fewest GPUs.

    python -m mezo_dist.plan --model_name_or_path facebook/opt-30b --gpus 1 --gpu_memory_gb 80 \\
        --seq_len 400 --batch_size 1 --dtype fp16

The model of memory is deliberately simple, a sum of named terms per rank (bytes):

* parameters: ``numel * bytes_per_param(dtype)``, sharded the way each engine shards, tensor by
  tensor: FSDP2 gives every rank ``ceil(rows / n)`` rows of each parameter (its padded shard, the
  same size on every rank, over the ``n = gpus / hsdp_replicas`` ranks of a shard group); ZeRO-3
  gives every rank ``ceil(numel / n)`` elements of each flattened parameter (the last rank's tail
  is padding), and keeps the parameters at or below ``stage3_param_persistence_threshold`` (the
  shipped configs' ``"auto"``: 10 x hidden) whole on every rank after the first forward, besides
  their partitions. With ZeRO-3 parameter offload the partitions live in host memory and only the
  persistent copies stay on the device.
* gathered: what a sharded forward holds unsharded at once: the root group (embeddings, final
  norm, tied head) plus two transformer blocks (the one running and the one prefetched).
* activations: MeZO runs inference, so nothing is kept between layers for a backward; the peak is
  the working set of one layer and the logits (the forwards pass ``use_cache=False``, so no key/value
  cache is built). The logits are counted at every position, as a language-model loss on text
  reads them; a classification or multiple-choice forward computes them only where a candidate
  is read (``logits.py``), so for those tasks this term is an upper bound. Backprop keeps every layer's activations for the backward pass:
  ``s*b*h*(34 + 5*a*s/h)`` bytes per layer in 16-bit (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", no recomputation), twice that in fp32.
* optimizer: AdamW in mixed precision keeps an fp32 master copy and two fp32 moments per
  trainable parameter, 12 bytes; with the 16-bit weights and gradients that is the usual 16 bytes
  per parameter (Rajbhandari et al. 2020, ZeRO). In fp32: the two moments, 8 bytes. MeZO: none.
* gradients: backprop, one per trainable parameter in the training dtype. MeZO: none. The
  default compiled pass draws z in its kernel and holds no noise buffer; the ``blocks`` path and
  a masked (Sparse MeZO) pass hold one 4 MiB block of z
  (``mezo_dist.zo.noise.BLOCK`` fp32 elements), which is what the estimate counts: an upper bound.
* host memory outside the step (a second table): what start-up, the final export and a training
  checkpoint hold in host memory per rank (see :func:`host_io`): every rank reads and writes its
  own part, one tensor in flight.
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

from mezo_dist.errors import ConfigError

# Re-exported: the shapes are part of the planner's public names.
from mezo_dist.plan_shapes import OPT, ModelShape, builtin_name, opt_shape, resolve_model, shape_from_folder  # noqa: F401

GiB = 2**30
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
NOISE_BLOCK = 1 << 20  # equals mezo_dist.zo.noise.BLOCK; not imported, so the planner needs no torch

METHODS = ("mezo", "mezo_lora", "mezo_prefix", "adam_full", "adam_lora")
BACKENDS = ("single", "fsdp", "zero3", "zero3_offload")
# The MeZO reference's parameter-efficient settings (large_models/mezo.sh and run.py): LoRA rank 8
# on the query and value projections, prefix tuning with 5 prefix tokens per layer.
LORA_R, LORA_MATRICES, PREFIX_TOKENS = 8, 2, 5


@dataclass(frozen=True)
class Setting:
    gpus: int
    seq_len: int
    batch_size: int
    dtype: str = "fp16"
    runtime_overhead_bytes: int = 0
    hsdp_replicas: int = 1  # fsdp: shard over gpus / hsdp_replicas ranks, replicate across groups


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


def shard_group(backend: str, s: Setting) -> int:
    """Ranks one copy of the model is sharded over: all of them, one HSDP group, or none."""
    if backend == "single":
        return 1
    return s.gpus // s.hsdp_replicas if backend == "fsdp" else s.gpus


def persistence_threshold(shape: ModelShape) -> int:
    # fill_ds_config's "auto" (the shipped ds_configs): 10 x hidden, as the Hugging Face integration.
    return 10 * shape.hidden


def local_numel(shape: ModelShape, backend: str, n: int) -> int:
    """Elements of the model's parameters that one of ``n`` ranks stores (padding included).

    FSDP2 (torch.chunk on dim 0) gives each rank ``ceil(rows / n)`` rows of every parameter;
    ZeRO-3 ``ceil(numel / n)`` elements of every flattened parameter; both pad the short ranks to
    that size. Replicated placements store every element."""
    if backend == "single" or n == 1:
        return shape.params
    if not shape.tensors:
        return math.ceil(shape.params / n)
    return sum(_piece(s, backend, n) * c for s, c in shape.tensors)


def largest_piece(shape: ModelShape, backend: str, n: int) -> int:
    """Elements of the largest piece of one tensor that one of ``n`` ranks stores."""
    if backend == "single" or n == 1:
        return shape.largest_param
    if not shape.tensors:
        return math.ceil(shape.largest_param / n)
    return max(_piece(s, backend, n) for s, _ in shape.tensors)


def _piece(s: tuple[int, ...], backend: str, n: int) -> int:
    if backend == "fsdp":
        return -(-(s[0] if s else 1) // n) * math.prod(s[1:])
    return -(-math.prod(s) // n)


def persistent_numel(shape: ModelShape) -> int:
    """Elements of the parameters ZeRO-3 keeps whole on every rank (at or below the threshold)."""
    limit = persistence_threshold(shape)
    return sum(math.prod(s) * c for s, c in shape.tensors if math.prod(s) <= limit)


def estimate(shape: ModelShape, method: str, backend: str, s: Setting) -> Estimate:
    """Per-rank memory of ``method`` on ``backend`` with ``s.gpus`` ranks."""
    w = BYTES[s.dtype]
    trainable = trainable_params(shape, method)
    full = method in ("mezo", "adam_full")
    extra = 0 if full else trainable  # adapters or prefixes on top
    seq = s.seq_len + (PREFIX_TOKENS if method == "mezo_prefix" else 0)
    backprop = method.startswith("adam")
    share = shard_group(backend, s)
    local = local_numel(shape, backend, share)
    # Adapters are small: sharded as one flat count.
    local_trainable = local if full else math.ceil(trainable / share)
    params = local * w + math.ceil(extra * w / share)
    # Mixed precision keeps fp32 master weights beside the two fp32 moments; fp32 needs no master.
    opt_dev = local_trainable * ((12 if w < 4 else 8) if backprop else 0)
    grads = local_trainable * w if backprop else 0
    persistent = persistent_numel(shape) * w if backend.startswith("zero3") else 0
    host = 0
    if backend == "zero3_offload":
        # offload_param (and, for Adam, offload_optimizer): partitions live in host memory and
        # stream to the device layer by layer; only gathered layers and the persistent parameters
        # occupy the device.
        host, params, opt_dev = params + opt_dev, 0, 0
    gathered = (shape.root_params + 2 * shape.block_params) * w if backend != "single" else 0
    acts = backprop_activations(shape, s, seq) if backprop else inference_working_set(shape, s, seq)
    # MeZO draws z one block at a time into one fp32 buffer sized by the largest trainable tensor.
    noise = 0 if backprop else min(NOISE_BLOCK, largest_trainable(shape, method)) * 4
    return Estimate(method, backend, s.gpus, params + persistent, gathered, acts, opt_dev, grads, noise,
                    s.runtime_overhead_bytes, host)


def fits(shape: ModelShape, method: str, backend: str, s: Setting, gpu_bytes: int) -> bool:
    return estimate(shape, method, backend, s).total <= gpu_bytes


def min_gpus(shape: ModelShape, method: str, backend: str, s: Setting, gpu_bytes: int, limit: int = 4096) -> int | None:
    """The fewest ranks whose per-rank memory fits ``gpu_bytes``; None if none up to ``limit``.
    Replicated (single) placements do not shrink with more ranks: 1 or None. Under HSDP this is the
    size of one shard group (the replicas multiply it)."""
    s = replace(s, hsdp_replicas=1)
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


@dataclass(frozen=True)
class HostIO:
    """Host bytes per rank outside the step: at start-up, at the final export and at a training
    checkpoint. Every rank alike (rank 0 also writes the index, config and tokenizer: kilobytes)."""

    backend: str
    startup: int
    export: int
    checkpoint: int


def host_io(shape: ModelShape, backend: str, s: Setting, *, on_cpu: bool = False) -> HostIO:
    """Host memory per rank at start-up, at the final export and at a checkpoint, as the code
    does them (mezo_dist.hf_shards, mezo_dist.export, mezo_dist.checkpoint).

    * fsdp, zero3 start-up: the model is built on meta (FSDP2) or partitioned as it is made
      (ZeRO-3), then every rank reads its own elements of each tensor from the safetensors with
      plain reads: into its shard where that is host memory of the file's dtype, else through a
      host buffer of its piece of one tensor (counted here always: an upper bound). ZeRO-3's
      ``zero.Init`` makes each parameter whole for a moment before it keeps its partition: device
      memory on a GPU, one more tensor of host memory on a CPU.
    * export: one tensor at a time is gathered whole (on the device) and its owner writes it at
      once from a host copy: the largest tensor. On a CPU the gather's output and the copy the
      engine makes of it (FSDP2's unpadded result, ZeRO-3's clone) are both host memory: twice.
    * a training checkpoint: each rank writes its own pieces one at a time from a host copy (on a
      CPU from the piece itself).
    * single: every process loads the whole model on the host (``from_pretrained``); rank 0
      exports from a host copy of the whole state dict.

    ``on_cpu``: ranks on CPUs, whose parameters (the ``parameters`` of :func:`estimate`: the
    shard, and ZeRO-3's persistent parameters) are host memory throughout, so every figure
    includes them. Parameter offload adds its partitions (the ``host`` column of
    :func:`estimate`) throughout; ``s.runtime_overhead_bytes`` is added to every figure.

    Against the aim of a shard plus one block per rank: twice the largest tensor (the embeddings)
    is under one block from OPT-66B up (0.91 and 0.68 of a block for 66B and 175B); in smaller
    models the embeddings outweigh a block. tests/distributed/test_host_memory.py measures these
    figures on CPU ranks.
    """
    w = BYTES[s.dtype]
    e = estimate(shape, "mezo", backend, s)
    base = e.host + s.runtime_overhead_bytes
    largest = shape.largest_param * w
    if backend == "single":
        whole = shape.params * w
        return HostIO(backend, whole + base, whole * (2 if on_cpu else 1) + base,
                      (whole if on_cpu else largest) + base)
    held = e.parameters if on_cpu else 0
    piece = largest_piece(shape, backend, shard_group(backend, s)) * w
    # zero.Init makes each parameter whole before it keeps its partition (before anything is
    # read): on a CPU that tensor is host memory for a moment.
    made = largest if on_cpu and backend.startswith("zero3") else 0
    return HostIO(backend, held + max(piece, made) + base, held + largest * (2 if on_cpu else 1) + base,
                  held + (0 if on_cpu else piece) + base)


def _gib(x: int) -> str:
    return f"{x / GiB:8.2f}"


def report(shape: ModelShape, s: Setting, gpu_bytes: int) -> str:
    head = (f"{shape.name}: {shape.params / 1e9:.3f}B parameters, {shape.layers} layers, hidden {shape.hidden}, "
            f"largest block {shape.block_params / 1e6:.1f}M, outside blocks {shape.root_params / 1e6:.1f}M\n"
            f"{s.gpus} GPU(s) of {gpu_bytes / GiB:g} GiB"
            f"{f' (fsdp: HSDP, {s.hsdp_replicas} replicas of {s.gpus // s.hsdp_replicas})' if s.hsdp_replicas > 1 else ''}, micro-batch {s.batch_size} x {s.seq_len} tokens per rank, "
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
    io_cols = ("backend", "start-up", "export", "checkpoint")
    io = ["", "Host memory per rank outside the step, GiB (every rank alike: each reads and writes only its own "
          "part, one tensor in flight). On GPU ranks; on CPU ranks the parameters, and the tensor an export "
          "gathers, are host memory too.",
          f"{io_cols[0]:<14}" + "".join(f"{c:>12}" for c in io_cols[1:])]
    for backend in BACKENDS:
        h = host_io(shape, backend, s)
        io.append(f"{backend:<14}" + "".join(f"{x / GiB:12.2f}" for x in (h.startup, h.export, h.checkpoint)))
    return head + "\n".join(rows + io)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mezo_dist.plan", description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", required=True,
                   help="A built-in OPT size (facebook/opt-125m ... opt-175b) or a folder with config.json.")
    p.add_argument("--gpus", type=int, default=1, help="Ranks (GPUs) to plan for.")
    p.add_argument("--hsdp_replicas", type=int, default=1,
                   help="fsdp: replica groups (HSDP, e.g. one per node); the model is sharded over gpus / replicas.")
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
    for name in ("gpus", "hsdp_replicas", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.gpus % args.hsdp_replicas:
        raise ConfigError(f"--hsdp_replicas {args.hsdp_replicas} does not divide --gpus {args.gpus}")
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
                runtime_overhead_bytes=int(args.runtime_overhead_gb * GiB), hsdp_replicas=args.hsdp_replicas)
    print(report(shape, s, int(args.gpu_memory_gb * GiB)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
