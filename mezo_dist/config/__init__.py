"""The flags of the entry points: plain dataclasses by concern (``args.py``), how a command line
fills them (``parse.py``) and the checks of the flags alone (``validate.py``). No I/O here: what
needs a file is :mod:`mezo_dist.preflight`'s, the start-up after the process group
:mod:`mezo_dist.build`'s."""

from mezo_dist.config.args import (
    ARG_GROUPS, BACKENDS, DEMO_DEFAULTS, PRECISIONS, TEXT_MAX_LENGTH, BackpropArguments, DataArguments,
    ModelArguments, OptimArguments, ParallelArguments, PeftArguments, RunArguments, TaskArguments, TrainConfig,
    ZOArguments,
)
from mezo_dist.config.parse import TRAIN, CommandLine, model_flags, parse
from mezo_dist.config.validate import parse_args, validate, validate_max_length, validate_zo

__all__ = [
    "ARG_GROUPS", "BACKENDS", "DEMO_DEFAULTS", "PRECISIONS", "TEXT_MAX_LENGTH", "BackpropArguments", "DataArguments",
    "ModelArguments", "OptimArguments", "ParallelArguments", "PeftArguments", "RunArguments", "TaskArguments",
    "TrainConfig", "ZOArguments", "TRAIN", "CommandLine", "model_flags", "parse", "parse_args", "validate",
    "validate_max_length", "validate_zo",
]
