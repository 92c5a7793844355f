"""Rebuild fine-tuned weights from the base model and the seed log (``trajectory.jsonl``).

A MeZO run is the base model plus one (seed, projected gradient, lr) triple per step. Replaying
runs the same passes over the parameters as training did, without the forward passes, on any
world size and backend (the noise is layout-invariant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mezo_dist.config import BACKENDS, ModelArguments, parse_into, read_ds_config
from mezo_dist.errors import ConfigError
from mezo_dist.io import json_lines


@dataclass
class ReplayArguments:
    trajectory: str = field(default="", metadata={"help": "The trajectory.jsonl of the run to rebuild."})
    output_dir: str = field(default="", metadata={"help": "Where the rebuilt model is written (Hugging Face format)."})
    backend: Optional[str] = field(default=None, metadata={"help": "single, fsdp or zero3 (default: zero3 with --ds_config, else single)."})
    ds_config: Optional[str] = field(default=None, metadata={"help": "DeepSpeed ZeRO-3 config for the zero3 backend."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an --output_dir that already holds files (refused otherwise)."}
    )
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher."})


# The noise streams a trajectory may name (``passes.STREAMS``; kept here so that reading a
# trajectory needs no torch): rows without a name are ``blocks``.
STREAMS = ("hash", "blocks", "philox")


def read_trajectory(path: str | Path) -> list[dict[str, Any]]:
    """The steps of a run, checked to run 0, 1, 2, ... with everything replay needs."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"trajectory {path} does not exist")
    rows = []
    for n, row in json_lines(p, what="trajectory"):
        if not isinstance(row, dict):
            raise ConfigError(f"trajectory {path} line {n} is not a JSON object")
        missing = {"step", "seed", "projected_grad", "lr", "eps", "wd"} - set(row)
        if missing:
            raise ConfigError(f"trajectory {path} line {n} lacks {', '.join(sorted(missing))}")
        _check_types(row, f"trajectory {path} line {n}")
        if row["step"] != len(rows):
            raise ConfigError(f"trajectory {path} line {n} is step {row['step']}, expected {len(rows)}")
        if not row.get("skipped") and not math.isfinite(row["projected_grad"]):
            raise ConfigError(f"trajectory {path} line {n} has a non-finite projected gradient")
        # Rows written before these fields existed are Gaussian z from the blocks stream.
        if row.get("perturbation", "gaussian") not in ("gaussian", "rademacher"):
            raise ConfigError(f"trajectory {path} line {n} has unknown perturbation {row['perturbation']!r}")
        if row.get("noise", "blocks") not in STREAMS:
            raise ConfigError(f"trajectory {path} line {n} has unknown noise stream {row['noise']!r}")
        if rows and row.get("precision") != rows[0].get("precision"):
            raise ConfigError(f"trajectory {path} line {n} changes precision mid-run")
        _check_optimizer(row, rows[0] if rows else row, f"trajectory {path} line {n}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"trajectory {path} is empty")
    return rows


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_types(row: dict[str, Any], where: str) -> None:
    """Each field of a row as training writes it (a string or a list where a number belongs is
    refused here, not met as a TypeError in the middle of the replay)."""
    for key in ("step", "seed"):
        if not isinstance(row[key], int) or isinstance(row[key], bool) or row[key] < 0:
            raise ConfigError(f"{where}: {key} is {row[key]!r}, not a non-negative integer")
    for key in ("projected_grad", "lr", "eps", "wd"):
        if not _number(row[key]):
            raise ConfigError(f"{where}: {key} is {row[key]!r}, not a number")
    if not (math.isfinite(row["lr"]) and math.isfinite(row["wd"]) and math.isfinite(row["eps"]) and row["eps"] > 0):
        raise ConfigError(f"{where}: lr, eps and wd must be finite and eps > 0")
    if not isinstance(row.get("skipped", False), bool):
        raise ConfigError(f"{where}: skipped is {row['skipped']!r}, not true or false")
    directions = row.get("directions")
    if directions is not None and not (isinstance(directions, list) and directions and all(
            isinstance(d, list) and len(d) == 2 and isinstance(d[0], int) and not isinstance(d[0], bool) and _number(d[1])
            for d in directions)):
        raise ConfigError(f"{where}: directions must be a list of [seed, projected_grad] pairs")


def _check_optimizer(row: dict[str, Any], first: dict[str, Any], where: str) -> None:
    """The zeroth-order optimizer of a row (none: mezo) is known, holds what its replay needs and
    is the run's from its first row, hyper-parameters included."""
    from mezo_dist.zo.optimizers import HYPER_FLAGS, NAMES, ROW_FIELDS

    name = row.get("optimizer", "mezo")
    if name not in NAMES:
        raise ConfigError(f"{where} has unknown optimizer {name!r}")
    if name != first.get("optimizer", "mezo"):
        raise ConfigError(f"{where} changes optimizer mid-run")
    missing = [k for k in ROW_FIELDS[name] if k not in row and not (k == "sigma" and row.get("skipped"))]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)} ({name})")
    changed = [k for k in HYPER_FLAGS[name] if row[k] != first[k]]
    if changed:
        raise ConfigError(f"{where} changes {changed[0]} mid-run")


def replay(placement, rows: list[dict[str, Any]]) -> None:
    """Apply every logged step to ``placement`` in order."""
    from mezo_dist.zo import optimizers, passes

    streams = {row.get("noise", "blocks") for row in rows}
    if len(streams) > 1:
        raise ConfigError(f"trajectory mixes noise streams ({' and '.join(sorted(streams))}); it cannot be replayed "
                          "as one run")
    # The path that drew the run's z, not this device's default: a CPU run replays on a GPU too.
    kernel = passes.kernel_for_stream(streams.pop())
    try:
        zo = optimizers.for_replay(placement, rows[0], kernel=kernel)
    except ValueError as e:
        if kernel != "triton":
            raise ConfigError(f"trajectory cannot be replayed: {e}") from None
        raise ConfigError(f"trajectory was drawn by the fused CUDA pass (philox stream) and {e}") from None
    placement.eval()
    for row in rows:
        zo.eps, zo.weight_decay = float(row["eps"]), float(row["wd"])
        zo.perturbation = row.get("perturbation", "gaussian")
        optimizers.replay_row(zo, row)


def main(argv: list[str] | None = None) -> int:
    from mezo_dist import interrupt

    with interrupt.handling():
        try:
            return _main(argv)
        except interrupt.Interrupted as e:
            return interrupt.stop(e.signum)


def _main(argv: list[str] | None) -> int:
    import sys

    from mezo_dist import interrupt
    from mezo_dist.cli import say
    from mezo_dist.export import check_export_dir

    try:
        model_args, args = parse_into((ModelArguments, ReplayArguments), argv)
        if not args.output_dir:
            raise ConfigError("--output_dir is required")
        check_export_dir(args.output_dir, overwrite=args.overwrite_output_dir)
        rows = read_trajectory(args.trajectory)
        backend = args.backend or ("zero3" if args.ds_config else "single")
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        from mezo_dist import assets
        from mezo_dist.models import check_model_folder

        if model_args.model_name_or_path == assets.DEFAULT_MODEL:
            model_args.model_name_or_path = str(assets.default_model_dir())
        check_model_folder(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
        if backend == "zero3":
            import torch

            from mezo_dist.distributed import env_world
            from mezo_dist.placement.deepspeed_config import check_with_deepspeed

            check_with_deepspeed(read_ds_config(args.ds_config), args.ds_config, micro_batch=1, accumulation=1,
                                 world_size=env_world()[1], dtype=torch.float32)
    except ConfigError as e:
        say(str(e))
        return 2
    interrupt.describe_with(lambda: f"{args.output_dir} was not written")

    from mezo_dist.cli import run_on_ranks
    from mezo_dist.export import save_pretrained
    from mezo_dist.models import load_tokenizer
    from mezo_dist.train import build_placement

    def body(state) -> int:
        compute = None
        if rows[0].get("precision") not in (None, "fp32") and model_args.torch_dtype == "float32":
            # Only zero3 depends on it (its fp32 masters start from the model rounded to it).
            from mezo_dist.config import PRECISIONS
            from mezo_dist.models import DTYPES

            compute = DTYPES[PRECISIONS[rows[0]["precision"]]]
        placement = build_placement(model_args, state, backend=backend, ds_config=args.ds_config, micro_batch=1,
                                    compute_dtype=compute)
        replay(placement, rows)
        tokenizer = load_tokenizer(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
        save_pretrained(placement, tokenizer, args.output_dir)
        if state.is_main:
            print(f"replayed {len(rows)} steps on {backend} x{state.world_size}; model in {args.output_dir}", flush=True)
        return 0

    code = run_on_ranks(body, use_deepspeed=backend == "zero3", need_group=backend == "fsdp")
    sys.stdout.flush()
    return code
