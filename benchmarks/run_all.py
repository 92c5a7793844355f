"""Run the benchmark suite and write ``benchmarks/README.md`` from its results.

Each benchmark runs as a subprocess with its own arguments and writes its JSON and Markdown
results under ``--results``; this script then reads every result file there (from this run or
an earlier one: the README says which) and writes one report: the machine, and per benchmark
its key table and ratios.

    python benchmarks/run_all.py                                  # all but fidelity (hours on CPU)
    python benchmarks/run_all.py --with_fidelity                  # fidelity too
    python benchmarks/run_all.py --skip step_cost,memory,perturb  # reuse those results, run the rest
    python benchmarks/run_all.py --only none                      # only rewrite the README
    python benchmarks/run_all.py --quick                          # smoke run: small settings, results
                                                                  # and README under results/quick/

With a CUDA GPU present it also runs step_cost and memory on random-weight OPT-1.3B, 2.7B and
6.7B shapes (``--gpu_sizes``), and perturb on the GPU; those results go under
``results/gpu/opt-<size>/`` and get a section of their own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

ORDER = ("step_cost", "memory", "perturb", "scaling", "comm_volume", "fidelity")
# Arguments of each benchmark: the full run, and the smoke run (--quick).
ARGS = {
    "step_cost": ([], ["--configs", "single:1,fsdp:2", "--iters", "2", "--warmup", "1", "--batch", "4", "--seq", "16"]),
    "memory": ([], ["--worlds", "1", "--steps", "2", "--hidden", "128", "--layers", "2", "--ffn", "256",
                    "--batch", "2", "--max_length", "32", "--methods", "inference,mezo,backprop"]),
    "perturb": ([], ["--repeats", "1"]),
    "scaling": ([], ["--worlds", "1,2", "--steps", "3", "--hidden", "128", "--layers", "2", "--ffn", "256",
                     "--batch", "2", "--max_length", "32"]),
    "comm_volume": (["--hsdp"], ["--placements", "fsdp", "--hidden", "128", "--layers", "2",
                                 "--ffn", "256"]),
    "fidelity": ([], ["--tasks", "SST2", "--templates", "default", "--steps", "10", "--eval_steps", "5",
                      "--num_eval", "20", "--num_dev", "10", "--num_train", "50"]),
}
TITLES = {
    "step_cost": "Step cost: a MeZO step against two inference forwards",
    "memory": "Memory: inference, MeZO and fine-tuning by backpropagation",
    "perturb": "Perturbation pass",
    "scaling": "Weak scaling: 1, 2 and 4 ranks",
    "comm_volume": "Communication volume per step",
    "fidelity": "Fidelity: zero-shot, in-context learning and MeZO",
}
GPU_SIZES = "1.3b,2.7b,6.7b"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings for a smoke run (results under results/quick)")
    p.add_argument("--skip", default="", help=f"comma-separated benchmarks not to run, from {', '.join(ORDER)}")
    p.add_argument("--only", default="", help="comma-separated benchmarks to run (none: only write the README)")
    p.add_argument("--with_fidelity", action="store_true", help="also run fidelity (hours on CPU)")
    p.add_argument("--results", default=None, help="results folder (default: benchmarks/results, or results/quick)")
    p.add_argument("--readme", default=None, help="report path (default: benchmarks/README.md, or "
                   "README.md in the results folder with --quick)")
    p.add_argument("--gpu_sizes", default=GPU_SIZES, help="OPT sizes for the GPU runs (only with CUDA)")
    p.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per benchmark")
    args = p.parse_args(argv)
    unknown = {n for n in args.skip.split(",") + args.only.split(",") if n and n != "none"} - set(ORDER)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
    if args.results is None:
        args.results = str(BENCH / "results" / "quick") if args.quick else str(BENCH / "results")
    if args.readme is None:
        args.readme = str(Path(args.results) / "README.md") if args.quick else str(BENCH / "README.md")
    return args


def selected(args: argparse.Namespace) -> list[str]:
    """The benchmarks to run, in order."""
    if args.only:
        names = [n for n in args.only.split(",") if n and n != "none"]
    else:
        names = [n for n in ORDER if n != "fidelity" or args.with_fidelity]
    skip = {n for n in args.skip.split(",") if n}
    return [n for n in ORDER if n in names and n not in skip]


def command(name: str, args: argparse.Namespace) -> list[str]:
    full, quick = ARGS[name]
    return [sys.executable, str(BENCH / f"{name}.py"), *(quick if args.quick else full), "--results", args.results]


def run_benchmark(name: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict:
    cmd = command(name, args) + (extra or [])
    print(f"== {name}: {' '.join(Path(c).name if os.sep in c else c for c in cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    took = time.perf_counter() - t0
    status = {"name": name, "seconds": round(took, 1), "returncode": proc.returncode}
    if proc.returncode != 0:
        status["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no message"
        print(f"   failed after {took:.0f}s: {status['error']}\n{proc.stderr[-3000:]}", flush=True)
    else:
        print(f"   done in {took:.0f}s", flush=True)
    return status


# --- the machine -----------------------------------------------------------------------------


def machine_info() -> dict:
    info = {"date": datetime.date.today().isoformat(), "platform": f"{platform.system()} {platform.machine()}",
            "cores": os.cpu_count(), "python": platform.python_version()}
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = cpu or "unknown"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        info["ram_gib"] = round(kb / 2**20, 1)
    except (OSError, AttributeError):
        info["ram_gib"] = None
    from importlib import metadata

    for pkg in ("torch", "transformers", "deepspeed"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    try:
        import torch

        info["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
    except ImportError:
        info["gpu"] = []
    return info


# --- GPU runs on OPT shapes ------------------------------------------------------------------


def gpu_runs(args: argparse.Namespace) -> list[dict]:
    """step_cost and memory on random-weight OPT shapes, perturb on the GPU (CUDA only)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from mezo_dist.plan import OPT

    gpus = torch.cuda.device_count()
    statuses = []
    for size in [s for s in args.gpu_sizes.split(",") if s]:
        h, n, ffn, vocab, heads = OPT[size]
        out = Path(args.results) / "gpu" / f"opt-{size}"
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / f"opt-{size}"
            from transformers import OPTConfig, OPTForCausalLM

            config = OPTConfig(hidden_size=h, num_hidden_layers=n, ffn_dim=ffn, vocab_size=vocab,
                               num_attention_heads=heads, word_embed_proj_dim=h, max_position_embeddings=2048)
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = OPTForCausalLM(config).to(torch.bfloat16)
            model.save_pretrained(folder)
            del model
            torch.cuda.empty_cache()
            configs = "single:1" + (f",fsdp:{gpus},zero3:{gpus}" if gpus > 1 else ",fsdp:1,zero3:1")
            cmd_args = argparse.Namespace(**{**vars(args), "results": str(out)})
            st = run_benchmark("step_cost", cmd_args, ["--model_name_or_path", str(folder), "--dtype", "bfloat16",
                                                       "--configs", configs, "--batch", "16", "--seq", "256"])
            statuses.append({**st, "name": f"step_cost opt-{size}"})
        st = run_benchmark("memory", cmd_args, ["--hidden", str(h), "--layers", str(n), "--ffn", str(ffn)])
        statuses.append({**st, "name": f"memory opt-{size}"})
    statuses.append({**run_benchmark("perturb", argparse.Namespace(**{**vars(args), "results": str(
        Path(args.results) / "gpu")}), ["--device", "cuda"]), "name": "perturb gpu"})
    return statuses


# --- the report ------------------------------------------------------------------------------


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def first_table(md: str) -> str:
    """The first Markdown table of a results file (its key table)."""
    lines, out = md.splitlines(), []
    for line in lines:
        if line.startswith("|"):
            out.append(line)
        elif out:
            break
    return "\n".join(out)


def all_tables(md: str) -> list[str]:
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append("\n".join(cur))
            cur = []
    return tables


def _range(vals: list[float], fmt: str) -> str:
    lo, hi = min(vals), max(vals)
    return fmt.format(lo) if abs(hi - lo) < 1e-12 else f"{fmt.format(lo)} to {fmt.format(hi)}"


def ratios_step_cost(d: dict) -> list[str]:
    rows = d["rows"]
    out = [f"A MeZO step costs {_range([r['step_over_two_forwards'] for r in rows], '{:.2f}x')} the time of two "
           f"inference forwards and {_range([r['memory_ratio'] for r in rows], '{:.3f}x')} their peak memory "
           f"({d['meta']['model']}, global batch {d['meta']['global_batch']} x {d['meta']['seq_len']})."]
    return out


def ratios_perturb(d: dict) -> list[str]:
    """Each path against the reference at the same thread count (rows named ``<path> 1 thread``
    are the 1-thread runs): a 2-thread pass against a 1-thread reference would flatter it."""
    rows = d["rows"]

    def threads(r: dict) -> str:
        return " 1 thread" if r["path"].endswith(" 1 thread") else ""

    refs = {threads(r): r for r in rows if r["path"].removesuffix(" 1 thread") == "reference"}
    out = []
    for r in rows:
        ref = refs.get(threads(r))
        if ref is not None and r is not ref:
            out.append(f"{r['path']} ({r['perturbation']}): {r['elements_per_s'] / ref['elements_per_s']:.2f}x the "
                       "reference's elements/s")
    return ["Against the reference's per-parameter `torch.normal` at the same thread count: " + "; ".join(out) + "."] \
        if out else []


def ratios_memory(d: dict) -> list[str]:
    """The memory benchmark's own ratio fields, whatever its rows hold (``*ratio*`` / ``*_vs_*`` keys)."""
    rows = d.get("rows") or d.get("cells") or []
    out = []
    for r in rows:
        if not isinstance(r, dict):
            continue
        keys = [k for k, v in r.items() if isinstance(v, (int, float)) and ("ratio" in k or "_vs_" in k)]
        if keys:
            who = " ".join(str(r[k]) for k in ("name", "backend") if k in r)
            world = r.get("world_size", r.get("world"))
            who += f" x{world}" if world is not None else ""
            out.append(f"{who}: " + ", ".join(f"{k} {r[k]:.2f}" for k in keys))
    return out[:12]


def ratios_scaling(d: dict) -> list[str]:
    rows, out = d["rows"], []
    for method in ("mezo", "backprop"):
        pts = [r for r in rows if r["method"] == method and r["backend"] == "fsdp" and "speedup_vs_fsdp1" in r
               and r["world_size"] > 1]
        if pts:
            out.append(f"{method}: " + ", ".join(
                f"{r['world_size']} ranks {r['speedup_vs_fsdp1']:.2f}x throughput of 1 rank ({r['efficiency']:.0%} "
                "efficiency" + (", oversubscribed" if r["oversubscribed"] else "") + ")" for r in pts))
    mb = [r for r in rows if "mezo_over_backprop" in r]
    if mb:
        out.append("MeZO over backprop, examples/s: " + ", ".join(
            f"{r['backend']} x{r['world_size']} {r['mezo_over_backprop']:.2f}x" for r in mb))
    over = d["meta"].get("oversubscribed_worlds") or []
    if over:
        out.append(f"{', '.join(map(str, over))} ranks ran on {d['meta']['cores']} cores (oversubscribed): those rows "
                   "measure contention for cores.")
    return out


def human_bytes(b: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def ratios_comm_volume(d: dict) -> list[str]:
    out = []
    for r in d["rows"]:
        ps = r["per_step"]
        where = (f"fsdp HSDP {r['hsdp_replicas']}x{r['world_size'] // r['hsdp_replicas']}" if r["hsdp_replicas"] > 1
                 else f"{r['backend']} x{r['world_size']}")
        line = (f"{r['method']} on {where}: {ps['all_gather']['bytes'] / 2**20:.1f} MiB all-gathered "
                f"({r['all_gather_over_model']:.2f}x the model), {human_bytes(ps['reduce_scatter']['bytes'])} "
                f"reduce-scattered, {human_bytes(ps['all_reduce']['bytes'])} all-reduced per step")
        if "cross_replica_bytes" in r:
            line += f"; {human_bytes(r['cross_replica_bytes'])} across replica groups" + (
                "" if r.get("cross_replica_complete", True) else " (at least)")
        if "backprop_over_mezo" in r:
            line += f"; backprop moves {r['backprop_over_mezo']:.2f}x MeZO's bytes"
        out.append(line)
    return out


def ratios_fidelity(d: dict) -> list[str]:
    out = []
    for r in d["rows"]:
        got = r["methods"]
        zs, icl, mezo, bp = (got.get(m, {}).get("score") for m in ("zero_shot", "icl", "mezo", "backprop"))
        if zs is None:
            continue
        parts = [f"zero-shot {100 * zs:.1f}"]
        if icl is not None:
            parts.append(f"ICL {100 * icl:.1f} ({100 * (icl - zs):+.1f} points)")
        steps = r.get("budget", d.get("meta", {})).get("steps")
        for name, score in (("MeZO", mezo), ("backprop", bp)):
            if score is not None:
                parts.append(f"{name} after {steps} steps {100 * score:.1f} ({100 * (score - zs):+.1f} points)")
        out.append(f"{r['task']} / {r['template']}: " + ", ".join(parts))
    return out


RATIOS = {"step_cost": ratios_step_cost, "memory": ratios_memory, "perturb": ratios_perturb,
          "scaling": ratios_scaling, "comm_volume": ratios_comm_volume, "fidelity": ratios_fidelity}


def section(name: str, results: Path, ran: dict[str, dict], readme_dir: Path) -> list[str]:
    data, md_path = load(results, name), results / f"{name}.md"
    lines = [f"## {TITLES[name]}", ""]
    if data is None or not md_path.exists():
        st = ran.get(name)
        why = f"the run failed: {st['error']}" if st and st.get("returncode") else "no results yet"
        lines += [f"`benchmarks/{name}.py`: {why}.", ""]
        return lines
    md = md_path.read_text()
    rel = os.path.relpath(md_path, readme_dir)
    st = ran.get(name)
    if st and st["returncode"] == 0:
        when = f"run by this script ({st['seconds']:.0f} s)"
    else:
        stamp = datetime.datetime.fromtimestamp(md_path.stat().st_mtime).date().isoformat()
        when = f"from an earlier run (results written {stamp})"
    heading = md.splitlines()[0].lstrip("# ").strip() if md.strip() else name
    lines += [f"`benchmarks/{name}.py`, {when}: {heading}. Full results: [{rel}]({rel}).", ""]
    machine = data.get("meta", {}).get("machine") if isinstance(data.get("meta"), dict) else None
    if machine:
        lines += [f"Measured on: {machine}.", ""]
    tables = all_tables(md)
    if tables:
        lines += [tables[0], ""]
    if name == "comm_volume" and len(tables) > 1:
        lines += [tables[1], ""]
    try:
        ratios = RATIOS[name](data)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        ratios = [f"(ratios not computed: {type(e).__name__} {e})"]
    lines += [f"* {r}" for r in ratios]
    if ratios:
        lines.append("")
    png = results / f"{name}.png"
    if png.exists():
        lines += [f"![{name}]({os.path.relpath(png, readme_dir)})", ""]
    return lines


def gpu_section(results: Path, readme_dir: Path, gpus: list[str]) -> list[str]:
    lines = ["## GPU: random-weight OPT shapes", ""]
    folders = sorted((results / "gpu").glob("opt-*")) if (results / "gpu").exists() else []
    if not gpus and not folders:
        return lines + ["No GPU was available for this run: the step-cost, memory and perturbation runs on "
                        "OPT-1.3B to 6.7B shapes, which `run_all.py` starts when CUDA is present, did not run.", ""]
    for folder in folders:
        for name in ("step_cost", "memory"):
            md = folder / f"{name}.md"
            if md.exists():
                rel = os.path.relpath(md, readme_dir)
                table = first_table(md.read_text())
                lines += [f"### {folder.name}, {name} ([{rel}]({rel}))", "", table, ""]
    return lines


def write_readme(args: argparse.Namespace, ran: dict[str, dict], info: dict) -> str:
    results, readme = Path(args.results), Path(args.readme)
    readme_dir = readme.parent.resolve()
    results = results.resolve()
    gpus = info.get("gpu") or []
    lines = [
        "# Benchmarks",
        "",
        "Written by `python benchmarks/run_all.py`" + (" --quick (a smoke run: small settings)" if args.quick else "")
        + f" on {info['date']}. Each section names the script and says whether its results are from this run or "
        "an earlier one; ratios are quoted from one run each (the machine is shared, and timings between runs "
        "differ).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {info['cpu']} ({info['cores']} cores, {info['platform']}) |",
        f"| RAM | {info['ram_gib']} GiB |" if info.get("ram_gib") else "| RAM | unknown |",
        f"| GPU | {', '.join(gpus) if gpus else 'none (no GPU was available for this run)'} |",
        f"| Python | {info['python']} |",
        f"| torch / transformers / deepspeed | {info.get('torch')} / {info.get('transformers')} / {info.get('deepspeed')} |",
        "",
    ]
    for name in ORDER:
        lines += section(name, results, ran, readme_dir)
    lines += gpu_section(results, readme_dir, gpus)
    text = "\n".join(lines).rstrip() + "\n"
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    ran = {}
    for name in selected(args):
        ran[name] = run_benchmark(name, args)
    info = machine_info()
    if info["gpu"] and not args.quick:
        for st in gpu_runs(args):
            ran[st["name"]] = st
    write_readme(args, ran, info)
    print(f"wrote {args.readme}")
    failed = [n for n, st in ran.items() if st["returncode"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
