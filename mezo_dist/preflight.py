"""Start-up checks that read files, run on every rank before any process group starts.

The flag checks in :mod:`mezo_dist.config` are pure; these open what the flags name, the way the
run will: the train file, the model folder, the ds_config (through DeepSpeed's own config
classes), and the output folder with the resume policy. Each problem is one ConfigError line.

Bad input must stop every rank before any of them waits in a rendezvous, so the world size these
checks need (the ds_config's batch sizes, a checkpoint's global batch) is the one the launcher
exported (:func:`distributed.env_world`), the same the process group is then started with.
"""

from __future__ import annotations

from pathlib import Path

from mezo_dist.config import PRECISIONS, TrainConfig, read_ds_config, resume_fields, validate_max_length
from mezo_dist.distributed import env_world
from mezo_dist.errors import ConfigError


def check_inputs(cfg: TrainConfig) -> None:
    """The files the flags name, read as the run will read them (I/O): the train file, the model
    folder, the ds_config through DeepSpeed's own config classes."""
    from mezo_dist.data import read_jsonl
    from mezo_dist.models import check_model_folder, max_positions

    if cfg.data.train_file is not None:
        read_jsonl(cfg.data.train_file)
    config = check_model_folder(cfg.model.model_name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    if config is not None:
        validate_max_length(cfg, max_positions(config))
    if cfg.run.backend == "zero3":
        import torch

        from mezo_dist.placement.deepspeed_config import check_with_deepspeed

        check_with_deepspeed(read_ds_config(cfg.run.ds_config, with_optimizer=cfg.bp.trainer == "regular"),
                             cfg.run.ds_config, micro_batch=cfg.run.per_device_train_batch_size,
                             accumulation=cfg.run.gradient_accumulation_steps, world_size=env_world()[1],
                             dtype=getattr(torch, PRECISIONS[cfg.zo.precision]))


def check_output_dir(cfg: TrainConfig) -> None:
    """Resolve --resume_from_checkpoint and refuse to clobber a previous run's outputs."""
    from mezo_dist.checkpoint import FINISHED_MARKERS, list_checkpoints, read_checkpoint_meta, run_markers
    from mezo_dist.io import check_writable_folder
    from mezo_dist.trajectory import lines_before

    run = cfg.run
    out = Path(run.output_dir)
    check_writable_folder(out, flag="--output_dir")
    for name, folder in (("final", True), ("trajectory.jsonl", False)):
        if (out / name).exists() and (out / name).is_dir() != folder:
            raise ConfigError(f"output_dir {out} holds {name} as a {'file' if folder else 'folder'}; a run writes "
                              f"it as a {'folder' if folder else 'file'} (move it away)")
    if run.resume_from_checkpoint == "latest":
        found = list_checkpoints(out)
        run.resume_from_checkpoint = str(found[-1]) if found else None
        if run.resume_from_checkpoint is None:
            # Nothing to resume yet: start fresh (the first attempt of a restartable job), unless
            # the folder holds a run that finished, which that would overwrite.
            finished = run_markers(out, FINISHED_MARKERS)
            if finished and not run.overwrite_output_dir:
                raise ConfigError(f"output_dir {out} holds a finished run ({', '.join(finished)}) and no checkpoint "
                                  "to resume from; pass --overwrite_output_dir to start afresh")
            return
    if run.resume_from_checkpoint is not None:
        _, state = read_checkpoint_meta(run.resume_from_checkpoint)
        saved, now = state.get("run", {}), resume_fields(cfg, env_world()[1])
        for key, value in now.items():
            if key in saved and saved[key] != value:
                raise ConfigError(
                    f"checkpoint {run.resume_from_checkpoint} was written with {key}={saved[key]!r}; this run has {value!r}"
                )
        if state["step"] > run.max_steps:
            raise ConfigError(f"checkpoint {run.resume_from_checkpoint} is at step {state['step']}, past --max_steps {run.max_steps}")
        lines_before(out / "trajectory.jsonl", state["step"])  # what the resumed run keeps must be sound
        return
    previous = run_markers(out)
    if previous and not run.overwrite_output_dir:
        raise ConfigError(
            f"output_dir {out} already holds a run; pass --resume_from_checkpoint latest or --overwrite_output_dir "
            f"(it has {', '.join(previous[:3])})"
        )
