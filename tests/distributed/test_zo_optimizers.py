"""The zeroth-order optimizers (fzoo, sparse, adamezo) under the real launchers.

* One worker run per layout (1 process, 2-rank FSDP2 under torchrun, 2-rank ZeRO-3 under
  deepspeed with the shipped persistence threshold, so small parameters are replicated) runs every
  optimizer from the same start: the parameters agree, the sparse thresholds are the same
  integers, and a step sends one all-reduce of a few numbers beyond the engine's gathers (a sparse
  step that recomputes its thresholds adds at most 8 all-reduces of 15 counts per parameter).
* ``launch/train.py`` runs of each optimizer replay from their trajectory.jsonl bit for bit
  (the sparse one also on 2-rank FSDP2, where its thresholds are recomputed on another layout),
  and resume after a kill, on another layout, where they would have been.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.test_equivalence import weights
from tests.helpers import launch

WORKER = "tests/distributed/workers/zo_optimizers_step.py"
LAYOUTS = {"single": ("python", "single"), "fsdp": ("torchrun", "fsdp"), "zero3": ("deepspeed", "zero3")}


@pytest.fixture(scope="module")
def worker_runs(tiny_models, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for layout, (launcher, backend) in LAYOUTS.items():
        d = tmp_path_factory.mktemp(f"zo_opt_{layout}")
        launch(launcher, WORKER, [backend, str(tiny_models["opt"]), str(d)])
        out[layout] = d
    return out


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("name", ["fzoo", "sparse", "adamezo"])
def test_every_layout_reaches_the_same_parameters(name, worker_runs, tiny_models):
    ref = _load(worker_runs["single"] / f"{name}.safetensors")
    start = weights(tiny_models["opt"])
    moved = max((ref[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4, "the optimizer did not move the parameters; the comparison would prove nothing"
    reports = {k: json.loads((d / "report.json").read_text())[name] for k, d in worker_runs.items()}
    for layout in ("fsdp", "zero3"):
        got = _load(worker_runs[layout] / f"{name}.safetensors")
        worst = max((ref[k] - got[k]).abs().max().item() for k in start)
        assert worst <= 1e-5, f"{layout}: parameters differ by {worst}"
        for a, b in zip(reports["single"]["rows"], reports[layout]["rows"]):
            assert [s for s, _ in a["directions"]] == [s for s, _ in b["directions"]]
            assert [g for _, g in a["directions"]] == pytest.approx([g for _, g in b["directions"]], rel=1e-4, abs=1e-6)
    if name == "sparse":
        # Exact integer searches: the same thresholds on every layout, to the bit.
        assert reports["single"]["state"] == reports["fsdp"]["state"] == reports["zero3"]["state"]


@pytest.mark.parametrize("layout", ["fsdp", "zero3"])
def test_a_step_sends_one_small_all_reduce(layout, worker_runs):
    report = json.loads((worker_runs[layout] / "report.json").read_text())
    # fzoo: N + 1 = 4 loss sums and the weight; sparse (2 directions): 2 x 2 sums and the weight.
    expected = {"fzoo": [5], "sparse": [5], "adamezo": [3]}
    for name, want in expected.items():
        ops = report[name]["collectives"]["1"]
        reduces = [c for c in ops if c["op"] == "all_reduce"]
        assert [c["shapes"] for c in reduces] == [[want]], (name, ops)
        assert not [c for c in ops if c["op"] not in ("all_reduce", "all_gather")], (name, ops)
        assert any(c["op"] == "all_gather" for c in ops), "expected the engine's parameter gathers"
    # Step 2 of the sparse run recomputes its thresholds (--zo_sparse_refresh 2): the count
    # all-reduces (15 per parameter, at most 8 rounds) come before the losses' one.
    ops = [c for c in report["sparse"]["collectives"]["2"] if c["op"] == "all_reduce"]
    counts = [c["shapes"] for c in ops[:-1]]
    assert 1 <= len(counts) <= 8 and all(s == [[15 * report["sparse"]["parameters"]]] for s in counts), ops
    assert ops[-1]["shapes"] == [[5]]


# -- launch/train.py: replay and resume ------------------------------------------------------

STEPS = 6
ARGS = ["--max_steps", str(STEPS), "--max_length", "32", "--zo_eps", "1e-3", "--weight_decay", "0.1",
        "--lr_scheduler_type", "linear", "--seed", "3", "--save_steps", "2", "--disable_tqdm", "--report_to", "none"]
FLAGS = {
    "fzoo": ["--zo_optimizer", "fzoo", "--zo_num_directions", "3", "--learning_rate", "2e-6"],
    "sparse": ["--zo_optimizer", "sparse", "--zo_sparsity", "0.6", "--learning_rate", "1e-3"],
    "adamezo": ["--zo_optimizer", "adamezo", "--zo_history", "3", "--learning_rate", "1e-3"],
}
TRAIN_LAYOUTS = {"single": ("one", ["--backend", "single"], 1), "fsdp": ("ranks", ["--backend", "fsdp"], 2),
                 "zero3": ("ranks", ["--ds_config", "ds_configs/zero3.json"], 2)}


def train(name: str, layout: str, model: Path, text: Path, out: Path, *extra: str, check: bool = True, **env):
    launcher, flags, world = TRAIN_LAYOUTS[layout]
    args = ["--model_name_or_path", str(model), "--train_file", str(text), "--output_dir", str(out),
            "--per_device_train_batch_size", str(4 // world), *ARGS, *FLAGS[name], *flags, *extra]
    return launch(launcher, "launch/train.py", args, check=check, **env)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_models, text_file, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name in FLAGS:
        d = tmp_path_factory.mktemp(f"zo_train_{name}") / "out"
        train(name, "single", tiny_models["opt"], text_file, d)
        out[name] = d
    return out


@pytest.mark.parametrize("name,layout", [("fzoo", "single"), ("sparse", "single"), ("adamezo", "single"),
                                         ("sparse", "fsdp")])
def test_replay_from_the_trajectory_rebuilds_the_run(name, layout, trained, tiny_models, tmp_path):
    traj = rows(trained[name])
    assert all(r["optimizer"] == name for r in traj) and len(traj) == STEPS
    launcher, flags, _ = TRAIN_LAYOUTS[layout]
    launch(launcher, "launch/replay.py", ["--model_name_or_path", str(tiny_models["opt"]),
                                          "--trajectory", str(trained[name] / "trajectory.jsonl"),
                                          "--output_dir", str(tmp_path / "rebuilt"), *flags])
    ref, got = weights(trained[name] / "final"), weights(tmp_path / "rebuilt")
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    # The same passes in the same order on the same layout: bit for bit. Another layout: rounding.
    assert worst == 0.0 if layout == "single" else worst <= 1e-6, worst


@pytest.mark.parametrize("name,first,second", [("adamezo", "fsdp", "single"), ("sparse", "single", "zero3")])
def test_kill_then_resume_keeps_the_optimizer_state(name, first, second, trained, tiny_models, text_file, tmp_path):
    out = tmp_path / "out"
    # The last rank dies as step 5 starts: checkpoint-4 holds the adamezo history (3 steps) or
    # the sparse thresholds (from step 0, never recomputed: the resume must not recompute them).
    world = TRAIN_LAYOUTS[first][2]
    killed = train(name, first, tiny_models["opt"], text_file, out, check=False, MEZO_DIST_TEST_KILL=f"{world - 1}:5")
    assert killed.returncode != 0 and (out / "checkpoint-4" / "index.json").exists()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["optimizer_state"]
    assert len(state["history"]) == 3 if name == "adamezo" else len(state["thresholds"]) > 0
    resumed = train(name, second, tiny_models["opt"], text_file, out, "--resume_from_checkpoint", "latest")
    assert "at step 4" in resumed.stdout
    for a, b in zip(rows(trained[name]), rows(out)):
        assert a["seed"] == b["seed"]
        assert abs(a["projected_grad"] - b["projected_grad"]) <= 1e-4 * max(1.0, abs(a["projected_grad"])), (a, b)
    ref, got = weights(trained[name] / "final"), weights(out / "final")
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-5
