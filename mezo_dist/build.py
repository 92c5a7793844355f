"""Start-up once the process group exists: the run's parts, built from the checked flags.

The flags were checked without I/O (:mod:`mezo_dist.config`) and the files they name were read
once before the group started (:mod:`mezo_dist.preflight`); here each component is built from
the flag groups it needs, with the objects made at run time (the distributed state, the
tokenizer, the model's config, the placement) passed in: the tokenizer and the model's config,
the objective and evaluation sets (the task's data or the train file), the placement (the model,
placed and loaded), and the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mezo_dist.config import (
    PRECISIONS, TEXT_MAX_LENGTH, BackpropArguments, DataArguments, ModelArguments, OptimArguments, RunArguments,
    TaskArguments, TrainConfig, ZOArguments,
)
from mezo_dist.distributed import DistState
from mezo_dist.placement.base import Placement
from mezo_dist.tasks.base import Sample
from mezo_dist.trainer import Trainer


@dataclass
class EvalSets:
    """Samples to score: ``dev`` picks the best step, ``eval`` is reported; ``max_length`` and
    ``masked_lm`` say how they are encoded."""

    dev: list[Sample] = field(default_factory=list)
    eval: list[Sample] = field(default_factory=list)
    max_length: int | None = None
    masked_lm: bool = False


@dataclass
class Built:
    """The parts of one run, ready for the loop."""

    tokenizer: Any
    objective: Any  # objectives.TextObjective or objectives.TaskObjective
    sets: EvalSets
    placement: Placement
    trainer: Trainer


def build(cfg: TrainConfig, state: DistState) -> Built:
    """Every part of the run on this rank (collective: the placement loads the model)."""
    from mezo_dist.models import load_config, load_tokenizer
    from mezo_dist.placement.build import build_placement

    m, run = cfg.model, cfg.run
    tokenizer = load_tokenizer(m.model_name_or_path, trust_remote_code=m.trust_remote_code)
    model_config = load_config(m.model_name_or_path, trust_remote_code=m.trust_remote_code)
    objective, sets = build_objective(cfg.data, cfg.task, run, state, tokenizer=tokenizer, model_config=model_config)
    regular = cfg.bp.trainer == "regular"
    placement = build_placement(m, state, peft=cfg.peft, backend=cfg.parallel.backend, ds_config=cfg.parallel.ds_config,
                                micro_batch=run.per_device_train_batch_size,
                                accumulation=run.gradient_accumulation_steps, backprop=cfg.bp if regular else None,
                                learning_rate=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay,
                                compute_dtype=compute_dtype(m))
    trainer = build_trainer(placement, cfg.optim, cfg.zo, cfg.bp, max_steps=run.max_steps, seed=run.seed,
                            precision=m.precision if m.mixed_precision else None)
    return Built(tokenizer=tokenizer, objective=objective, sets=sets, placement=placement, trainer=trainer)


def compute_dtype(model: ModelArguments) -> torch.dtype | None:
    """The forward dtype when it differs from the fp32 values MeZO edits, else None."""
    from mezo_dist.models import DTYPES

    return DTYPES[PRECISIONS[model.precision]] if model.mixed_precision else None


def build_trainer(placement: Placement, optim: OptimArguments, zo: ZOArguments, bp: BackpropArguments, *,
                  max_steps: int, seed: int, precision: str | None) -> Trainer:
    """MeZO or the optimizer ``--zo_optimizer`` names, or with ``--trainer regular`` the baseline.

    Args:
        max_steps: the run's length (a schedule's horizon).
        seed: the run seed, from which every step's seed is drawn.
        precision: the forwards' precision when it differs from the fp32 values MeZO edits.
    """
    from mezo_dist.schedule import lr_schedule
    from mezo_dist.zo import optimizers

    schedule = lr_schedule(optim.lr_scheduler_type, optim.learning_rate, max_steps, optim.warmup_steps)
    if bp.trainer == "regular":
        from mezo_dist.backprop import Backprop

        return Backprop(placement, bp, lr=schedule, weight_decay=optim.weight_decay)
    return optimizers.build(zo.zo_optimizer, placement, lr=schedule, eps=zo.zo_eps, weight_decay=optim.weight_decay,
                            seed=seed, num_directions=zo.zo_num_directions, perturbation=zo.zo_perturbation,
                            kernel=zo.zo_kernel, precision=precision,
                            **optimizers.hyper_from_args(zo.zo_optimizer, zo))


def build_objective(data: DataArguments, task: TaskArguments, run: RunArguments, state: DistState, *,
                    tokenizer, model_config) -> tuple[Any, EvalSets]:
    """The training objective and the evaluation sets of the run.

    Args:
        run: the batch layout (micro-batch, accumulation) and the run seed (the data order).
        model_config: the model's Hugging Face config: its positions bound task prompts, and a
            masked LM scores candidates at mask tokens.
    """
    from mezo_dist.models import is_masked_lm, max_positions
    from mezo_dist.objectives import TaskObjective, TextObjective

    if data.train_file is not None:
        from mezo_dist.data import TextBatches, TokenizedText, read_jsonl

        text = TokenizedText.build(read_jsonl(data.train_file), tokenizer, data.max_length or TEXT_MAX_LENGTH)
        accum = run.gradient_accumulation_steps
        batches = TextBatches(text, micro_batch=run.per_device_train_batch_size * accum, rank=state.rank,
                              world_size=state.world_size, seed=run.seed)
        return TextObjective(batches, state.device, accumulation=accum), EvalSets()
    from mezo_dist.scoring import demonstrations, with_demonstrations
    from mezo_dist.tasks import get_task

    t = task
    # Zero-shot reads only the evaluation split; in-context learning also the training rows its
    # demonstrations are drawn from; neither needs a dev set (nothing is selected).
    num_train = t.num_train if not t.eval_only or t.num_demos else 0
    num_dev = 0 if t.eval_only else t.num_dev
    train, dev, evals = get_task(t.task_name).sample_splits(num_train, num_dev, t.num_eval, t.train_set_seed,
                                                            data_dir=t.data_dir, template=t.template)
    if t.num_demos:
        # In-context learning: the same demonstrations, drawn from the train sample, before each example.
        demos = demonstrations(train, t.num_demos, t.train_set_seed)
        dev = [with_demonstrations(s, demos) for s in dev]
        evals = [with_demonstrations(s, demos) for s in evals]
    # Prompts longer than the model's positions are cut from the left (scoring keeps the answer).
    max_length = data.max_length or max_positions(model_config)
    masked_lm = is_masked_lm(model_config)
    objective = TaskObjective(
        train, tokenizer, micro_batch=run.per_device_train_batch_size, rank=state.rank,
        world_size=state.world_size, seed=run.seed, device=state.device,
        as_classification=t.train_as_classification, non_diff=t.objective if t.non_diff else None,
        max_length=max_length, max_new_tokens=t.max_new_tokens, accumulation=run.gradient_accumulation_steps,
        masked_lm=masked_lm,
    )
    return objective, EvalSets(dev=dev, eval=evals, max_length=max_length, masked_lm=masked_lm)
