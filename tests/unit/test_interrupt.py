"""The interrupt handler in one process: raised where Python runs, held over a critical block,
and the previous handlers back afterwards."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mezo_dist import interrupt


def test_sigterm_raises_interrupted_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    with pytest.raises(interrupt.Interrupted) as e:
        with interrupt.handling():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the handler runs at the next instruction
    assert e.value.signum == signal.SIGTERM and interrupt.exit_code(e.value.signum) == 143
    assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before


def test_a_deferred_block_finishes_before_the_interrupt(capsys):
    done = []
    with pytest.raises(interrupt.Interrupted):
        with interrupt.handling():
            interrupt.describe_with(lambda: "nothing to resume")
            with interrupt.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                done.append("second rename")
    assert done == ["second rename"]
    assert interrupt.stop(signal.SIGINT) == 130
    assert capsys.readouterr().err == "mezo_dist: error: interrupted by SIGINT; nothing to resume\n"
