"""The training loop: build the placement, resume, run MeZO steps, log, checkpoint, export."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from mezo_dist import faults
from mezo_dist.checkpoint import load_checkpoint, rotate_checkpoints, save_checkpoint
from mezo_dist.config import ModelArguments, TrainConfig, read_ds_config, resume_fields
from mezo_dist.data import GlobalBatches, TokenizedText, read_jsonl
from mezo_dist.distributed import DistState
from mezo_dist.errors import TrainingError
from mezo_dist.export import save_pretrained
from mezo_dist.metrics import RunLogger
from mezo_dist.models import DTYPES, load_tokenizer
from mezo_dist.placement.base import Placement
from mezo_dist.replicas import check_replicas
from mezo_dist.schedule import lr_schedule
from mezo_dist.zo.step import MeZO, StepResult


def build_placement(
    m: ModelArguments, state: DistState, *, backend: str, ds_config: str | None, micro_batch: int
) -> Placement:
    """The model on this rank, as ``backend`` places it."""
    dtype = DTYPES[m.torch_dtype]
    if backend == "single":
        from mezo_dist.placement.single import build_single

        return build_single(m.model_name_or_path, state, dtype=dtype, trust_remote_code=m.trust_remote_code)
    if backend == "fsdp":
        from mezo_dist.placement.fsdp import build_fsdp

        return build_fsdp(m.model_name_or_path, state, dtype=dtype, trust_remote_code=m.trust_remote_code)
    from mezo_dist.placement.zero3 import build_zero3

    return build_zero3(
        m.model_name_or_path,
        read_ds_config(ds_config),
        state,
        micro_batch=micro_batch,
        dtype=dtype,
        trust_remote_code=m.trust_remote_code,
    )


def causal_lm_loss(placement: Placement, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses, number of target tokens) on this rank's micro-batch."""
    logits = placement.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    )
    # Summed in float64: per-token losses agree bit for bit across layouts, and a float64 sum
    # keeps the order of summation (1 process vs N ranks) from showing up in L+ - L-.
    return per_token.double().sum(), (targets != -100).sum()


def make_closure(placement: Placement, batch: dict[str, torch.Tensor], *, poison: bool):
    calls = {"n": 0}

    def closure():
        out = causal_lm_loss(placement, batch)
        calls["n"] += 1
        if poison and calls["n"] == 2:  # test-only: a NaN on the minus side
            return out[0] * float("nan"), out[1]
        return out

    return closure


def trajectory_row(res: StepResult, zo: MeZO) -> dict[str, Any]:
    # eps and wd ride along so that the file alone can replay the run.
    row = {"step": res.step, "seed": res.seed, "projected_grad": res.projected_grad, "loss": res.loss,
           "lr": res.lr, "eps": zo.eps, "wd": zo.weight_decay}
    if res.skipped:
        row["skipped"] = True
    return row


def train(cfg: TrainConfig, state: DistState) -> dict[str, Any]:
    run = cfg.run
    tokenizer = load_tokenizer(cfg.model.model_name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    data = TokenizedText.build(read_jsonl(cfg.data.train_file), tokenizer, cfg.data.max_length)
    batches = GlobalBatches(
        data, micro_batch=run.per_device_train_batch_size, rank=state.rank, world_size=state.world_size, seed=run.seed
    )
    placement = build_placement(
        cfg.model, state, backend=run.backend, ds_config=run.ds_config, micro_batch=run.per_device_train_batch_size
    )
    zo = MeZO(
        placement,
        lr=lr_schedule(cfg.zo.lr_scheduler_type, cfg.zo.learning_rate, run.max_steps, cfg.zo.warmup_steps),
        eps=cfg.zo.zo_eps,
        weight_decay=cfg.zo.weight_decay,
        seed=run.seed,
    )
    start, skipped = 0, 0
    if run.resume_from_checkpoint:
        saved = load_checkpoint(placement, run.resume_from_checkpoint)
        start, skipped = int(saved["step"]), int(saved["skipped_steps"])
        if state.is_main:
            print(f"resumed from {run.resume_from_checkpoint} at step {start}", flush=True)
    zo.step_index = start
    logger = RunLogger(
        state, run.output_dir, max_steps=run.max_steps, tensorboard=run.report_to == "tensorboard",
        progress=not run.disable_tqdm, start_step=start,
    )
    fields = resume_fields(cfg)
    poisoned = faults.nan_steps()
    try:
        for step in range(start, run.max_steps):
            faults.maybe_kill(state.rank, step)
            batch, global_tokens = batches.batch(step)
            batch = {k: v.to(state.device) for k, v in batch.items()}
            t0 = time.perf_counter()
            res = zo.step(make_closure(placement, batch, poison=step in poisoned))
            dt = time.perf_counter() - t0
            logger.trajectory(trajectory_row(res, zo))
            logger.scalars(step, {
                "train/loss": res.loss, "train/projected_grad": res.projected_grad, "train/lr": res.lr,
                "perf/step_time_s": dt, "perf/tokens_per_s": 2 * global_tokens / dt,
            })
            logger.progress({"loss": res.loss, "g": res.projected_grad})
            if res.skipped:
                skipped += 1
                logger.scalars(step, {"train/skipped_steps": skipped})
                if state.is_main:
                    print(f"step {step}: non-finite loss ({res.loss_plus}, {res.loss_minus}); update skipped", flush=True)
                if 0 <= run.max_skipped_steps < skipped:
                    raise TrainingError(
                        f"{skipped} steps had a non-finite loss, more than --max_skipped_steps {run.max_skipped_steps}"
                    )
            done = step + 1
            faults.maybe_drift(state.rank, step, placement)
            if run.check_replicas_steps and placement.name == "single" and done % run.check_replicas_steps == 0:
                check_replicas(placement, step=done)
            if run.logging_steps and done % run.logging_steps == 0:
                logger.memory(step)
            if run.save_steps and done % run.save_steps == 0:
                trainer_state = {"step": done, "skipped_steps": skipped, "backend": run.backend, "run": fields}
                save_checkpoint(placement, f"{run.output_dir}/checkpoint-{done}", trainer_state)
                if state.is_main:
                    rotate_checkpoints(run.output_dir, run.save_total_limit)
        peaks = logger.memory(run.max_steps)
        save_pretrained(placement, tokenizer, f"{run.output_dir}/final")
        summary = {"steps": run.max_steps, "skipped_steps": skipped, "backend": run.backend,
                   "world_size": state.world_size, "resumed_from_step": start, "peak_memory_bytes_per_rank": peaks}
        logger.write_json("train_results.json", summary)
        return summary
    finally:
        logger.close()
