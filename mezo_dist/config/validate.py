"""Checks of the flags alone: no file, no environment, no process group. Each problem is one
:class:`ConfigError` line. Defaults that depend on other flags (the demo's values, the task's,
the optimizer's, the precision of the parameters' dtype) are filled here too.

What needs a file or the installed packages to judge (the train file, the model folder, the
ds_config, the output folder, the trackers) is checked by :mod:`mezo_dist.preflight`, also before
any process group starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mezo_dist.config.args import (
    BACKENDS, DEMO_DEFAULTS, PRECISIONS, SCHEDULES, TEXT_MAX_LENGTH, BackpropArguments, ModelArguments,
    ParallelArguments, PeftArguments, TrainConfig, ZOArguments,
)
from mezo_dist.config.parse import parse_train
from mezo_dist.errors import ConfigError

# |z| of a Gaussian draw stays below this (P(|z| > 8) is about 1e-15 per element).
Z_BOUND = 8.0


def parse_args(argv: list[str] | None = None, *, env: Mapping[str, str] | None = None) -> TrainConfig:
    """``launch/train.py``'s command line, checked, with every dependent default filled.

    Args:
        argv: the command line (None: ``sys.argv[1:]``).
        env: the launcher's environment, read for what ``accelerate launch`` implies about the
            backend (None: no launcher).
    """
    cfg, given = parse_train(argv)
    resolve_backend(cfg.parallel, env or {})
    validate(cfg, given=given)
    return cfg


def resolve_backend(parallel: ParallelArguments, env: Mapping[str, str]) -> None:
    """Pick the placement: the flag, else what the ds_config or the accelerate launcher (its
    variables in ``env``) implies."""
    if parallel.ds_config is None and env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        parallel.ds_config = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
        if parallel.ds_config is None:
            raise ConfigError("accelerate launched with DeepSpeed but without deepspeed_config_file; point it to ds_configs/zero3.json")
        if parallel.backend is None:
            parallel.backend = "zero3"
    if parallel.backend is None:
        if parallel.ds_config is not None:
            parallel.backend = "zero3"
        elif env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            parallel.backend = "fsdp"
        else:
            parallel.backend = "single"


def _positive(name: str, value: float, *, strict: bool = True) -> None:
    bad = not math.isfinite(value) or (value <= 0 if strict else value < 0)
    if bad:
        raise ConfigError(f"--{name} must be {'> 0' if strict else '>= 0'}, got {value}")


def validate(cfg: TrainConfig, *, given: frozenset[str]) -> None:
    """Check the flags, filling the defaults that depend on others (``given``: the fields whose
    flags the command line typed, which the demo's defaults leave alone)."""
    apply_demo_defaults(cfg, given)
    run, optim = cfg.run, cfg.optim
    validate_zo(cfg.zo, trainer=cfg.bp.trainer)
    if cfg.parallel.backend not in BACKENDS:
        raise ConfigError(f"unknown backend {cfg.parallel.backend!r}; choose one of {', '.join(BACKENDS)}")
    for flag, value, allowed in (
        ("torch_dtype", cfg.model.torch_dtype, ("float32", "bfloat16", "float16")),
        ("lr_scheduler_type", optim.lr_scheduler_type, SCHEDULES),
    ):
        if value not in allowed:
            raise ConfigError(f"unknown --{flag} {value!r}; choose one of {', '.join(allowed)}")
    _positive("zo_eps", cfg.zo.zo_eps)
    _positive("learning_rate", optim.learning_rate, strict=False)
    _positive("weight_decay", optim.weight_decay, strict=False)
    if run.per_device_train_batch_size < 1:
        raise ConfigError(f"--per_device_train_batch_size must be >= 1, got {run.per_device_train_batch_size}")
    if run.max_steps < 0:
        raise ConfigError(f"--max_steps must be >= 0, got {run.max_steps}")
    if cfg.data.max_length is not None and cfg.data.max_length < 2:
        raise ConfigError(f"--max_length must be >= 2, got {cfg.data.max_length}")
    for name in ("logging_steps", "save_steps", "warmup_steps", "save_total_limit", "check_replicas_steps"):
        obj = optim if name == "warmup_steps" else run
        if getattr(obj, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(obj, name)}")
    validate_peft(cfg.peft)
    validate_hsdp(cfg.parallel)
    validate_backprop(cfg)
    validate_precision(cfg.model, cfg.zo, trainer=cfg.bp.trainer, backend=cfg.parallel.backend)
    if cfg.parallel.backend != "zero3" and cfg.parallel.ds_config is not None:
        raise ConfigError(f"--ds_config is for the zero3 backend, not {cfg.parallel.backend}")
    validate_magnitudes(cfg)
    if cfg.task.non_diff and cfg.data.train_file is not None and cfg.task.task_name is None:
        raise ConfigError("--non_diff optimises a task's metric; --train_file trains on the text loss (pass --task_name)")
    validate_task(cfg)


def apply_demo_defaults(cfg: TrainConfig, given: frozenset[str]) -> None:
    """In demo mode (no task, no train file), the demo's values for the flags the command line
    did not type (``given``), whatever the values of those it typed."""
    if cfg.task.task_name is not None or cfg.data.train_file is not None:
        return
    for group, values in DEMO_DEFAULTS.items():
        for key, value in values.items():
            if key not in given:
                setattr(getattr(cfg, group), key, value)


def validate_peft(peft: PeftArguments) -> None:
    if peft.lora and peft.prefix_tuning:
        raise ConfigError("--lora and --prefix_tuning are exclusive; pass one")
    if peft.prefix_tuning and peft.num_prefix < 1:
        raise ConfigError(f"--num_prefix must be >= 1, got {peft.num_prefix}")
    if peft.prefix_init not in ("real", "random"):
        raise ConfigError(f"unknown --prefix_init {peft.prefix_init!r}; choose one of real, random")
    if peft.lora and peft.lora_r < 1:
        raise ConfigError(f"--lora_r must be >= 1, got {peft.lora_r}")


def validate_magnitudes(cfg: TrainConfig) -> None:
    """Finite values that still cannot work in the dtypes of the run."""
    import torch

    zo, model = cfg.zo, cfg.model
    values = torch.finfo(getattr(torch, model.torch_dtype))
    compute = torch.finfo(getattr(torch, PRECISIONS.get(model.precision or "fp32", "float32")))
    top = min(values.max, compute.max)
    if zo.zo_eps * Z_BOUND > top:
        raise ConfigError(f"--zo_eps {zo.zo_eps:g} is too large: theta + eps * z (|z| up to about {Z_BOUND:g}) "
                          f"overflows the run's dtypes (largest value {top:.3g})")
    if zo.zo_eps < values.tiny:
        raise ConfigError(f"--zo_eps {zo.zo_eps:g} is too small: below {values.tiny:.3g}, the smallest normal "
                          f"{model.torch_dtype} value, the perturbation vanishes")
    for flag in ("learning_rate", "weight_decay"):
        if getattr(cfg.optim, flag) > values.max:
            raise ConfigError(f"--{flag} {getattr(cfg.optim, flag):g} does not fit {model.torch_dtype} "
                              f"(largest value {values.max:.3g})")


def validate_max_length(cfg: TrainConfig, positions: int | None) -> None:
    """--max_length (or the text default) within the model's ``positions``."""
    want = cfg.data.max_length or (TEXT_MAX_LENGTH if cfg.data.train_file is not None else None)
    if positions is not None and want is not None and want > positions:
        given = "" if cfg.data.max_length else " (the default for --train_file text)"
        raise ConfigError(f"--max_length {want}{given} exceeds the {positions} positions of "
                          f"{cfg.model.model_name_or_path}; pass --max_length {positions} or less")


def validate_zo(zo: ZOArguments, *, trainer: str = "zo") -> None:
    """--zo_optimizer and its flags (``trainer``: ``--trainer``); fills the defaults that depend on it."""
    from mezo_dist.trajectory import OPTIMIZERS

    if zo.zo_optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown --zo_optimizer {zo.zo_optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if trainer == "regular" and zo.zo_optimizer != "mezo":
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


def validate_precision(model: ModelArguments, zo: ZOArguments, *, trainer: str, backend: str) -> None:
    """--torch_dtype is the dtype of the values MeZO edits, --precision that of the forwards:
    fp32 values may run any precision; bf16/fp16 values only their own. Also the noise: its
    distribution and the kernel that draws it (whether that kernel can run here is preflight's)."""
    from mezo_dist.zo.passes import KERNELS

    dtype = model.torch_dtype
    if zo.zo_perturbation not in ("gaussian", "rademacher"):
        raise ConfigError(f"unknown --zo_perturbation {zo.zo_perturbation!r}; choose one of gaussian, rademacher")
    if zo.zo_kernel not in KERNELS:
        raise ConfigError(f"unknown --zo_kernel {zo.zo_kernel!r}; choose one of {', '.join(KERNELS)}")
    if model.precision is None:
        model.precision = {v: k for k, v in PRECISIONS.items()}.get(dtype, "fp32")
    if model.precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {model.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if dtype != "float32" and PRECISIONS[model.precision] != dtype:
        raise ConfigError(f"--precision {model.precision} contradicts --torch_dtype {dtype}: low-precision parameters "
                          "compute in their own dtype; use --torch_dtype float32 for fp32 values with "
                          f"{model.precision} compute")
    # The baseline's mixed precision: autocast (single), FSDP2's policy, DeepSpeed's bf16/fp16
    # engine. fp16 gradients need loss scaling, which only DeepSpeed's engine does here.
    if model.mixed_precision and trainer == "regular" and model.precision == "fp16" and backend != "zero3":
        raise ConfigError("--trainer regular with --precision fp16 needs loss scaling, which only the zero3 "
                          "backend's engine does; use --precision bf16")


def validate_backprop(cfg: TrainConfig) -> None:
    """--trainer and the baseline's flags, and the MeZO-only settings it cannot take."""
    bp, run, zo = cfg.bp, cfg.run, cfg.zo
    for flag, value, allowed in (("trainer", bp.trainer, ("zo", "regular")), ("optim", bp.optim, ("adamw", "sgd"))):
        if value not in allowed:
            raise ConfigError(f"unknown --{flag} {value!r}; choose one of {', '.join(allowed)}")
    if run.gradient_accumulation_steps < 1:
        raise ConfigError(f"--gradient_accumulation_steps must be >= 1, got {run.gradient_accumulation_steps}")
    if zo.zo_num_directions < 1:
        raise ConfigError(f"--zo_num_directions must be >= 1, got {zo.zo_num_directions}")
    if bp.trainer == "regular" and zo.zo_num_directions != 1:
        raise ConfigError("--zo_num_directions is a MeZO setting; --trainer regular computes exact gradients")
    if bp.trainer == "regular" and run.resume_from_checkpoint is not None:
        raise ConfigError("--resume_from_checkpoint resumes MeZO runs; --trainer regular would also need the "
                          "optimizer state, which mezo_dist checkpoints do not hold")
    if bp.trainer == "regular" and cfg.task.non_diff:
        raise ConfigError("--non_diff needs --trainer zo: a metric has no gradient to backpropagate")
    validate_adam(bp)


def validate_adam(bp: BackpropArguments) -> None:
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(bp, name) < 1.0:
            raise ConfigError(f"--{name} must be in [0, 1), got {getattr(bp, name)}")
    _positive("adam_epsilon", bp.adam_epsilon)
    _positive("momentum", bp.momentum, strict=False)
    _positive("max_grad_norm", bp.max_grad_norm, strict=False)


def validate_hsdp(parallel: ParallelArguments) -> None:
    """The flag alone; that the replica count divides the world size is checked where the world
    is known (``distributed.init_distributed``)."""
    if parallel.hsdp_replicas == 1:
        return
    if parallel.hsdp_replicas < 1:
        raise ConfigError(f"--hsdp_replicas must be >= 1, got {parallel.hsdp_replicas}")
    if parallel.backend != "fsdp":
        raise ConfigError(f"--hsdp_replicas is for the fsdp backend, not {parallel.backend}")


def validate_task(cfg: TrainConfig) -> None:
    """The task's flags; fills the task's own defaults for what the user left unset (the paper's,
    where it sets them). That --data_dir exists is preflight's."""
    from mezo_dist.tasks import get_task

    t = cfg.task
    if t.task_name is None:
        return
    task = get_task(t.task_name)
    task.template(t.template)
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
    if not t.eval_only and t.num_train == 0:
        raise ConfigError("--num_train 0 leaves nothing to train on; use --eval_only for zero-shot")
    if cfg.data.train_file is not None:
        raise ConfigError("--train_file (causal-LM text) and --task_name are exclusive; pass one")
