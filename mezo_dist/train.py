"""The training loop: build the placement, run MeZO steps, log, save."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from mezo_dist.checkpoint import save_pretrained
from mezo_dist.config import TrainConfig, read_ds_config
from mezo_dist.data import GlobalBatches, TokenizedText, read_jsonl
from mezo_dist.distributed import DistState
from mezo_dist.metrics import RunLogger
from mezo_dist.models import DTYPES, load_tokenizer
from mezo_dist.placement.base import Placement
from mezo_dist.schedule import lr_schedule
from mezo_dist.zo.step import MeZO


def build_placement(cfg: TrainConfig, state: DistState) -> Placement:
    m = cfg.model
    dtype = DTYPES[m.torch_dtype]
    if cfg.run.backend == "single":
        from mezo_dist.placement.single import build_single

        return build_single(m.model_name_or_path, state, dtype=dtype, trust_remote_code=m.trust_remote_code)
    if cfg.run.backend == "fsdp":
        from mezo_dist.placement.fsdp import build_fsdp

        return build_fsdp(m.model_name_or_path, state, dtype=dtype, trust_remote_code=m.trust_remote_code)
    from mezo_dist.placement.zero3 import build_zero3

    return build_zero3(
        m.model_name_or_path,
        read_ds_config(cfg.run.ds_config),
        state,
        micro_batch=cfg.run.per_device_train_batch_size,
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


def train(cfg: TrainConfig, state: DistState) -> dict[str, Any]:
    run = cfg.run
    tokenizer = load_tokenizer(cfg.model.model_name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    data = TokenizedText.build(read_jsonl(cfg.data.train_file), tokenizer, cfg.data.max_length)
    batches = GlobalBatches(
        data, micro_batch=run.per_device_train_batch_size, rank=state.rank, world_size=state.world_size, seed=run.seed
    )
    placement = build_placement(cfg, state)
    zo = MeZO(
        placement,
        lr=lr_schedule(cfg.zo.lr_scheduler_type, cfg.zo.learning_rate, run.max_steps, cfg.zo.warmup_steps),
        eps=cfg.zo.zo_eps,
        weight_decay=cfg.zo.weight_decay,
        seed=run.seed,
    )
    logger = RunLogger(
        state, run.output_dir, max_steps=run.max_steps, tensorboard=run.report_to == "tensorboard",
        progress=not run.disable_tqdm,
    )
    skipped = 0
    try:
        for step in range(run.max_steps):
            batch, global_tokens = batches.batch(step)
            batch = {k: v.to(state.device) for k, v in batch.items()}
            t0 = time.perf_counter()
            res = zo.step(lambda: causal_lm_loss(placement, batch))
            dt = time.perf_counter() - t0
            skipped += res.skipped
            logger.trajectory(
                {"step": res.step, "seed": res.seed, "projected_grad": res.projected_grad, "loss": res.loss, "lr": res.lr}
                | ({"skipped": True} if res.skipped else {})
            )
            logger.scalars(step, {
                "train/loss": res.loss, "train/projected_grad": res.projected_grad, "train/lr": res.lr,
                "perf/step_time_s": dt, "perf/tokens_per_s": 2 * global_tokens / dt,
            })
            logger.progress({"loss": res.loss, "g": res.projected_grad})
            if res.skipped and state.is_main:
                print(f"step {step}: non-finite loss ({res.loss_plus}, {res.loss_minus}); update skipped", flush=True)
            if run.logging_steps and (step + 1) % run.logging_steps == 0:
                logger.memory(step)
            if run.save_steps and (step + 1) % run.save_steps == 0 and step + 1 < run.max_steps:
                save_pretrained(placement, tokenizer, f"{run.output_dir}/checkpoint-{step + 1}")
        peaks = logger.memory(run.max_steps)
        save_pretrained(placement, tokenizer, f"{run.output_dir}/final")
        summary = {"steps": run.max_steps, "skipped_steps": skipped, "backend": run.backend,
                   "world_size": state.world_size, "peak_memory_bytes_per_rank": peaks}
        logger.write_json("train_results.json", summary)
        return summary
    finally:
        logger.close()
