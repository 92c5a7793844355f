"""benchmarks/convergence.py's own logic, without a model: forward-pass accounting per method, the
budget-to-steps conversion, the lr sweep's parsing, and the summary and table of synthetic runs."""

from __future__ import annotations


import pytest

from tests.helpers import ROOT, load_benchmark

SCRIPT = ROOT / "benchmarks" / "convergence.py"


def _load():
    return load_benchmark("convergence")


def test_forwards_per_step() -> None:
    c = _load()
    assert c.forwards_per_step("mezo") == 2
    assert c.forwards_per_step("mezo", zo_directions=3) == 6
    assert c.forwards_per_step("sparse") == 2
    assert c.forwards_per_step("fzoo", fzoo_directions=8) == 9
    assert c.forwards_per_step("fzoo", fzoo_directions=4) == 5
    assert c.forwards_per_step("adamezo") == 2
    assert c.forwards_per_step("backprop") == 2
    assert c.forwards_per_step("backprop", backward_cost=2) == 3
    with pytest.raises(ValueError):
        c.forwards_per_step("sgd")


def test_budget_to_steps() -> None:
    c = _load()
    # The full specification: 1,600 forwards is an 800-step mezo run, dev every 80 steps.
    assert c.schedule(1600, 160, 2) == (800, 80)
    # fzoo N=8: 9 forwards a step; 177 steps fit, cut to a multiple of the 17-step dev interval.
    assert c.schedule(1600, 160, 9) == (170, 17)
    steps, ev = c.schedule(480, 120, 9)
    assert steps * 9 <= 480 and steps % ev == 0 and (steps, ev) == (52, 13)
    with pytest.raises(ValueError, match="raise --budget"):
        c.schedule(10, 160, 9)


def test_plan_uses_the_accounting(tmp_path) -> None:
    c = _load()
    args = c.parse(["--tasks", "SST2", "--budget", "480", "--eval_every", "120", "--optimizers", "mezo,fzoo,backprop",
                    "--lr", "mezo=1e-5,3e-5", "--backward_cost", "2", "--data_dir", str(tmp_path)])
    plan = c.build_plan(args)
    got = {(p["method"], p["lr"]): (p["steps"], p["eval_steps"]) for p in plan}
    assert got == {("mezo", 1e-5): (240, 60), ("mezo", 3e-5): (240, 60),
                   **{("fzoo", lr): (52, 13) for lr in c.DEFAULT_LRS["fzoo"]},
                   **{("backprop", lr): (160, 40) for lr in c.DEFAULT_LRS["backprop"]}}
    assert all(p["steps"] * p["fps"] <= 480 for p in plan)
    flags = c.method_flags("fzoo", 3e-7, 52, 13, args)
    assert flags[flags.index("--zo_num_directions") + 1] == "8" and flags[flags.index("--max_steps") + 1] == "52"
    assert "--zo_optimizer" not in c.method_flags("backprop", 1e-5, 160, 40, args)


@pytest.mark.parametrize("spec", ["mezo", "adam=1e-5", "mezo=abc", "mezo=-1e-5", "mezo="])
def test_bad_lr_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        _load().parse_lrs([spec], ["mezo"])


def _row(method, lr, fps, curve, score=0.7):
    c = _load()
    return c.finish_row({"task": "SST2", "method": method, "lr": lr, "fps": fps, "steps": curve[-1][0],
                         "eval_steps": curve[0][0]},
                        {"curve": curve, "score": score, "initial_score": 0.5, "wall_s": 10.0, "median_step_s": 1.0})


def test_summary_and_table() -> None:
    c = _load()
    rows = [_row("mezo", 1e-5, 2, [[100, 0.60], [200, 0.66], [300, 0.70], [400, 0.68]]),
            _row("mezo", 3e-5, 2, [[100, 0.62], [200, 0.64], [300, 0.65], [400, 0.66]]),
            _row("fzoo", 3e-7, 9, [[10, 0.64], [20, 0.71], [30, 0.69]]),  # reaches 0.70 at 180 forwards
            _row("adamezo", 1e-5, 2, [[100, 0.55], [200, 0.69]]),
            {**_row("sparse", 1e-4, 2, [[100, 0.5]]), "error": "exit 1: boom"}]
    rows[-1].pop("best_dev")
    s = c.summarize(rows, "SST2", budget=800)
    assert s["mezo_best_dev"] == 0.70 and s["mezo_forwards_to_best"] == 600
    assert s["methods"]["mezo"]["lr"] == 1e-5
    assert s["methods"]["fzoo"]["forwards_to_mezo_best"] == 180 and s["methods"]["fzoo"]["best_forwards"] == 180
    assert s["methods"]["adamezo"]["forwards_to_mezo_best"] is None
    assert s["reach_in_third"] == ["fzoo"] and s["not_worse"] == ["fzoo"]
    assert "sparse" not in s["methods"]
    meta = {"model": "m", "machine": "x", "template": "paper", "budget": 800, "backward_cost": 1.0, "num_dev": 200,
            "eval_every": 100, "batch_size": 16, "zo_eps": 1e-3, "fzoo_directions": 8, "num_train": 1000,
            "num_eval": 200, "seed": 0, "wall_s": 60.0}
    md = c.markdown(rows, meta)
    assert "| fzoo | 3e-07 | 71.0 | 180 | 70.0 | 50.0 | 180 |" in md
    assert "| adamezo | 1e-05 | 69.0 | 400 | 70.0 | 50.0 | not reached |" in md
    assert "within a third of the budget (267 forwards): fzoo;" in md
    assert "failed: `exit 1: boom`" in md
    assert "180: 71.0" in md  # the curve is in forwards, not steps
