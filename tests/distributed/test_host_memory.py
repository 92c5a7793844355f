"""Peak host memory per rank at start-up and at the final export, measured on CPU ranks under
FSDP2 and ZeRO-3 (2 ranks here, 4 under ``-m slow``): each rank holds its shard plus one tensor
in flight, never the model, and the planner's host figures say so; the exports equal the
``single`` backend's export bit for bit.

The measurement is benchmarks/startup_memory.py's (fresh ranks under torchrun; on each, the
resident set's peak minus the rank's baseline after the same start-up and export of a tiny model).
The model is a random-weight OPT of 101M parameters (405 MB in fp32), whose blocks are 50 MB and
largest tensor 16.8 MB: a shard (about 202 MB at 2 ranks, 101 MB at 4) is clearly apart from the
whole, and the largest tensor from a block.

Bounds, per rank:
* after start-up the rank keeps what the planner says its shard is (within ``SLACK``): the
  measurement sees the shard;
* the export peak equals the planner's CPU figure (``plan.host_io(on_cpu=True)``: the shard plus
  twice the largest tensor) within ``SLACK``; the start-up peak is at most the planner's (the shard
  plus the largest tensor's piece, a conversion buffer, and under ZeRO-3 the largest tensor, which
  ``zero.Init`` makes whole before partitioning it: upper bounds) plus ``SLACK``, and reaches it on
  the largest rank, but for the conversion buffer this run does not need; both stay under the shard
  plus one block;
* ``single``'s export holds the model twice (the planner's figure): the scale the ratios are read
  against.
``SLACK`` is what a rank allocates besides tensors (Python objects, the engines' bookkeeping, the
group's buffers, page rounding): under half the largest tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import assert_same_export, load_benchmark

MiB = 2**20
SLACK = 8 * MiB


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("startup_memory")


@pytest.fixture(scope="module")
def models(bench, tiny_models, tmp_path_factory) -> dict[str, Path]:
    from mezo_dist.testing import make_tiny_model

    hidden, layers, ffn = bench.MODEL
    mid = make_tiny_model(tmp_path_factory.mktemp("host_memory_models") / "opt_mid", "opt", hidden=hidden,
                          layers=layers, ffn=ffn)
    return {"tiny": tiny_models["opt"], "mid": mid}


@pytest.fixture(scope="module")
def single(bench, models, tmp_path_factory) -> tuple[dict[str, int], Path]:
    """The figures of the whole model in one process, and its export."""
    out = tmp_path_factory.mktemp("host_memory_single")
    figures = bench.measure(1, ["single"], models["tiny"], models["mid"], out, timeout=900)["single"][0]
    return figures, out / "single"


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_each_rank_holds_its_shard_and_one_tensor_at_start_up_and_export(world, bench, models, single, tmp_path):
    one, single_export = single
    measured = bench.measure(world, list(bench.SHARDED), models["tiny"], models["mid"], tmp_path, timeout=1500)
    whole = bench.planned(models["mid"], "single", 1)["whole"]
    rows = [("single", 1, 0, one)] + [(b, world, r, m) for b, ranks in measured.items() for r, m in enumerate(ranks)]
    print(f"\nwhole model {whole / MiB:.0f} MiB; MiB over each rank's baseline:")
    for backend, n, rank, m in rows:
        held, start, export = (m[k] - m["base"] for k in ("held", "start_peak", "export_peak"))
        p = bench.planned(models["mid"], backend, n)
        print(f"{backend} x{n} rank {rank}: held {held / MiB:.0f} (shard {p['shard'] / MiB:.0f}), start-up "
              f"+{start / MiB:.0f} ({start / whole:.2f}x the model; planner {p['startup'] / MiB:.0f}), export "
              f"+{export / MiB:.0f} ({export / whole:.2f}x; planner {p['export'] / MiB:.0f})")

    # One process: the export copies the whole state dict beside the model (the planner's 2x). Its
    # start-up holds no more than the runtime until something reads the weights: from_pretrained
    # maps the file, whose pages count once touched (by the first forward, or here the export).
    assert abs(one["export_peak"] - one["base"] - 2 * whole) <= SLACK
    for backend, _, rank, m in rows[1:]:
        p = bench.planned(models["mid"], backend, world)
        held, start, export = (m[k] - m["base"] for k in ("held", "start_peak", "export_peak"))
        where = f"{backend} x{world} rank {rank}"
        assert p["shard"] < whole / world + 2 * MiB  # the planner's shard: the model over the ranks, padded
        assert abs(held - p["shard"]) <= SLACK, f"{where}: keeps {held} bytes, its shard is {p['shard']}"
        assert start <= p["startup"] + SLACK, f"{where}: start-up peak {start}, planner {p['startup']}"
        assert abs(export - p["export"]) <= SLACK, f"{where}: export peak {export}, planner {p['export']}"
        assert max(start, export) <= p["shard"] + p["block"], f"{where}: more than a shard and one block"
    for backend, ranks in measured.items():
        # The planner's start-up figure is the largest rank's. It counts a buffer for the rank's
        # piece of one tensor, which a run in the checkpoint's own dtype (this one) reads without
        # on a CPU; ZeRO-3's whole tensor at construction shows on one rank or another.
        top, planned = max(m["start_peak"] - m["base"] for m in ranks), bench.planned(models["mid"], backend, world)
        assert planned["startup"] - planned["piece"] - SLACK <= top <= planned["startup"] + SLACK, \
            f"{backend} x{world}: start-up {top}, planner {planned}"
        assert_same_export(tmp_path / backend, single_export, what=f"{backend} x{world}")
