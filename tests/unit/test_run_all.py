"""benchmarks/run_all.py: argument parsing, and the README written from result files (no benchmark runs)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


run_all = load("run_all")
scaling = load("scaling")
comm = load("comm_volume")

INFO = {"date": "2026-01-02", "platform": "Linux x86_64", "cores": 2, "python": "3.11.0", "cpu": "Test CPU 9000",
        "ram_gib": 24.0, "torch": "2.13.0", "transformers": "5.0", "deepspeed": "0.19.8", "gpu": []}


def test_parse_args_selection_and_defaults():
    a = run_all.parse_args([])
    assert run_all.selected(a) == ["step_cost", "memory", "perturb", "scaling", "comm_volume"]
    assert Path(a.readme) == ROOT / "benchmarks" / "README.md" and Path(a.results) == ROOT / "benchmarks" / "results"
    a = run_all.parse_args(["--with_fidelity", "--skip", "step_cost,memory,perturb"])
    assert run_all.selected(a) == ["scaling", "comm_volume", "fidelity"]
    assert run_all.selected(run_all.parse_args(["--only", "none"])) == []
    assert run_all.selected(run_all.parse_args(["--only", "comm_volume,scaling"])) == ["scaling", "comm_volume"]
    q = run_all.parse_args(["--quick"])
    assert Path(q.results).name == "quick" and Path(q.readme) == Path(q.results) / "README.md"
    # Quick mode passes each benchmark its small settings and the results folder.
    cmd = run_all.command("scaling", q)
    assert cmd[1].endswith("scaling.py") and "--steps" in cmd and cmd[-2:] == ["--results", q.results]
    assert run_all.command("comm_volume", a)[2:] == ["--hsdp", "--results", a.results]
    with pytest.raises(SystemExit):
        run_all.parse_args(["--skip", "nonsense"])


def scaling_rows() -> list[dict]:
    rows = []
    for method, base in (("mezo", 1.0), ("backprop", 2.0)):
        for backend, world, step in (("single", 1, base * 0.9), ("fsdp", 1, base), ("fsdp", 2, base * 1.25),
                                     ("fsdp", 4, base * 2.5)):
            rows.append({"method": method, "backend": backend, "world_size": world, "omp_threads": max(1, 2 // world),
                         "oversubscribed": world > 2, "step_s": step, "global_batch": 4 * world,
                         "examples_per_s": 4 * world / step, "tokens_per_s": 256 * world / step})
    scaling.add_ratios(rows)
    return rows


def comm_rows() -> list[dict]:
    def row(method, backend, world, replicas, gather, scatter, reduce, cross=None):
        per = {"all_gather": {"bytes": gather, "calls": 18}, "reduce_scatter": {"bytes": scatter, "calls": 9 if scatter else 0},
               "all_reduce": {"bytes": reduce, "calls": 1}, "other": {"bytes": 0, "calls": 0}}
        r = {"method": method, "backend": backend, "world_size": world, "hsdp_replicas": replicas, "steps": 2,
             "per_step": per, "total_bytes": gather + scatter + reduce, "logged_calls": 10, "profiler_gloo_calls": 10, "cross_replica_complete": True}
        if cross is not None:
            r.update(cross_replica_bytes=cross, cross_replica_calls=1, cross_replica_ops={"all_reduce": 1})
        return r

    model = 100 * 2**20
    rows = [row("mezo", "fsdp", 2, 1, 2 * model, 0, 24), row("backprop", "fsdp", 2, 1, 2 * model, model, 16),
            row("mezo", "fsdp", 4, 2, 2 * model, 0, 24, cross=24)]
    comm.add_ratios(rows, model)
    return rows


def write_fixtures(results: Path) -> None:
    results.mkdir(parents=True)
    srows = scaling_rows()
    smeta = {"model": "random-weight OPT, 25.6M parameters", "micro_batch": 4, "max_length": 64, "steps": 4,
             "cores": 2, "oversubscribed_worlds": [4], "machine": "x86_64, 2 CPU cores"}
    (results / "scaling.json").write_text(json.dumps({"meta": smeta, "rows": srows}))
    (results / "scaling.md").write_text(scaling.markdown(srows, smeta))
    crows = comm_rows()
    cmeta = {"model": "random-weight OPT", "param_bytes": 100 * 2**20, "micro_batch": 2, "seq": 32, "steps": 2,
             "machine": "x86_64, 2 CPU cores"}
    (results / "comm_volume.json").write_text(json.dumps({"meta": cmeta, "rows": crows}))
    (results / "comm_volume.md").write_text(comm.markdown(crows, cmeta))
    step = {"meta": {"model": "SmolLM2", "global_batch": 16, "seq_len": 32, "machine": "x86_64"},
            "rows": [{"step_over_two_forwards": 1.5, "memory_ratio": 1.0}, {"step_over_two_forwards": 2.0, "memory_ratio": 1.08}]}
    (results / "step_cost.json").write_text(json.dumps(step))
    (results / "step_cost.md").write_text("# MeZO step cost: SmolLM2\n\n| backend | world |\n|---|---|\n| single | 1 |\n")


def test_readme_from_fixture_results(tmp_path):
    results = tmp_path / "results"
    write_fixtures(results)
    args = run_all.parse_args(["--only", "none", "--results", str(results), "--readme", str(tmp_path / "README.md")])
    ran = {"scaling": {"name": "scaling", "seconds": 300.0, "returncode": 0},
           "memory": {"name": "memory", "seconds": 5.0, "returncode": 1, "error": "RuntimeError: boom"}}
    text = run_all.write_readme(args, ran, INFO)
    assert text == (tmp_path / "README.md").read_text()
    # The machine, and the missing GPU said in so many words.
    assert "| CPU | Test CPU 9000 (2 cores, Linux x86_64) |" in text and "| RAM | 24.0 GiB |" in text
    assert "none (no GPU was available for this run)" in text and "No GPU was available for this run" in text
    assert "2.13.0 / 5.0 / 0.19.8" in text
    sections = {s.split("\n", 1)[0]: s for s in text.split("\n## ")[1:]}
    sc = sections[run_all.TITLES["scaling"]]
    assert "run by this script (300 s)" in sc and "(results/scaling.md)" in sc
    # Key table copied from the results file, with the oversubscription flagged.
    assert "| mezo | fsdp | 4 (oversubscribed) | 1 | 2.500 | 16 |" in sc
    # Ratios: weak scaling of fsdp x2 = (8 / 1.25) / (4 / 1.0) = 1.6x, 80 %; MeZO / backprop = 2x.
    assert "mezo: 2 ranks 1.60x throughput of 1 rank (80% efficiency), 4 ranks 1.60x" in sc
    assert "fsdp x2 2.00x" in sc and "oversubscribed" in sc
    cv = sections[run_all.TITLES["comm_volume"]]
    assert "from an earlier run" in cv
    assert "mezo on fsdp x2: 200.0 MiB all-gathered (2.00x the model), 0 B reduce-scattered, 24 B all-reduced" in cv
    assert "backprop moves 1.50x MeZO's bytes" in cv
    assert "24 B across replica groups" in cv and "| mezo | fsdp HSDP 2x2 | 24 B | 1 | all_reduce x1 |" in cv
    st = sections[run_all.TITLES["step_cost"]]
    assert "1.50x to 2.00x the time of two inference forwards and 1.000x to 1.080x their peak memory" in st
    assert "| single | 1 |" in st
    assert "the run failed: RuntimeError: boom" in sections[run_all.TITLES["memory"]]
    assert "no results yet" in sections[run_all.TITLES["perturb"]]
    assert str(tmp_path) not in text  # links are relative


def test_main_with_nothing_to_run_only_writes_the_readme(tmp_path, monkeypatch):
    results = tmp_path / "results"
    write_fixtures(results)
    monkeypatch.setattr(run_all, "machine_info", lambda: dict(INFO))
    monkeypatch.setattr(run_all.subprocess, "run", lambda *a, **k: pytest.fail("no benchmark may run"))
    assert run_all.main(["--only", "none", "--results", str(results), "--readme", str(tmp_path / "R.md")]) == 0
    assert (tmp_path / "R.md").read_text().startswith("# Benchmarks\n")


def test_fidelity_ratios_quote_points_over_zero_shot():
    rows = [{"task": "SST2", "template": "paper", "budget": {"steps": 400},
             "methods": {"zero_shot": {"score": 0.535}, "icl": {"score": 0.54}, "mezo": {"score": 0.655},
                         "backprop": {"score": 0.9}}},
            {"task": "RTE", "template": "paper", "methods": {"zero_shot": {"score": 0.5}, "mezo": {"error": "exit 1"}}}]
    lines = run_all.ratios_fidelity({"meta": {"steps": 100}, "rows": rows})
    assert lines == ["SST2 / paper: zero-shot 53.5, ICL 54.0 (+0.5 points), MeZO after 400 steps 65.5 (+12.0 points), "
                     "backprop after 400 steps 90.0 (+36.5 points)",
                     "RTE / paper: zero-shot 50.0"]


def test_perturb_ratios_pair_rows_by_thread_count():
    rows = [{"path": "reference", "perturbation": "gaussian", "elements_per_s": 2.0},
            {"path": "reference 1 thread", "perturbation": "gaussian", "elements_per_s": 1.0},
            {"path": "compiled", "perturbation": "gaussian", "elements_per_s": 8.0},
            {"path": "compiled 1 thread", "perturbation": "gaussian", "elements_per_s": 3.0}]
    (line,) = run_all.ratios_perturb({"rows": rows})
    assert "compiled (gaussian): 4.00x" in line and "compiled 1 thread (gaussian): 3.00x" in line
    assert "reference" not in line.split(":", 1)[1].split("x the")[0]
