"""MeZO as a drop-in ``transformers.Trainer``: the script stays, the optimizer becomes zeroth order.

``MeZOTrainer`` keeps Trainer's loop, data loading, evaluation, logging, ``save_model``,
checkpoint rotation and ``resume_from_checkpoint``; what changes is the step. On the last
micro-batch of each optimisation step, ``training_step`` runs one step of a zeroth-order
optimizer of this project (``mezo_dist.zo.optimizers``, by ``zo_optimizer``) on the model Trainer
prepared, adopted with :func:`mezo_dist.wrap`:

* a plain module (one process, or replicas under DDP: the step needs no gradient averaging, so
  the module inside DDP is used, and every replica draws the same z);
* DeepSpeed ZeRO-3 from ``TrainingArguments(deepspeed=...)``, built as Trainer builds it for
  evaluation: ``deepspeed_init(..., inference=True)`` drops the config's optimizer and scheduler,
  so the engine allocates no optimizer state and nothing copies fp32 masters back over MeZO's
  in-place edits;
* an FSDP2 module from ``fsdp="full_shard"`` with ``fsdp_config={"fsdp_version": 2}`` (accelerate
  applies FSDP only where a GPU is present; on CPU it runs the plain model, see the README).

Losses: a micro-batch's loss is a sum with its weight (target tokens for a causal LM, else
examples), the sums of all micro-batches of a step are added under one perturbation, and the
step's one all-reduce divides by the global weight: the loss of the whole global batch, however
it is split over ranks and ``gradient_accumulation_steps``. The learning rate of step t is the
one Trainer's scheduler holds at step t; the seed of step t is
``mezo_dist.zo.noise.step_seed(args.seed, t)``, so a resumed run repeats the uninterrupted run's
directions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import Trainer, TrainingArguments

from mezo_dist.config import ZOArguments, validate_zo
from mezo_dist.zo import optimizers

logger = logging.getLogger(__name__)

# Inside each Trainer checkpoint folder: the trainable parameters as this project's
# layout-invariant chunks (any world size and backend resumes them), and the optimizer's state.
ZO_CHECKPOINT = "zo_checkpoint"
SCHEDULER_NAME = "scheduler.pt"  # Trainer's own name for the scheduler state

_ZO_FIELDS = {f.name: f for f in dataclasses.fields(ZOArguments) if f.name.startswith("zo_")}


def _zo_field(name: str) -> Any:
    """A field of ``launch/train.py``'s ZOArguments, with its default and help: one definition."""
    f = _ZO_FIELDS[name]
    return dataclasses.field(default=f.default, metadata=dict(f.metadata))


@dataclass
class MeZOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the zeroth-order step's settings (the ``zo_*`` flags of
    ``launch/train.py``, same names, defaults and meaning).

    ``learning_rate``, ``weight_decay`` (matrices only, as this project and the MeZO reference
    decay), ``lr_scheduler_type`` / warmup, ``seed``, ``gradient_accumulation_steps``, logging,
    evaluation and saving keep Trainer's meaning. ``max_grad_norm`` is ignored: there are no
    gradients to clip.
    """

    zo_optimizer: str = _zo_field("zo_optimizer")
    zo_eps: float = _zo_field("zo_eps")
    zo_num_directions: Optional[int] = _zo_field("zo_num_directions")
    zo_perturbation: Optional[str] = _zo_field("zo_perturbation")
    zo_kernel: str = _zo_field("zo_kernel")
    zo_sparsity: float = _zo_field("zo_sparsity")
    zo_sparse_refresh: int = _zo_field("zo_sparse_refresh")
    zo_beta1: float = _zo_field("zo_beta1")
    zo_beta2: float = _zo_field("zo_beta2")
    zo_history: int = _zo_field("zo_history")
    zo_adam_eps: float = _zo_field("zo_adam_eps")
    zo_trajectory: bool = dataclasses.field(
        default=True,
        metadata={"help": "Write <output_dir>/trajectory.jsonl, the seed log (seed, projected gradient, lr per step) "
                  "from which launch/replay.py rebuilds the fine-tuned weights."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from mezo_dist.zo import noise, passes

        # launch/train.py's own checks (ConfigError, a ValueError), which also fill the defaults
        # that depend on the optimizer (fzoo: 8 rademacher directions).
        zo = ZOArguments(**{name: getattr(self, name) for name in _ZO_FIELDS})
        validate_zo(zo)
        self.zo_num_directions, self.zo_perturbation = zo.zo_num_directions, zo.zo_perturbation
        if not self.zo_eps > 0:
            raise ValueError(f"zo_eps must be > 0, got {self.zo_eps}")
        if self.zo_perturbation not in noise.KINDS:
            raise ValueError(f"unknown zo_perturbation {self.zo_perturbation!r}; "
                             f"choose one of {', '.join(noise.KINDS)}")
        if self.zo_kernel not in passes.KERNELS:
            raise ValueError(f"unknown zo_kernel {self.zo_kernel!r}; choose one of {', '.join(passes.KERNELS)}")
        if self.fp16 and not self.deepspeed:
            # accelerate's GradScaler would check gradients that a zeroth-order step never makes.
            raise ValueError("fp16=True scales gradients for backpropagation; with MeZO load the model in float16 "
                             "(dtype=torch.float16) or use bf16=True")


class ScheduledRate(torch.optim.Optimizer):
    """The optimizer a ``transformers.Trainer`` loop sees: one parameter group whose learning
    rate Trainer's scheduler sets each step, and which the zeroth-order step reads.

    It holds references to the trainable parameters (Trainer and accelerate expect an optimizer
    over them) and no state at all. Its :meth:`step` does nothing: the zeroth-order step needs the
    step's batch, which only ``training_step`` sees, so the update has been applied by the time
    Trainer's loop calls ``optimizer.step()``.
    """

    def __init__(self, params, *, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):  # noqa: D401 - see the class docstring
        return None


class MeZOTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimisation step is a zeroth-order step (forwards only).

    Use it where ``Trainer`` was used, with :class:`MeZOTrainingArguments`. Override
    :meth:`compute_loss_sum` to change what a micro-batch contributes; a custom ``compute_loss``
    (or ``compute_loss_func``) is used as Trainer uses it and weighted by the micro-batch's
    examples.
    """

    args: MeZOTrainingArguments

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, MeZOTrainingArguments):
            raise TypeError("MeZOTrainer needs MeZOTrainingArguments (TrainingArguments plus the zo_* settings)")
        if self.optimizer is not None:
            raise ValueError("MeZOTrainer makes its own optimizer; do not pass one in `optimizers`")
        if self.args.fsdp and not self.is_fsdp_enabled:
            logger.warning("fsdp is set but accelerate did not enable FSDP (it does so only where a GPU is present): "
                           "every rank holds the whole model and MeZO runs data parallel")
        self._reset()

    def _reset(self) -> None:
        self._zo: Any = None
        self._placement: Any = None
        self._pending: list[dict[str, Any]] = []  # this step's micro-batches so far
        self._trajectory: Any = None
        self._resumed_state: dict[str, Any] | None = None
        self._g_sum, self._g_count, self._skipped = 0.0, 0, 0

    # -- the optimizer Trainer's loop and scheduler see ---------------------------------------

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            params = [p for p in (model or self.model).parameters() if p.requires_grad]
            self.optimizer = ScheduledRate(params, lr=self.args.learning_rate)
        return self.optimizer

    def _clip_grad_norm(self, model):
        return None  # no gradients

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # Trainer then logs no grad_norm

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if not self.is_deepspeed_enabled:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        # Trainer would build a training engine around an optimizer; MeZO needs the engine Trainer
        # builds for evaluation: the ds_config without optimizer and scheduler, no fp32 master
        # copy, no optimizer state.
        from transformers.integrations.deepspeed import deepspeed_init

        if self.deepspeed is None:
            deepspeed_init(self, num_training_steps=max_steps, inference=True)
            self.deepspeed = self.accelerator.prepare(self.model)
        engine = self.model_wrapped = self.deepspeed
        self.create_optimizer_and_scheduler(num_training_steps=max_steps)
        if resume_from_checkpoint is not None:
            self._load_from_checkpoint(resume_from_checkpoint, engine)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return engine, train_dataloader

    # -- the step ------------------------------------------------------------------------------

    def train(self, *args: Any, **kwargs: Any):
        self._reset()
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._trajectory is not None:
                self._trajectory.close()
                self._trajectory = None

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Collect the step's micro-batches; on the last one, run the zeroth-order step over all
        of them under one perturbation, and return the step's loss (0 for the others, so that
        Trainer's logged loss is the mean over steps)."""
        self._pending.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        batches, self._pending = self._pending, []
        res = self._zo_step(model, batches)
        return torch.tensor(res.loss, dtype=torch.float32, device=self.args.device)

    def _zo_step(self, model, batches: list[dict[str, Any]]):
        if self._zo is None:
            self._start(model)
        runner = self._placement.runner

        def closure() -> tuple[torch.Tensor, torch.Tensor]:
            # MeZO's accumulation: every micro-batch of the step under the same perturbation.
            sums = [self.compute_loss_sum(runner, b) for b in batches]
            return sum(t for t, _ in sums), sum(w for _, w in sums)

        self._zo.step_index = self.state.global_step  # the seed of step t is step_seed(seed, t)
        res = self._zo.step(closure)
        if res.skipped:
            self._skipped += 1
        else:
            self._g_sum, self._g_count = self._g_sum + res.projected_grad, self._g_count + 1
        if self._trajectory is not None:
            from mezo_dist.trajectory import zo_row

            self._trajectory.trajectory(zo_row(res, self._zo))
        return res

    def _start(self, model) -> None:
        """The placement, the optimizer and the seed log, once the model is prepared."""
        args = self.args
        self._placement = self._place(model)
        self._zo = optimizers.build(
            args.zo_optimizer, self._placement, lr=lambda _step: float(self.optimizer.param_groups[0]["lr"]),
            eps=args.zo_eps, weight_decay=args.weight_decay, seed=args.seed, num_directions=args.zo_num_directions,
            perturbation=args.zo_perturbation, kernel=args.zo_kernel,
            **optimizers.hyper_from_args(args.zo_optimizer, args))
        if self._resumed_state is not None:
            optimizers.load_state_dict(self._zo, self._resumed_state.get("optimizer_state"))
            self._skipped = int(self._resumed_state.get("skipped_steps", 0))
        if args.zo_trajectory:
            from mezo_dist.metrics import RunLogger

            # On resume the lines of the steps still to run are dropped: they are written again.
            self._trajectory = RunLogger(self._placement.state, args.output_dir, max_steps=self.state.max_steps,
                                         report_to="none", progress=False, start_step=self.state.global_step)

    def _place(self, model):
        """The placement of a model as Trainer holds it (a DeepSpeed engine, an FSDP2 module, a
        module, possibly inside DDP)."""
        from mezo_dist.distributed import current_state
        from mezo_dist.placement import wrap

        if type(model).__name__ != "DeepSpeedEngine":
            # DDP averages gradients, which a zeroth-order step does not have: the module inside
            # is what the step edits and runs (every replica draws the same z).
            model = self.accelerator.unwrap_model(model)
        return wrap(model, current_state())

    def compute_loss_sum(self, model, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of losses, weight) of one micro-batch; the step divides the global sums.

        A causal LM with labels and Trainer's own loss: the next-token losses summed in float64
        over the target tokens (the mean that Trainer reports, made exact over ranks and
        micro-batches), as ``launch/train.py`` computes them. Otherwise ``compute_loss`` (a mean
        over the micro-batch) times its examples.
        """
        if self._token_loss(inputs):
            from mezo_dist.objectives import causal_lm_loss

            total, count = causal_lm_loss(self._placement, inputs)
            return total, count.double()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        n = float(next(v for v in inputs.values() if torch.is_tensor(v)).shape[0])
        return loss.detach().double() * n, torch.tensor(n, dtype=torch.float64)

    def _token_loss(self, inputs: dict[str, Any]) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        module = self._placement.module
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        return (set(inputs) == {"input_ids", "attention_mask", "labels"}
                and type(self).compute_loss is Trainer.compute_loss
                and self.compute_loss_func is None and self.label_smoother is None
                and type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs carry the mean projected gradient since the last log (and skipped steps)."""
        if "loss" in logs and (self._g_count or self._skipped):
            logs = dict(logs)
            if self._g_count:
                logs["projected_grad"] = self._g_sum / self._g_count
            if self._skipped:
                logs["zo_skipped_steps"] = self._skipped
            self._g_sum, self._g_count = 0.0, 0
        super().log(logs, start_time)

    # -- checkpoints ---------------------------------------------------------------------------

    def _resume_fields(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint."""
        a = self.args
        fields = {name: getattr(a, name) for name in _ZO_FIELDS if name != "zo_kernel"}
        return fields | {"seed": a.seed, "weight_decay": a.weight_decay}

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The trainable parameters as layout-invariant chunks (every rank writes its own, no
        rank gathers the model) and the optimizer's state, plus Trainer's scheduler state."""
        from mezo_dist.checkpoint import save_checkpoint

        if self._placement is None:
            self._placement = self._place(self.model_wrapped)
        state = {"step": self.state.global_step, "skipped_steps": self._skipped, "backend": self._placement.name,
                 "run": self._resume_fields()}
        opt_state = optimizers.state_dict(self._zo)
        if opt_state is not None:
            state["optimizer_state"] = opt_state
        save_checkpoint(self._placement, os.path.join(output_dir, ZO_CHECKPOINT), state)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        folder = os.path.join(resume_from_checkpoint, ZO_CHECKPOINT)
        if not os.path.isdir(folder):  # a checkpoint of a plain Trainer run: its weights
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from mezo_dist.checkpoint import load_checkpoint

        saved = load_checkpoint(self._place(model if model is not None else self.model), folder)
        for key, value in self._resume_fields().items():
            if saved.get("run", {}).get(key, value) != value:
                raise ValueError(f"checkpoint {resume_from_checkpoint} was written with {key}={saved['run'][key]!r}; "
                                 f"this run has {value!r}")
        self._resumed_state = saved

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # The optimizer holds no state of its own (its learning rate is the scheduler's); the
        # zeroth-order optimizer's state came with the parameters.
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, SCHEDULER_NAME)):
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
            # A scheduler's state holds its last rate but does not set it on the optimizer (a
            # loaded optimizer state would); the step reads the optimizer's.
            for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
