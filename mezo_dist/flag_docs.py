"""``docs/flags.md``: the flags of ``launch/train.py`` and ``launch/replay.py``, rendered from the
parsers that ``--help`` prints (``python -m mezo_dist.flag_docs docs/flags.md`` rewrites it; a
test fails when the file and the parsers differ)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Section titles of the flag groups, one per concern (--help lists the same flags as one list).
TITLES = {
    "ModelArguments": "Model and precision",
    "PeftArguments": "LoRA and prefix",
    "DataArguments": "Text data",
    "TaskArguments": "Tasks and evaluation",
    "OptimArguments": "Learning rate, schedule and weight decay (MeZO and backprop)",
    "ZOArguments": "Zeroth-order optimisation",
    "BackpropArguments": "The backprop baseline (`--trainer regular`)",
    "ParallelArguments": "Placement: backend, DeepSpeed config, HSDP",
    "RunArguments": "Run: steps, batches, outputs, checkpoints",
    "ReplayArguments": "Replay",
}


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    value = action.default
    if value is None or value == argparse.SUPPRESS:
        return "none"
    if value == "":
        return "required"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`"


def table(dtype: type) -> str:
    """One dataclass's flags as a markdown table (flag, default, meaning), as ``--help`` has them."""
    from transformers import HfArgumentParser

    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for action in HfArgumentParser([dtype])._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        # The long underscore spelling first; HfArgumentParser also accepts dashes.
        names = [s for s in action.option_strings if "-" not in s[2:]] or action.option_strings
        rows.append(f"| {', '.join(f'`{n}`' for n in names)} | {_default(action)} | {_cell(action.help or '')} |")
    return "\n".join(rows)


def render() -> str:
    """The whole of ``docs/flags.md``."""
    from mezo_dist.config import ARG_GROUPS
    from mezo_dist.replay import ReplayArguments

    parts = [
        "# Flags",
        "",
        "Rendered from the parsers by `python -m mezo_dist.flag_docs docs/flags.md`: the same flags, defaults "
        "and help texts as `python launch/train.py --help` and `python launch/replay.py --help`, grouped by "
        "concern (the suite fails when they differ). Names follow the MeZO reference and Hugging Face `TrainingArguments`; every flag also "
        "takes dashes (`--learning-rate`). Without `--task_name` and `--train_file`, the embedded demo "
        "sets the flags you did not type (`DEMO_DEFAULTS` in `mezo_dist/config/args.py`).",
        "",
        "## launch/train.py",
    ]
    for dtype in ARG_GROUPS:
        parts += ["", f"### {TITLES[dtype.__name__]}", "", table(dtype)]
    parts += ["", "## launch/replay.py", "", "The model, LoRA and prefix flags of `launch/train.py` above (all but "
              "`--precision`: the trajectory says which), and:", "", table(ReplayArguments)]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    from mezo_dist.io import atomic_write_text

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mezo_dist.flag_docs docs/flags.md", file=sys.stderr)
        return 2
    atomic_write_text(Path(args[0]), render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
