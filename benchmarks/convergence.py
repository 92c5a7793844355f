"""Which zeroth-order optimizer reaches MeZO's accuracy in fewer forward passes?

Dev accuracy against the number of forward passes (not steps) for ``mezo``, ``fzoo``, ``sparse``,
``adamezo`` and the backprop baseline (AdamW, ``--trainer regular``), every method given the same
budget of forward passes, each with a small learning-rate sweep reported in full. Each run is a
subprocess of ``launch/train.py`` (as in ``fidelity.py``, whose run launcher and result reader it
reuses); the curve is the run's dev accuracy, scored every ``--eval_every`` forwards.

Forward passes per step (what a step costs; dev and eval scoring are not counted):

* mezo, sparse: 2 per direction (``--zo_num_directions`` 1: 2);
* fzoo: N + 1 (N one-sided directions around one unperturbed forward; ``--fzoo_directions``);
* adamezo: 2;
* backprop: 1 + ``--backward_cost`` (the issue counts a backward as one pass: 2 per step; a
  backward costs about two forwards in arithmetic, ``--backward_cost 2`` counts that).

A method's steps are ``budget // forwards per step``, rounded down to a multiple of its dev
interval (the trainer scores dev every ``eval_steps`` steps), so no method gets more forwards.

    python benchmarks/convergence.py                    # the full run: SST-2 and RTE, 1,600 forwards (800 mezo steps)
    python benchmarks/convergence.py --tasks SST2 --budget 480 --eval_every 120 --num_dev 200 \\
        --lr mezo=1e-5,3e-5 --tag reduced --append     # a reduced run; --append adds to the table
    python benchmarks/convergence.py --plan             # print the steps and dev intervals, run nothing

Defaults (the full specification): tasks SST2 and RTE with the paper's templates, SmolLM2-135M,
budget 1,600 forwards per run (an 800-step MeZO run), dev (200 examples, from train) every 160
forwards, 1,000 train examples, batch 16, eps 1e-3, eval 200 validation examples, and the
learning rates of ``DEFAULT_LRS`` (three per method). On an idle 2-core CPU a forward at batch 16
takes about 0.8 s on SST-2 (several times that on RTE's longer inputs): about 25 min per SST-2
run, 15 runs per task. On a GPU it takes minutes.

Results: ``benchmarks/results/convergence{_tag}.{json,md,png}`` through ``common.write_results``,
rewritten after every run. ``--append`` keeps the runs already in the file (a (task, method, lr)
run again replaces its row), so a sweep can be a sequence of short invocations.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, parser, save_figure, write_results  # noqa: E402
from benchmarks.fidelity import DEFAULT_DATA, Method, check_data, model_label, run_one  # noqa: E402

OPTIMIZERS = ("mezo", "fzoo", "sparse", "adamezo", "backprop")
# Three learning rates per method around the scale each update works at: MeZO's g z; FZOO's
# step normalised by the loss spread (lr ~ eps times the normalised step, fzoo.py); Sparse MeZO
# perturbs a quarter of the elements (the paper raises lr); AdaMeZO and AdamW take Adam's scale.
DEFAULT_LRS: dict[str, tuple[float, ...]] = {
    "mezo": (1e-5, 3e-5, 1e-4),
    "fzoo": (1e-7, 3e-7, 1e-6),
    "sparse": (3e-5, 1e-4, 3e-4),
    "adamezo": (3e-6, 1e-5, 3e-5),
    "backprop": (3e-6, 1e-5, 3e-5),
}


# ------------------------------------------------------------------------------------- accounting
def forwards_per_step(method: str, *, fzoo_directions: int = 8, zo_directions: int = 1,
                      backward_cost: float = 1.0) -> float:
    """Forward passes one training step of ``method`` costs (a backward counts ``backward_cost``)."""
    if method in ("mezo", "sparse"):
        return 2 * zo_directions
    if method == "fzoo":
        return fzoo_directions + 1
    if method == "adamezo":
        return 2
    if method == "backprop":
        return 1 + backward_cost
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(OPTIMIZERS)}")


def schedule(budget: int, eval_every: int, fps: float) -> tuple[int, int]:
    """(steps, eval_steps) of a run of ``fps`` forwards per step within ``budget`` forwards, dev
    scored about every ``eval_every`` forwards; steps a multiple of eval_steps (the trainer scores
    dev at those steps only), never more than the budget."""
    eval_steps = max(1, int(eval_every // fps))
    steps = int(budget // fps) // eval_steps * eval_steps
    if steps < 1:
        raise ValueError(f"a budget of {budget} forwards holds no dev interval of {eval_steps} steps at "
                         f"{fps:g} forwards per step; raise --budget or lower --eval_every")
    return steps, eval_steps


def parse_lrs(specs: list[str], methods: list[str]) -> dict[str, list[float]]:
    """``["mezo=1e-5,3e-5", ...]`` over DEFAULT_LRS, for ``methods``."""
    out = {m: list(DEFAULT_LRS[m]) for m in methods}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or name not in DEFAULT_LRS:
            raise ValueError(f"--lr {spec!r}: expected METHOD=LR[,LR...] with METHOD one of {', '.join(OPTIMIZERS)}")
        try:
            lrs = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--lr {spec!r}: learning rates must be numbers") from None
        if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise ValueError(f"--lr {spec!r}: give one or more positive learning rates")
        out[name] = lrs
    return out


def method_flags(method: str, lr: float, steps: int, eval_steps: int, args: argparse.Namespace) -> list[str]:
    flags = ["--num_train", str(args.num_train), "--num_dev", str(args.num_dev), "--max_steps", str(steps),
             "--eval_steps", str(eval_steps), "--train_as_classification", "--learning_rate", repr(lr),
             "--per_device_train_batch_size", str(args.batch_size), "--logging_steps", "0"]
    if method == "backprop":
        return ["--trainer", "regular", "--optim", "adamw", *flags]
    flags += ["--zo_optimizer", method, "--zo_eps", repr(args.zo_eps)]
    if method == "fzoo":
        flags += ["--zo_num_directions", str(args.fzoo_directions)]
    return flags


def fps_of(method: str, args: argparse.Namespace) -> float:
    return forwards_per_step(method, fzoo_directions=args.fzoo_directions, backward_cost=args.backward_cost)


# ------------------------------------------------------------------------------------- summaries
def forwards_to_reach(curve: list[list[float]], target: float) -> float | None:
    """Forwards of the first dev point at or above ``target`` ([[forwards, dev], ...])."""
    for f, v in curve:
        if v >= target - 1e-9:
            return f
    return None


def summarize(rows: list[dict], task: str, budget: int) -> dict[str, Any]:
    """Per method of ``task``: the best run (best dev over its sweep) and the forwards it took to
    reach mezo's best dev; and the issue's targets, where the runs allow a verdict."""
    runs = [r for r in rows if r["task"] == task and r.get("best_dev") is not None]
    best: dict[str, dict] = {}
    for r in runs:
        b = best.get(r["method"])
        if b is None or r["best_dev"] > b["best_dev"]:
            best[r["method"]] = r
    mezo = best.get("mezo")
    out: dict[str, Any] = {"methods": {}}
    for m in OPTIMIZERS:
        r = best.get(m)
        if r is None:
            continue
        entry = {"lr": r["lr"], "best_dev": r["best_dev"], "best_forwards": r["best_forwards"],
                 "eval": r.get("score"), "zero_shot_eval": r.get("initial_score")}
        if mezo is not None:
            # Any run of the method's sweep counts: the first that reaches it.
            reach = [f for x in runs if x["method"] == m
                     for f in [forwards_to_reach(x["curve_forwards"], mezo["best_dev"])] if f is not None]
            entry["forwards_to_mezo_best"] = min(reach) if reach else None
        out["methods"][m] = entry
    if mezo is not None:
        out["mezo_best_dev"] = mezo["best_dev"]
        out["mezo_forwards_to_best"] = mezo["best_forwards"]
        fast = [m for m, e in out["methods"].items() if m not in ("mezo", "backprop")
                and e.get("forwards_to_mezo_best") is not None and e["forwards_to_mezo_best"] <= budget / 3]
        out["reach_in_third"] = fast
        out["not_worse"] = [m for m, e in out["methods"].items() if m not in ("mezo", "backprop")
                            and e["best_dev"] >= mezo["best_dev"] - 1e-9]
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _fw(x: float | None) -> str:
    return "not reached" if x is None else f"{x:g}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Dev accuracy against forward passes: {meta['model']}", "",
             f"Machine: {meta['machine']}. Template: {meta['template']}. Budget {meta['budget']} forwards per run "
             f"(a backprop step counts 1 + {meta['backward_cost']:g}), dev ({meta['num_dev']} train-split examples) "
             f"every ~{meta['eval_every']} forwards, batch {meta['batch_size']}, eps {meta['zo_eps']:g}, "
             f"fzoo N = {meta['fzoo_directions']}, {meta['num_train']} train examples, eval on {meta['num_eval']} "
             f"validation examples (best-dev checkpoint), seed {meta['seed']}. Accuracy in %. "
             f"Total wall time {meta['wall_s'] / 60:.1f} min.", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        s = summarize(rows, task, meta["budget"])
        lines += [f"## {task}", "", "| method | best lr | best dev | at forwards | eval (best-dev ckpt) | zero-shot eval | "
                  "forwards to reach mezo's best |", "|---|---|---|---|---|---|---|"]
        for m, e in s["methods"].items():
            lines.append(f"| {m} | {e['lr']:g} | {_pct(e['best_dev'])} | {e['best_forwards']:g} | {_pct(e['eval'])} | "
                         f"{_pct(e['zero_shot_eval'])} | {_fw(e.get('forwards_to_mezo_best'))} |")
        if "mezo_best_dev" in s:
            third = meta["budget"] / 3
            lines += ["", f"Targets: reach mezo's best dev ({_pct(s['mezo_best_dev'])}, at {s['mezo_forwards_to_best']:g} "
                      f"forwards) within a third of the budget ({third:.0f} forwards): "
                      f"{', '.join(s['reach_in_third']) or 'none'}; best dev not below mezo's: "
                      f"{', '.join(s['not_worse']) or 'none'}."]
        lines += ["", "Every run (the sweep):", "", "| method | lr | steps | forwards/step | dev every (steps) | "
                  "dev curve (forwards: %) | best dev | eval | median step (s) | wall (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["task"] == task), key=lambda r: (OPTIMIZERS.index(r["method"]), r["lr"])):
            if "error" in r:
                lines.append(f"| {r['method']} | {r['lr']:g} | {r['steps']} | {r['fps']:g} | {r['eval_steps']} | "
                             f"failed: `{r['error'].splitlines()[-1][:120]}` | | | | {r.get('wall_s', '')} |")
                continue
            curve = ", ".join(f"{f:g}: {100 * v:.1f}" for f, v in r["curve_forwards"])
            lines.append(f"| {r['method']} | {r['lr']:g} | {r['steps']} | {r['fps']:g} | {r['eval_steps']} | {curve} | "
                         f"{_pct(r.get('best_dev'))} | {_pct(r.get('score'))} | {r.get('median_step_s', 'n/a')} | "
                         f"{r['wall_s']} |")
        lines.append("")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows)) or ["(no runs)"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    colors = dict(zip(OPTIMIZERS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, task in zip(axes[0], tasks):
        best = summarize(rows, task, 1)["methods"]
        for r in rows:
            if r["task"] != task or not r.get("curve_forwards"):
                continue
            top = best.get(r["method"], {}).get("lr") == r["lr"]
            f, v = zip(*r["curve_forwards"])
            ax.plot(f, [100 * x for x in v], marker="o", ms=3, color=colors[r["method"]], alpha=1.0 if top else 0.35,
                    lw=2 if top else 1, label=f"{r['method']} lr {r['lr']:g}")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("forward passes")
        ax.set_ylabel("dev accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------------------ main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--tasks", default="SST2,RTE", help="comma-separated task names (local data needed)")
    p.add_argument("--template", default="paper", help="prompt template of every task")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                   help="a method's learning rates (repeatable); the others keep DEFAULT_LRS")
    p.add_argument("--budget", type=int, default=1600, help="forward passes per run (1600: an 800-step mezo run)")
    p.add_argument("--eval_every", type=int, default=160, help="forward passes between dev evaluations")
    p.add_argument("--fzoo_directions", type=int, default=8, help="fzoo's N (N + 1 forwards per step)")
    p.add_argument("--backward_cost", type=float, default=1.0, help="forward passes a backward counts as")
    p.add_argument("--model_name_or_path", default="smollm2-135m")
    p.add_argument("--data_dir", default=str(DEFAULT_DATA), help="task files (default: $MEZO_DIST_DATA or ../shared/data)")
    p.add_argument("--num_train", type=int, default=1000)
    p.add_argument("--num_dev", type=int, default=200, help="dev examples (from the train split) of the curve")
    p.add_argument("--num_eval", type=int, default=200, help="eval examples (validation split), before and after")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--zo_eps", type=float, default=1e-3)
    p.add_argument("--max_length", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--append", action="store_true", help="keep the runs already in the results file")
    p.add_argument("--plan", action="store_true", help="print each run's steps and dev interval; run nothing")
    p.add_argument("--render_only", action="store_true", help="rewrite the markdown and chart from the JSON")
    args = p.parse_args(argv)
    args.data_dir = Path(args.data_dir).resolve()
    return args


def build_plan(args: argparse.Namespace) -> list[dict]:
    """One entry per (task, method, lr): its steps, dev interval and forwards per step."""
    from mezo_dist.tasks import get_task

    methods = [m.strip() for m in args.optimizers.split(",") if m.strip()]
    unknown = [m for m in methods if m not in OPTIMIZERS]
    if unknown or not methods:
        raise ValueError(f"unknown optimizers {unknown}; choose from {', '.join(OPTIMIZERS)}")
    if args.fzoo_directions < 2 or args.backward_cost < 0 or args.num_dev < 1 or args.eval_every < 1:
        raise ValueError("--fzoo_directions must be >= 2, --backward_cost >= 0, --num_dev and --eval_every >= 1")
    lrs = parse_lrs(args.lr, methods)
    plan = []
    for task in [get_task(t.strip()).name for t in args.tasks.split(",") if t.strip()]:
        get_task(task).template(args.template)
        for m in methods:
            fps = fps_of(m, args)
            steps, eval_steps = schedule(args.budget, args.eval_every, fps)
            plan += [{"task": task, "method": m, "lr": lr, "fps": fps, "steps": steps, "eval_steps": eval_steps}
                     for lr in lrs[m]]
    return plan


def finish_row(row: dict, got: dict) -> dict:
    """A run's result with its curve in forwards and its best dev point."""
    row.update(got)
    if "error" not in got:
        row["curve_forwards"] = [[s * row["fps"], v] for s, v in got.get("curve", [])]
        if row["curve_forwards"]:
            f, v = max(row["curve_forwards"], key=lambda p: (p[1], -p[0]))  # the earliest of equal bests
            row["best_forwards"], row["best_dev"] = f, v
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    name = "convergence" + (f"_{args.tag}" if args.tag else "")
    out = Path(args.results)
    meta = {"model": model_label(args.model_name_or_path), "model_name_or_path": args.model_name_or_path,
            **{k: getattr(args, k) for k in ("template", "budget", "eval_every", "fzoo_directions", "backward_cost",
                                              "num_train", "num_dev", "num_eval", "batch_size", "zo_eps", "seed")},
            "machine": machine(), "wall_s": 0.0}
    if args.render_only:
        data = json.loads((out / f"{name}.json").read_text())
        write_results(out, name, data["meta"], data["rows"], markdown(data["rows"], data["meta"]), chart)
        return 0
    try:
        plan = build_plan(args)
    except Exception as e:  # ValueError, or ConfigError from an unknown task or template
        raise SystemExit(f"convergence: error: {e}") from None
    for p in plan:
        print(f"{p['task']:>5} {p['method']:<9} lr {p['lr']:<8g} {p['steps']:>5} steps x {p['fps']:g} forwards, "
              f"dev every {p['eval_steps']} steps", flush=True)
    if args.plan:
        return 0
    check_data(args.data_dir, sorted({p["task"] for p in plan}), ["mezo"])
    rows: list[dict] = []
    if args.append and (out / f"{name}.json").is_file():
        old = json.loads((out / f"{name}.json").read_text())
        rows, meta["wall_s"] = old["rows"], old["meta"].get("wall_s", 0.0)
        for k in ("template", "budget", "eval_every", "fzoo_directions", "backward_cost", "num_dev", "batch_size"):
            if old["meta"].get(k) != meta[k]:
                raise SystemExit(f"convergence: error: {out / name}.json was measured with {k} {old['meta'].get(k)}, "
                                 f"not {meta[k]}; use another --tag")
    t0, base, failed = time.perf_counter(), meta["wall_s"], 0
    for p in plan:
        m = Method(p["method"], lambda a, p=p: method_flags(p["method"], p["lr"], p["steps"], p["eval_steps"], a),
                   lambda a: p["method"], trains=True)
        row = finish_row(dict(p), run_one(args, p["task"], args.template, m))
        failed += "error" in row
        rows = [r for r in rows if (r["task"], r["method"], r["lr"]) != (p["task"], p["method"], p["lr"])] + [row]
        meta["wall_s"] = round(base + time.perf_counter() - t0, 1)
        print(f"{p['task']:>5} {p['method']:<9} lr {p['lr']:g}: best dev {_pct(row.get('best_dev'))} at "
              f"{row.get('best_forwards', 'n/a')} forwards, eval {_pct(row.get('score'))} [{row['wall_s']:.0f} s]"
              + (f" FAILED {row['error'].splitlines()[-1]}" if "error" in row else ""), flush=True)
        write_results(out, name, meta, rows, markdown(rows, meta), chart)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
