"""parse -> init -> train -> teardown, with bad input reported as one line."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from mezo_dist.errors import ConfigError, TrainingError


def say(msg: str) -> None:
    # Every rank validates the same input; one copy of the message is enough.
    if os.environ.get("RANK", "0") == "0":
        print(f"mezo_dist: error: {msg}", file=sys.stderr, flush=True)


def quiet_other_ranks(state) -> None:
    """Progress bars and loading chatter from rank 0 only."""
    if not state.is_main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    from mezo_dist.config import parse_args

    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        say(str(e))
        return 2

    from mezo_dist.train import train

    def body(state) -> int:
        summary = train(cfg, state)
        if state.is_main and "steps" in summary:
            print(f"done: {summary['steps']} steps on {summary['backend']} x{summary['world_size']}; "
                  f"model in {cfg.run.output_dir}/final", flush=True)
        elif state.is_main:
            print(f"done: evaluation only; metrics in {cfg.run.output_dir}/eval_results.json", flush=True)
        return 0

    return run_on_ranks(body, use_deepspeed=cfg.run.backend == "zero3", need_group=cfg.run.backend == "fsdp",
                        hsdp_replicas=cfg.run.hsdp_replicas)


def run_on_ranks(body: Callable[[Any], int], **init_kwargs: Any) -> int:
    """Start the process group, run ``body(state)``, and tear the group down.

    A ConfigError (exit 2) or TrainingError (exit 1) is raised on every rank alike (the same
    input, the same all-reduced losses), so it ends with the closing barrier. Any other error
    skips it: the other ranks may wait in a collective this rank will never join.
    """
    from mezo_dist.distributed import init_distributed, teardown

    clean = False
    try:
        state = init_distributed(**init_kwargs)
        quiet_other_ranks(state)
        code = body(state)
        clean = True
        return code
    except ConfigError as e:
        clean = True
        say(str(e))
        return 2
    except TrainingError as e:
        clean = True
        say(str(e))
        return 1
    finally:
        teardown(clean=clean)
