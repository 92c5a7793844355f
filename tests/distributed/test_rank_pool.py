"""The pooled ranks report every failing rank, not only the first one the parent reads: when one
rank raises, a peer's error is often just "connection closed", and the cause is the other's."""

from __future__ import annotations

import pytest

from tests.rank_pool import RankFailed, RankPool


def fail_on_every_rank(state) -> None:
    raise ValueError(f"the cause on rank {state.rank}")


def answer(state) -> int:
    return state.rank * 10


def test_a_failure_names_every_failing_rank_and_the_pool_starts_again(torch_extensions_dir):
    pool = RankPool(world=2)  # its own pool: a failure ends the pool it happens in
    try:
        with pytest.raises(RankFailed) as e:
            pool.run(fail_on_every_rank)
        assert "the cause on rank 0" in str(e.value) and "the cause on rank 1" in str(e.value), str(e.value)
        assert pool.run(answer) == [0, 10]
    finally:
        pool.close()
