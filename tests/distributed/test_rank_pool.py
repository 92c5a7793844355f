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


def late_second_rank(state, argv: list[str], delay_s: float) -> int:
    """The training entry point, rank 1 starting ``delay_s`` later, as a slow host's rank would."""
    import time

    from tests.rank_pool import run_entry_point

    if state.rank == 1:
        time.sleep(delay_s)
    return run_entry_point(state, "launch/train.py", argv, {})[0]


def test_a_late_rank_in_a_caller_started_group_does_not_find_the_early_ranks_files(
        rank_pool, tiny_models, text_file, tmp_path):
    """The start-up checks run before the group; a launcher's rendezvous then waits for every
    rank, but a group the caller started does not. Without the barrier after it, rank 0 would
    write the output folder's first files while rank 1 still checks the folder, rank 1 would
    refuse it as "already holds a run", and rank 0 would wait in its first collective."""
    argv = ["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--max_length", "32", "--backend", "fsdp", "--disable_tqdm", "--report_to", "tensorboard"]
    assert rank_pool.run(late_second_rank, argv, 8.0, timeout=240) == [0, 0]
