"""Command lines into the flag dataclasses of :mod:`mezo_dist.config.args`.

An entry point's flags are one flat namespace (``--help`` lists them in one order, the order of
the releases before the groups were split by concern); the groups are how the code holds them.
So a :class:`CommandLine` names the groups it fills and the order of their flags, and is parsed
through one flat dataclass made from the groups' own fields (names, types, defaults, help).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from mezo_dist.config.args import ARG_GROUPS, GROUP_ATTRS, ModelArguments, PeftArguments, TrainConfig
from mezo_dist.errors import ConfigError


@dataclass(frozen=True)
class CommandLine:
    """The flags of one entry point: the groups they fill, and their order in ``--help``.

    Args:
        groups: the dataclasses filled, in the order :func:`parse` returns them.
        order: every flag (field name) in the order ``--help`` lists them; fields of ``groups``
            not named keep their defaults and have no flag.
    """

    groups: tuple[type, ...]
    order: tuple[str, ...]

    def __post_init__(self) -> None:
        names = [f.name for g in self.groups for f in dataclasses.fields(g)]
        once = len(set(names)) == len(names) and len(set(self.order)) == len(self.order)
        if not once or not set(self.order) <= set(names):
            raise ValueError(f"{self.order} must name fields of {[g.__name__ for g in self.groups]} once each")

    def flat_type(self) -> type:
        """One dataclass holding every flag, in ``order``: what the parser is built from."""
        found: dict[str, tuple[Any, dataclasses.Field]] = {}
        for group in self.groups:
            hints = typing.get_type_hints(group)
            found.update({f.name: (hints[f.name], f) for f in dataclasses.fields(group)})
        specs = []
        for name in self.order:
            kind, f = found[name]
            specs.append((name, kind, dataclasses.field(default=f.default, metadata=dict(f.metadata))))
        return dataclasses.make_dataclass("Flags", specs)

    def split(self, flat: Any) -> tuple[Any, ...]:
        """The groups, filled from a parsed flat dataclass."""
        out = []
        for group in self.groups:
            given = {f.name: getattr(flat, f.name) for f in dataclasses.fields(group) if f.name in self.order}
            out.append(group(**given))
        return tuple(out)


# The order of --help, kept from before the groups were split by concern (scripts and docs
# follow it).
TRAIN = CommandLine(ARG_GROUPS, (
    "model_name_or_path", "torch_dtype", "trust_remote_code",
    "lora", "lora_r", "lora_alpha", "lora_target_modules", "lora_init_seed",
    "prefix_tuning", "num_prefix", "prefix_init", "prefix_init_seed",
    "train_file", "max_length",
    "task_name", "template", "data_dir", "num_train", "num_dev", "num_eval", "train_set_seed",
    "train_as_classification", "eval_steps", "eval_only", "num_demos", "non_diff", "objective", "max_new_tokens",
    "eval_batch_size",
    "learning_rate", "zo_eps", "weight_decay", "lr_scheduler_type", "warmup_steps",
    "zo_optimizer", "zo_num_directions", "zo_perturbation", "zo_sparsity", "zo_sparse_refresh", "zo_beta1",
    "zo_beta2", "zo_history", "zo_adam_eps", "zo_kernel", "precision",
    "trainer", "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "momentum", "max_grad_norm",
    "gradient_checkpointing",
    "backend", "ds_config", "output_dir", "max_steps", "per_device_train_batch_size", "seed", "logging_steps",
    "save_steps", "save_total_limit", "resume_from_checkpoint", "overwrite_output_dir",
    "gradient_accumulation_steps", "max_skipped_steps", "check_replicas_steps", "report_to", "disable_tqdm",
    "local_rank", "hsdp_replicas",
))
if set(TRAIN.order) != {f.name for g in ARG_GROUPS for f in dataclasses.fields(g)}:
    raise ValueError("every field of the train flag groups needs its place in TRAIN.order")


def model_flags(*, with_precision: bool = True) -> tuple[str, ...]:
    """The model and peft flags, in --help order (replay takes the precision from the trajectory)."""
    names = [f.name for g in (ModelArguments, PeftArguments) for f in dataclasses.fields(g)]
    return tuple(n for n in TRAIN.order if n in names and (with_precision or n != "precision"))


def _one_line(message: str) -> None:  # argparse would print the whole usage first
    raise ConfigError(message)


def parse(line: CommandLine, argv: list[str] | None) -> tuple[tuple[Any, ...], frozenset[str]]:
    """Parse ``argv`` into ``line``'s groups; any argparse complaint is one ConfigError.

    Args:
        line: the entry point's flags.
        argv: the command line (None: ``sys.argv[1:]``).

    Returns:
        The filled groups, and the names of the fields whose flags ``argv`` typed (whatever
        their values: what the demo's defaults must leave alone).
    """
    from transformers import HfArgumentParser

    flat = line.flat_type()
    parser = HfArgumentParser([flat], allow_abbrev=False)
    parser.error = _one_line  # type: ignore[method-assign]
    parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    return line.split(parsed), _typed_fields(flat, argv)


def _typed_fields(flat: type, argv: list[str] | None) -> frozenset[str]:
    """The fields whose flags ``argv`` typed, whatever their values: the same parse again (args
    file included) with every default suppressed, so that the namespace holds only what the
    command line set."""
    from transformers import HfArgumentParser

    class Probe(HfArgumentParser):
        typed: frozenset[str] = frozenset()

        def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
            namespace, rest = super().parse_known_args(args, namespace)
            self.typed = frozenset(vars(namespace))
            for action in self._actions:  # the dataclasses built from it are discarded
                if not hasattr(namespace, action.dest):
                    setattr(namespace, action.dest, None)
            return namespace, rest

    probe = Probe([flat], allow_abbrev=False)
    probe.error = _one_line  # type: ignore[method-assign]
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    probe.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    return probe.typed


def parse_train(argv: list[str] | None) -> tuple[TrainConfig, frozenset[str]]:
    """``launch/train.py``'s flags as a :class:`TrainConfig` (unchecked), and the typed fields."""
    groups, given = parse(TRAIN, argv)
    return TrainConfig(**{GROUP_ATTRS[type(g)]: g for g in groups}), given

