"""Rebuild fine-tuned weights from the base model and the seed log (``trajectory.jsonl``).

A MeZO run is the base model plus one (seed, projected gradient, lr) triple per step. Replaying
runs the same passes over the parameters as training did, without the forward passes, on any
world size and backend (the noise is layout-invariant).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from mezo_dist.config import BACKENDS, CommandLine, ModelArguments, PeftArguments, model_flags, parse
from mezo_dist.errors import ConfigError
from mezo_dist import trajectory
from mezo_dist.trajectory import read_trajectory


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


# The model flags of launch/train.py but --precision (the trajectory says which), then replay's own.
REPLAY = CommandLine((ModelArguments, PeftArguments, ReplayArguments),
                     model_flags(with_precision=False) + tuple(f.name for f in dataclasses.fields(ReplayArguments)))


def replay(placement, rows: list[dict[str, Any]]) -> None:
    """Apply every logged step to ``placement`` in order."""
    from mezo_dist.zo import optimizers, passes

    streams = {trajectory.value(row, "noise") for row in rows}
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
        zo.perturbation = trajectory.value(row, "perturbation")
        zo.replay_row(row)


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
        (model_args, peft_args, args), _ = parse(REPLAY, argv)
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
            from mezo_dist.placement.deepspeed_config import check_with_deepspeed, read_ds_config

            check_with_deepspeed(read_ds_config(args.ds_config), args.ds_config, micro_batch=1, accumulation=1,
                                 world_size=env_world()[1], dtype=torch.float32)
    except ConfigError as e:
        say(str(e))
        return 2
    interrupt.describe_with(lambda: f"{args.output_dir} was not written")

    from mezo_dist.cli import run_on_ranks
    from mezo_dist.export import save_pretrained
    from mezo_dist.models import load_tokenizer
    from mezo_dist.placement.build import build_placement, group_needs

    def body(state) -> int:
        compute = None
        if trajectory.value(rows[0], "precision") not in (None, "fp32") and model_args.torch_dtype == "float32":
            # Only zero3 depends on it (its fp32 masters start from the model rounded to it).
            from mezo_dist.config import PRECISIONS
            from mezo_dist.models import DTYPES

            compute = DTYPES[PRECISIONS[rows[0]["precision"]]]
        placement = build_placement(model_args, state, peft=peft_args, backend=backend, ds_config=args.ds_config,
                                    micro_batch=1, compute_dtype=compute)
        replay(placement, rows)
        tokenizer = load_tokenizer(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
        save_pretrained(placement, tokenizer, args.output_dir)
        if state.is_main:
            print(f"replayed {len(rows)} steps on {backend} x{state.world_size}; model in {args.output_dir}", flush=True)
        return 0

    code = run_on_ranks(body, **group_needs(backend))
    sys.stdout.flush()
    return code
