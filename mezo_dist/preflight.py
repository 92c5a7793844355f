"""Start-up checks that read files or the environment, run on every rank before any process group
starts.

The flag checks of :mod:`mezo_dist.config` are pure; these open what the flags name, the way the
run will: the installed trackers and kernels, the embedded default model and data (prepared on
first use), the train file, the model folder and its config, the ds_config (through DeepSpeed's
own config classes), and the output folder with the resume policy. Each problem is one
ConfigError line. They run before the process group on purpose: bad input must stop every rank
before any of them waits in a rendezvous, and must leave the output folder as it was.

So the world size these checks need (the ds_config's batch sizes, a checkpoint's global batch) is
the one the launcher exported (:func:`distributed.env_world`), the same the process group is then
started with.
"""

from __future__ import annotations

from pathlib import Path

from mezo_dist.checkpoint import resume_fields
from mezo_dist.config import PRECISIONS, TrainConfig, validate_max_length
from mezo_dist.distributed import env_world
from mezo_dist.errors import ConfigError


def check(cfg: TrainConfig) -> None:
    """Every start-up check that reads something, in the order a run needs them; fills the paths
    of the embedded defaults and resolves ``--resume_from_checkpoint latest``."""
    check_environment(cfg)
    resolve_assets(cfg)
    check_inputs(cfg)
    check_output_dir(cfg)


def check_environment(cfg: TrainConfig) -> None:
    """What this install can run: the trackers of --report_to, the kernel of --zo_kernel."""
    from mezo_dist.metrics import tracker_names
    from mezo_dist.zo import passes

    tracker_names(cfg.run.report_to)
    if cfg.zo.zo_kernel == "triton" and not (passes.triton_available() or passes.triton_interpreted()):
        raise ConfigError("--zo_kernel triton needs a CUDA device and the triton package (or TRITON_INTERPRET=1 "
                          "for Triton's interpreter)")


def resolve_assets(cfg: TrainConfig) -> None:
    """Point the embedded defaults at their cached copies, preparing them on first use (every
    rank may: each is published atomically, the first copy wins)."""
    from mezo_dist import assets

    if cfg.model.model_name_or_path == assets.DEFAULT_MODEL:
        cfg.model.model_name_or_path = str(assets.default_model_dir())
    t = cfg.task
    if t.task_name is not None and t.task_name.lower() == "polarity" and t.data_dir is None:
        t.data_dir = str(assets.default_data_dir())


def check_inputs(cfg: TrainConfig) -> None:
    """The files the flags name, read as the run will read them: the task's data folder, the
    train file, the model folder and its config, the ds_config through DeepSpeed's own classes."""
    from mezo_dist.data import read_jsonl
    from mezo_dist.models import check_model_folder, max_positions

    if cfg.task.data_dir is not None and not Path(cfg.task.data_dir).is_dir():
        raise ConfigError(f"--data_dir {cfg.task.data_dir} does not exist")
    if cfg.data.train_file is not None:
        read_jsonl(cfg.data.train_file)
    config = check_model_folder(cfg.model.model_name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    if config is not None:
        validate_max_length(cfg, max_positions(config))
    if cfg.parallel.backend == "zero3":
        check_ds_config(cfg)
    check_masked_lm(cfg, config)


def check_ds_config(cfg: TrainConfig) -> None:
    """The ds_config as the zero3 backend reads it, with the baseline's optimizer section."""
    import torch

    from mezo_dist.placement.deepspeed_config import check_optimizer, check_with_deepspeed, read_ds_config

    path, regular = cfg.parallel.ds_config, cfg.bp.trainer == "regular"
    ds = read_ds_config(path, with_optimizer=regular)
    if regular:
        check_optimizer(ds, path, optim=cfg.bp.optim)
    check_with_deepspeed(ds, path, micro_batch=cfg.run.per_device_train_batch_size,
                         accumulation=cfg.run.gradient_accumulation_steps, world_size=env_world()[1],
                         dtype=getattr(torch, PRECISIONS[cfg.model.precision]))


def check_masked_lm(cfg: TrainConfig, config) -> None:
    """A masked LM scores candidates at mask tokens: it has no causal-LM text loss and cannot
    generate. Checked when the model's config can be read now (``config``: a local folder's; else
    a cached hub id's)."""
    from mezo_dist.models import is_masked_lm, load_config

    if config is None:
        try:
            config = load_config(cfg.model.model_name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError):
            return  # unreadable here; loading reports it with its own message
    if not is_masked_lm(config):
        return
    if cfg.data.train_file is not None:
        raise ConfigError("--train_file trains a causal LM on text; a masked LM trains on a --task_name")
    from mezo_dist.tasks import get_task

    if cfg.task.task_name is not None and get_task(cfg.task.task_name).kind == "generation":
        raise ConfigError(f"task {cfg.task.task_name} generates answers, which needs a causal LM; "
                          f"{cfg.model.model_name_or_path} is a masked LM")


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
