"""parse -> init -> train -> teardown, with bad input reported as one line."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from mezo_dist import interrupt
from mezo_dist.errors import ConfigError, TrainingError
from mezo_dist.interrupt import Interrupted


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
    """``launch/train.py``: 0 done, 1 a run that could not go on, 2 bad input, 130 / 143 stopped
    by SIGINT / SIGTERM (with one line saying which checkpoint a resume starts from)."""
    with interrupt.handling():
        try:
            return _main(argv)
        except Interrupted as e:
            return interrupt.stop(e.signum)


def _main(argv: list[str] | None) -> int:
    from mezo_dist import preflight
    from mezo_dist.config import parse_args

    try:
        # The flags alone, then what they name (files, the installed packages), all before any
        # process group: bad input stops every rank before any of them waits in a rendezvous.
        cfg = parse_args(argv, env=os.environ)
        preflight.check(cfg)
    except ConfigError as e:
        say(str(e))
        return 2

    from mezo_dist.checkpoint import resume_hint

    interrupt.describe_with(lambda: resume_hint(cfg.run.output_dir))
    from mezo_dist import faults
    from mezo_dist.train import RunHooks, train

    def body(state) -> int:
        # The tests' fault injection, attached from here when its environment asks for it.
        summary = train(cfg, state, faults.install(RunHooks(), state.rank))
        if state.is_main and "steps" in summary:
            print(f"done: {summary['steps']} steps on {summary['backend']} x{summary['world_size']}; "
                  f"model in {cfg.run.output_dir}/final", flush=True)
        elif state.is_main:
            print(f"done: evaluation only; metrics in {cfg.run.output_dir}/eval_results.json", flush=True)
        return 0

    from mezo_dist.placement.build import group_needs

    return run_on_ranks(body, **group_needs(cfg.parallel.backend), hsdp_replicas=cfg.parallel.hsdp_replicas)


def run_on_ranks(body: Callable[[Any], int], **init_kwargs: Any) -> int:
    """Start the process group, run ``body(state)``, and tear the group down (a group that
    was already started is left to whoever started it).

    A ConfigError (exit 2) or TrainingError (exit 1) is raised on every rank alike (the same
    input, the same all-reduced losses), so it ends with the closing barrier. Any other error
    skips it: the other ranks may wait in a collective this rank will never join. So does an
    interrupt (exit 128 + the signal); a rank whose collective failed because a peer was
    interrupted leaves quietly with the peer's exit code instead of a traceback.
    """
    import torch.distributed as dist

    from mezo_dist.distributed import init_distributed, teardown

    # A process group the caller started (a notebook, a test harness, a Trainer) is the
    # caller's to destroy; only the one started here is torn down here.
    owns_group = not (dist.is_available() and dist.is_initialized())
    clean = False
    try:
        state = init_distributed(**init_kwargs)
        # No rank writes to the output folder before every rank has checked it (preflight runs
        # before the group): a fresh rendezvous already waits for all of them, but a group the
        # caller started does not, and a slow rank would find the fast one's first files there
        # and refuse the folder as "already holds a run" while the fast one waits in a collective.
        state.barrier()
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
    except BaseException as e:
        signum = e.signum if isinstance(e, Interrupted) else interrupt.received()
        if signum is not None:
            return interrupt.stop(signum)
        signum = interrupt.peer_signal() if isinstance(e, Exception) else None
        if signum is not None:
            return interrupt.exit_code(signum)
        raise
    finally:
        if owns_group:
            teardown(clean=clean)
