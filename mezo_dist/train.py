"""The training loop over the parts :mod:`mezo_dist.build` makes: resume, run the trainer's
steps, evaluate, checkpoint, export. The loop knows the trainer by its protocol (``trainer.py``)
and the placement by its interface (``placement/base.py``): MeZO, every ``--zo_optimizer`` and
the backprop baseline run through the same lines, on every backend."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mezo_dist.build import EvalSets, build
from mezo_dist.checkpoint import load_checkpoint, resume_fields, rotate_checkpoints, save_checkpoint
from mezo_dist.config import TaskArguments, TrainConfig
from mezo_dist.distributed import DistState
from mezo_dist.errors import TrainingError
from mezo_dist.export import save_pretrained
from mezo_dist.metrics import RunLogger
from mezo_dist.placement.base import Placement
from mezo_dist.replicas import check_replicas


@dataclass
class RunHooks:
    """Callbacks the loop runs at fixed points, empty in a normal run: what the tests' fault
    injection attaches to (``faults.install``), so that the loop itself holds none of it."""

    before_step: list[Callable[[int], None]] = field(default_factory=list)
    # (step, this rank's micro-batches) -> the micro-batches the trainer is given
    micro_batches: list[Callable[[int, list], list]] = field(default_factory=list)
    after_step: list[Callable[[int, Placement], None]] = field(default_factory=list)
    # this rank's checkpoint file is written, the checkpoint not yet published
    checkpoint_written: list[Callable[[], None]] = field(default_factory=list)


class Evaluator:
    """Scores the eval sets on the placed model (collective) and remembers the best dev step."""

    def __init__(self, task: TaskArguments, placement: Placement, tokenizer, sets: EvalSets, logger: RunLogger) -> None:
        self.task, self.placement, self.tokenizer, self.sets, self.logger = task, placement, tokenizer, sets, logger
        self.best: tuple[float, int] | None = None

    def score(self, split: str, step: int) -> dict[str, float]:
        from mezo_dist.evaluate import evaluate_task

        samples = self.sets.dev if split == "dev" else self.sets.eval
        if not samples:
            return {}
        t = self.task
        out = evaluate_task(self.placement, self.tokenizer, samples, metric_prefix=split, batch_size=t.eval_batch_size,
                            max_new_tokens=t.max_new_tokens, max_length=self.sets.max_length,
                            masked_lm=self.sets.masked_lm)
        self.logger.scalars(step, {f"{split}/{k.split('_', 1)[1]}": v for k, v in out.items()})
        return out

    def headline(self, metrics: dict[str, float], split: str) -> float:
        return metrics.get(f"{split}_accuracy", metrics.get(f"{split}_f1", float("nan")))


def train(cfg: TrainConfig, state: DistState, hooks: RunHooks | None = None) -> dict[str, Any]:
    run, hooks = cfg.run, hooks or RunHooks()
    built = build(cfg, state)
    tokenizer, objective, sets, placement, trainer = (built.tokenizer, built.objective, built.sets, built.placement,
                                                      built.trainer)
    start, skipped, best = 0, 0, None
    if run.resume_from_checkpoint:
        saved = load_checkpoint(placement, run.resume_from_checkpoint)
        start, skipped = int(saved["step"]), int(saved["skipped_steps"])
        best = saved.get("best")
        if saved.get("optimizer_state") is not None:
            trainer.load_state_dict(saved["optimizer_state"])
        if state.is_main:
            print(f"resumed from {run.resume_from_checkpoint} at step {start}", flush=True)
    trainer.step_index = start
    steps = 0 if cfg.task.eval_only else run.max_steps
    logger = RunLogger(state, run.output_dir, max_steps=steps, report_to=run.report_to,
                       progress=not run.disable_tqdm, start_step=start)
    evaluator = Evaluator(cfg.task, placement, tokenizer, sets, logger)
    if start and best:
        evaluator.best = (float(best[0]), int(best[1]))
    results: dict[str, float] = {}
    try:
        if sets.eval and start == 0:
            before = evaluator.score("eval", 0)
            results.update({f"initial_{k}": v for k, v in before.items()})
            say(state, f"before training: {before}")
        if cfg.task.eval_only:
            results.update({k.replace("initial_", ""): v for k, v in results.items()})
            logger.write_json("eval_results.json", results)
            return results
        skipped = _loop(cfg, state, placement, trainer, objective, evaluator, logger, hooks, start, skipped)
        if evaluator.best is not None:
            best_metric, best_step = evaluator.best
            load_checkpoint(placement, f"{run.output_dir}/checkpoint-best")
            results.update(best_dev=best_metric, best_step=best_step)
        if sets.eval:
            after = evaluator.score("eval", run.max_steps)
            results.update(after)
            say(state, f"after training: {after}")
        peaks = logger.memory(run.max_steps)
        save_pretrained(placement, tokenizer, f"{run.output_dir}/final")
        if results:
            logger.write_json("eval_results.json", results)
        summary = {"steps": run.max_steps, "skipped_steps": skipped, "backend": cfg.parallel.backend,
                   "world_size": state.world_size, "resumed_from_step": start, "peak_memory_bytes_per_rank": peaks,
                   **trainer.summary()}
        logger.write_json("train_results.json", summary)
        return summary | results
    finally:
        logger.close()


def _loop(cfg, state, placement, trainer, objective, evaluator, logger, hooks, start, skipped) -> int:
    run, backend, fields = cfg.run, cfg.parallel.backend, resume_fields(cfg, state.world_size)
    for step in range(start, run.max_steps):
        for hook in hooks.before_step:
            hook(step)
        t0 = time.perf_counter()
        micro, units = objective.micro_batches(placement, step)
        for wrap in hooks.micro_batches:
            micro = wrap(step, micro)
        rec = trainer.train_step(micro)
        dt = time.perf_counter() - t0
        logger.trajectory(rec.row)
        logger.scalars(step, {**rec.scalars, "perf/step_time_s": dt, f"perf/{objective.unit}_per_s": units / dt})
        logger.progress(rec.progress)
        if rec.skipped:
            skipped += 1
            logger.scalars(step, {"train/skipped_steps": skipped})
            say(state, f"step {step}: {rec.why_skipped}; update skipped")
            if 0 <= run.max_skipped_steps < skipped:
                raise TrainingError(
                    f"{skipped} steps had a non-finite loss, more than --max_skipped_steps {run.max_skipped_steps}"
                )
        done = step + 1
        for hook in hooks.after_step:
            hook(step, placement)
        if run.check_replicas_steps and placement.replicated and done % run.check_replicas_steps == 0:
            check_replicas(placement, step=done)
        if run.logging_steps and done % run.logging_steps == 0:
            logger.memory(step)
        if cfg.task.eval_steps and done % cfg.task.eval_steps == 0 and evaluator.sets.dev:
            metric = evaluator.headline(evaluator.score("dev", done), "dev")
            say(state, f"step {done}: dev {metric:.4f}")
            if evaluator.best is None or metric > evaluator.best[0]:
                evaluator.best = (metric, done)
                save_checkpoint(placement, f"{run.output_dir}/checkpoint-best",
                                {"step": done, "skipped_steps": skipped, "backend": backend, "run": fields},
                                before_publish=hooks.checkpoint_written)
        trainer_state = {"step": done, "skipped_steps": skipped, "backend": backend, "run": fields,
                         "best": evaluator.best}
        opt_state = trainer.state_dict()
        if opt_state is not None:  # what a resume needs beyond the parameters (sparse thresholds, adamezo history)
            trainer_state["optimizer_state"] = opt_state
        if run.save_steps and done % run.save_steps == 0:
            save_checkpoint(placement, f"{run.output_dir}/checkpoint-{done}", trainer_state,
                            before_publish=hooks.checkpoint_written)
            if state.is_main:
                rotate_checkpoints(run.output_dir, run.save_total_limit)
    return skipped


def say(state: DistState, msg: str) -> None:
    if state.is_main:
        print(msg, flush=True)
