"""benchmarks/scoring.py end to end on a tiny random-weight model with SmolLM2's tokenizer (smoke):
the three ways of stepping run, the two scorings agree, the two decoders give the same tokens."""

from __future__ import annotations

import json
import sys

from tests.helpers import run_cmd


def test_scoring_benchmark_runs_and_reports(bpe_models, real_data, tmp_path):
    run_cmd([sys.executable, "benchmarks/scoring.py", "--model_name_or_path", str(bpe_models["llama"]),
             "--batch", "4", "--steps", "1", "--warmup", "0", "--squad", "3", "--squad_batch", "2",
             "--max_new_tokens", "6", "--results", str(tmp_path)], timeout=300, MEZO_DIST_DATA=str(real_data))
    result = json.loads((tmp_path / "scoring.json").read_text())
    assert set(result["steps"]["step_s"]) == {"project", "reference", "project_before"}
    assert result["speedup_vs_reference"] > 0 and len(result["meta"]["loadavg_start"]) == 3
    assert result["steps"]["loss_max_abs_diff"] <= 1e-5
    squad = result["squad"]
    assert squad["questions"] == 3 and squad["identical_tokens"] and squad["identical_texts"]
    assert "speedup_vs_reference" in (tmp_path / "scoring.md").read_text()
