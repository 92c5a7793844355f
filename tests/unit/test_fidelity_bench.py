"""benchmarks/fidelity.py: end to end on a tiny random-weight model (smoke), and its pure helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_benchmark, run_cmd

SCRIPT = ROOT / "benchmarks" / "fidelity.py"


def _load():
    return load_benchmark("fidelity")


def test_fidelity_smoke(tiny_models: dict[str, Path], real_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    run_cmd([sys.executable, str(SCRIPT), "--model_name_or_path", str(tiny_models["opt"]), "--data_dir", str(real_data),
             "--tasks", "SST2", "--templates", "paper", "--steps", "2", "--eval_steps", "1", "--num_eval", "8",
             "--num_dev", "4", "--num_demos", "2", "--max_length", "256", "--results", str(out),
             "--methods", "zero_shot,icl,mezo,backprop", "--bp_learning_rate", "1e-3"], timeout=300)
    for ext in ("json", "md", "png"):
        assert (out / f"fidelity.{ext}").is_file(), ext
    assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*")), "temporary files left behind"

    data = json.loads((out / "fidelity.json").read_text())
    assert data["meta"]["steps"] == 2 and data["meta"]["num_eval"] == 8
    (row,) = data["rows"]
    assert (row["task"], row["template"]) == ("SST2", "paper")
    for method in ("zero_shot", "icl", "mezo", "backprop"):
        got = row["methods"][method]
        assert "error" not in got, got
        assert 0.0 <= got["score"] <= 1.0 and got["eval_count"] == 8, (method, got)
    mezo = row["methods"]["mezo"]
    # Dev is scored after steps 1 and 2; the best of them is the reported checkpoint.
    assert [p[0] for p in mezo["curve"]] == [1, 2]
    assert all(0.0 <= p[1] <= 1.0 for p in mezo["curve"])
    assert mezo["best_step"] in (1, 2) and mezo["best_dev"] == max(p[1] for p in mezo["curve"])
    # Zero-shot and MeZO's score before training use the same model, template and eval examples.
    assert mezo["initial_score"] == row["methods"]["zero_shot"]["score"]
    assert row["gain_points"]["mezo"] == pytest.approx(100 * (mezo["score"] - row["methods"]["zero_shot"]["score"]))

    # The recorded commands name no folder of the host that ran them.
    text = (out / "fidelity.json").read_text()
    assert str(real_data) not in text and str(tmp_path) not in text and str(SCRIPT.parents[1]) not in text
    assert mezo["command"].startswith("launch/train.py ") and "--data_dir <data_dir>" in mezo["command"]

    bp = row["methods"]["backprop"]
    assert "--trainer regular" in bp["command"] and [p[0] for p in bp["curve"]] == [1, 2]
    assert row["gain_points"]["backprop"] == pytest.approx(100 * (bp["score"] - row["methods"]["zero_shot"]["score"]))
    md = (out / "fidelity.md").read_text()
    assert "backprop AdamW the same, lr 0.001" in md and "backprop AdamW gain over zero-shot" in md
    assert "| SST2 | paper | 2 |" in md and "ICL (2 demos)" in md and "MeZO (best dev step)" in md
    assert row["budget"]["steps"] == 2 and "Budget: MeZO 2 steps at batch" in md

    # --append: another task at another budget joins the table; the first row is kept as it was.
    run_cmd([sys.executable, str(SCRIPT), "--model_name_or_path", str(tiny_models["opt"]), "--data_dir", str(real_data),
             "--tasks", "RTE", "--templates", "paper", "--methods", "zero_shot", "--num_eval", "4",
             "--max_length", "256", "--results", str(out), "--append"], timeout=300)
    data2 = json.loads((out / "fidelity.json").read_text())
    assert [(r["task"], r["template"]) for r in data2["rows"]] == [("SST2", "paper"), ("RTE", "paper")]
    assert data2["rows"][0] == row
    assert data2["rows"][1]["budget"]["num_eval"] == 4 and data2["meta"]["wall_s"] >= data["meta"]["wall_s"]
    md = (out / "fidelity.md").read_text()
    assert "Budgets, per row: SST2 / paper: MeZO 2 steps" in md and "| RTE | paper | - |" in md
    # Columns come from every row, not only from the methods of the last invocation.
    rte = next(line for line in md.splitlines() if line.startswith("| RTE | paper | - |"))
    assert rte.count("not run") == 3, rte  # ICL, MeZO and backprop columns stay, empty for RTE

    # --render_only rewrites the table and plot from the JSON, running nothing.
    (out / "fidelity.md").unlink()
    (out / "fidelity.png").unlink()
    run_cmd([sys.executable, str(SCRIPT), "--render_only", "--results", str(out)], timeout=120)
    assert (out / "fidelity.md").read_text() == md and (out / "fidelity.png").is_file()


def test_templates_resolve_and_dedupe() -> None:
    fid = _load()
    # SST-2's default template is 'review'; RTE has only the paper's, so 'default' is the same run.
    assert fid.resolve_templates("SST2", ["paper", "default"]) == [("paper", "paper"), ("default (review)", "review")]
    assert fid.resolve_templates("RTE", ["paper", "default"]) == [("paper (= default)", "paper")]
    from mezo_dist.errors import ConfigError

    with pytest.raises(ConfigError):
        fid.resolve_templates("RTE", ["review"])


def test_curve_from_stdout() -> None:
    fid = _load()
    text = "before training: {...}\nstep 50: dev 0.5100\nnoise\nstep 100: dev 0.6200\nstep 50: dev 0.5300\n"
    assert fid.curve_from_stdout(text) == [[50, 0.53], [100, 0.62]]
    assert fid.curve_from_stdout("") == []


def test_estimate_defaults_over_an_hour() -> None:
    fid = _load()
    args = fid.parse([])
    pairs = sum(len(fid.resolve_templates(t, ["paper", "default"])) for t in ("SST2", "RTE"))
    assert pairs == 3
    est = fid.estimate_seconds(args, pairs, ["zero_shot", "icl", "mezo"])
    assert 1.5 * 3600 < est < 2.5 * 3600  # the docstring says about 2 h
