"""benchmarks/memory.py: which cells it runs and how it turns peaks into ratios (no runs here)."""

from __future__ import annotations

import argparse

import pytest

from tests.helpers import load_benchmark


def _load():
    return load_benchmark("memory")


def test_plan_shards_every_method_and_adds_zero3() -> None:
    mb = _load()
    args = argparse.Namespace(methods=",".join(mb.METHODS), worlds="1,2", zero3=True)
    cells = {(c["name"], c["backend"], c["world"]) for c in mb.plan(args)}
    assert ("mezo+prefix", "fsdp", 2) in cells and ("backprop+prefix", "fsdp", 2) in cells
    assert ("mezo", "fsdp", 2) in cells and ("backprop+lora", "fsdp", 2) in cells
    assert ("mezo", "zero3", 2) in cells and ("backprop", "zero3", 2) in cells
    assert ("inference", "fsdp", 2) in cells and len(cells) == 7 + 7 + 2
    assert all(b == "single" for _, b, w in cells if w == 1)


def test_summarise_ratios_against_matching_inference() -> None:
    mb = _load()
    g = 2**30
    cells = [
        {"name": "inference", "backend": "single", "world": 1, "peak_per_rank": [1.5 * g], "step_s": 1.0},
        {"name": "backprop", "backend": "single", "world": 1, "peak_per_rank": [3.0 * g], "step_s": 3.0},
    ]
    baselines = {("infer", "single", 1): {"peak_per_rank": [1.0 * g]}, ("train", "single", 1): {"peak_per_rank": [1.0 * g]}}
    mb.summarise(cells, baselines)
    assert cells[1]["ratio_model_part"] == pytest.approx(4.0)
    assert cells[1]["ratio_total"] == pytest.approx(2.0)
    assert cells[1]["step_over_forward"] == pytest.approx(3.0)
