"""Does MeZO through mezo_dist actually fine-tune? Zero-shot vs in-context learning vs MeZO.

The question: on a real pretrained model and real tasks, at a stated budget of steps, does a MeZO
run of the project's own entry point (``launch/train.py``) beat the two no-training baselines of
the MeZO paper, zero-shot prompting and in-context learning (ICL), and by how much, with the
paper's prompt template and with the task's default template?

For each task and template, one run per method, each a subprocess of ``launch/train.py``:

* zero-shot: ``--eval_only --num_train 0 --num_dev 0`` (the eval set scored as is);
* ICL: ``--eval_only --num_demos K``, the K demonstrations drawn from a sampled pool of train rows;
* MeZO: ``--num_train 1000 --train_as_classification --max_steps S --eval_steps E``; the dev set
  (disjoint from train) is scored every E steps, the best-dev checkpoint is reported on the eval set;
* backprop (only when named in ``--methods``): the same as MeZO with ``--trainer regular``, AdamW at
  ``--bp_learning_rate``: the baseline that pays for backward passes and optimizer state.

All methods score the same eval examples (drawn from the validation split with a fixed seed). The
learning curve (dev metric vs step, one line per MeZO run) is read from the run's TensorBoard
scalars ``dev/<metric>``, or, where those cannot be read, from its ``step N: dev X`` lines.

    python benchmarks/fidelity.py                      # SmolLM2-135M, SST-2 + RTE, both templates
    python benchmarks/fidelity.py --tasks SST2,CB --steps 1000 --eval_steps 100 --tag long
    python benchmarks/fidelity.py --methods zero_shot,icl  # the baselines only (minutes)

Defaults: tasks SST2 and RTE, templates ``paper`` and ``default`` (SST-2's default is ``review``;
RTE has only the paper's template, so its two rows are one run), 400 MeZO steps at batch 16 with
lr 1e-5 and eps 1e-3, dev every 50 steps on 100 dev examples, 200 eval examples, 4 demonstrations.

Expected runtime on an idle 2-core CPU, from one MeZO step at batch 16 taking about 5 s and an
eval of 200 examples about 30 s (an ICL eval with K demonstrations about K + 1 times that): per
(task, template) about 45 s zero-shot, 3 min ICL and 37 min MeZO (400 steps 33 min, 8 dev evals
2 min, the eval before and after 1 min, model load and saves); three (task, template) pairs, so
about 2 h in all. Longer inputs cost more: RTE's premises are several times SST-2's sentences, and
scoring both candidates makes a classification step dearer than a plain LM step of the same batch,
so count on up to twice that; a machine shared with other jobs is slower again. The script prints
its estimate before it starts and, after each run, the time left at the pace measured so far; the
results record each MeZO run's median step time. On a GPU it takes minutes.

Results go to ``benchmarks/results/fidelity{_tag}.{json,md,png}``, rewritten after every run, so an
interrupted benchmark leaves the runs it finished. ``--append`` keeps the rows already in that file
(a (task, template) run again replaces its row), so tasks can be run at different budgets into one
table: every row records its own budget. A run that fails is recorded with its error and
the others go on; the script then exits with status 1. Methods are entries of ``METHODS``
(their flags and how their result is read).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, rank_env, save_figure, write_results  # noqa: E402

TRAIN = ROOT / "launch" / "train.py"
DEFAULT_DATA = Path(os.environ.get("MEZO_DIST_DATA", ROOT.parent / "shared" / "data"))

# Cost model of the runtime estimate (2-core CPU, SmolLM2-135M, SST-2-length inputs).
STEP_S_AT_16 = 5.0  # one MeZO step (two forwards) at batch 16
EVAL_S_PER_EXAMPLE = 30.0 / 200  # scoring one eval example (both candidates)
RUN_OVERHEAD_S = 15.0  # process start, model load
MEZO_OVERHEAD_S = 30.0  # plus best-dev checkpoints and the final export

_DEV_LINE = re.compile(r"^step (\d+): dev (\S+)\s*$")


# ------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """One way of getting an eval score: the flags it adds to ``launch/train.py`` and its label.

    ``flags(args)`` returns the method's flags (the shared ones: task, template, data, eval size,
    model, seeds, come from :func:`base_flags`). ``trains`` marks methods that update the model
    (a TensorBoard log is kept and the learning curve read; the table shows their gain over
    zero-shot). ``label(args)`` is the column header.
    """

    name: str
    flags: Callable[[argparse.Namespace], list[str]]
    label: Callable[[argparse.Namespace], str]
    trains: bool = False


def _zero_shot_flags(args: argparse.Namespace) -> list[str]:
    return ["--eval_only", "--num_train", "0", "--num_dev", "0"]


def _icl_flags(args: argparse.Namespace) -> list[str]:
    pool = max(args.icl_pool, args.num_demos)
    return ["--eval_only", "--num_demos", str(args.num_demos), "--num_train", str(pool), "--num_dev", "0"]


def _training_flags(args: argparse.Namespace, lr: float, extra: list[str]) -> list[str]:
    # Every training method: the same data, steps, batch and dev selection; its own learning rate.
    return ["--num_train", str(args.num_train), "--num_dev", str(args.num_dev), "--max_steps", str(args.steps),
            "--eval_steps", str(args.eval_steps), "--train_as_classification", "--learning_rate", repr(lr),
            *extra, "--per_device_train_batch_size", str(args.batch_size), "--logging_steps", "0"]


def _mezo_flags(args: argparse.Namespace) -> list[str]:
    return _training_flags(args, args.learning_rate, ["--zo_eps", repr(args.zo_eps)])


def _backprop_flags(args: argparse.Namespace) -> list[str]:
    return ["--trainer", "regular", "--optim", "adamw", *_training_flags(args, args.bp_learning_rate, [])]


METHODS: dict[str, Method] = {
    "zero_shot": Method("zero_shot", _zero_shot_flags, lambda a: "zero-shot"),
    "icl": Method("icl", _icl_flags, lambda a: f"ICL ({a.num_demos} demos)"),
    "mezo": Method("mezo", _mezo_flags, lambda a: "MeZO (best dev step)", trains=True),
    # Not in the default --methods: the baseline that needs backward passes and Adam's memory.
    "backprop": Method("backprop", _backprop_flags, lambda a: "backprop AdamW (best dev step)", trains=True),
}


# --------------------------------------------------------------------------------------- planning
def resolve_templates(task_name: str, templates: list[str]) -> list[tuple[str, str]]:
    """(label, template name) pairs for one task; ``default`` is the task's default template.

    Two labels naming the same template (RTE's default is ``paper``) give one pair, labelled
    ``paper (= default)``, so that the same runs are not made twice.
    """
    from mezo_dist.tasks import get_task

    task = get_task(task_name)
    out: dict[str, list[str]] = {}
    for label in templates:
        name = task.default_template if label == "default" else label
        task.template(name)  # unknown template: ConfigError naming the task's templates
        out.setdefault(name, [])
        if label not in out[name]:
            out[name].append(label)
    pairs = []
    for name, labels in out.items():
        if labels == ["default"]:
            pairs.append((f"default ({name})", name))
        elif "default" in labels:
            pairs.append((f"{name} (= default)", name))
        else:
            pairs.append((name, name))
    return pairs


def estimate_run_seconds(args: argparse.Namespace, method: str) -> float:
    """One run's time on an idle 2-core CPU by the cost model above (SST-2-length inputs)."""
    n_eval = args.num_eval * EVAL_S_PER_EXAMPLE
    if method == "zero_shot":
        return RUN_OVERHEAD_S + n_eval
    if method == "icl":
        return RUN_OVERHEAD_S + n_eval * (args.num_demos + 1)
    if method in ("mezo", "backprop"):
        evals = args.steps // args.eval_steps if args.eval_steps else 0
        return (RUN_OVERHEAD_S + MEZO_OVERHEAD_S + args.steps * STEP_S_AT_16 * args.batch_size / 16
                + evals * args.num_dev * EVAL_S_PER_EXAMPLE + 2 * n_eval)
    return RUN_OVERHEAD_S + n_eval  # a method without a cost model yet


def estimate_seconds(args: argparse.Namespace, pairs: int, methods: list[str]) -> float:
    """The whole benchmark: ``pairs`` (task, template) pairs, one run per method each."""
    return pairs * sum(estimate_run_seconds(args, m) for m in methods)


def check_data(data_dir: Path, task_names: list[str], methods: list[str]) -> None:
    """Fail before any run if a task's local files are missing."""
    from mezo_dist.tasks import get_task

    for name in task_names:
        task = get_task(name)
        splits = [task.eval_split] + (["train"] if set(methods) - {"zero_shot"} else [])
        for split in splits:
            path = data_dir / task.task_dir / f"{task.splits[split]}.jsonl"
            if not path.is_file():
                raise SystemExit(f"fidelity: error: {path} not found (task {task.name}, split {split}); "
                                 f"pass --data_dir or set MEZO_DIST_DATA")


# ------------------------------------------------------------------------------------------ runs
def base_flags(args: argparse.Namespace, task: str, template: str, out: Path, *, tensorboard: bool) -> list[str]:
    flags = ["--model_name_or_path", args.model_name_or_path, "--task_name", task, "--template", template,
             "--data_dir", str(args.data_dir), "--num_eval", str(args.num_eval),
             "--train_set_seed", str(args.seed), "--seed", str(args.seed),
             "--eval_batch_size", str(args.eval_batch_size), "--output_dir", str(out), "--overwrite_output_dir",
             "--disable_tqdm", "--report_to", "tensorboard" if tensorboard else "none"]
    if args.max_length is not None:
        flags += ["--max_length", str(args.max_length)]
    return flags


def run_env() -> dict[str, str]:
    return rank_env(1)  # one process, whatever launched us, with every core


def scalars_from_tensorboard(logdir: Path, tags: list[str]) -> dict[str, list[list[float]]]:
    """{tag: [[step, value], ...]} sorted by step; the last value of a repeated step wins."""
    points: dict[str, dict[int, float]] = {t: {} for t in tags}
    if logdir.is_dir():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        # One accumulator per events file (a directory holds one per writer); size 0 keeps every point.
        for events in sorted(logdir.rglob("events.out.tfevents.*")):
            acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
            acc.Reload()
            present = set(acc.Tags().get("scalars", []))
            for tag in tags:
                if tag in present:
                    for ev in acc.Scalars(tag):
                        points[tag][int(ev.step)] = float(ev.value)
    return {t: [[s, p[s]] for s in sorted(p)] for t, p in points.items()}


def curve_from_stdout(text: str) -> list[list[float]]:
    """[[step, value], ...] from the trainer's ``step N: dev X`` lines."""
    points: dict[int, float] = {}
    for line in text.splitlines():
        m = _DEV_LINE.match(line.strip())
        if m:
            try:
                points[int(m.group(1))] = float(m.group(2))
            except ValueError:
                continue
    return [[s, points[s]] for s in sorted(points)]


def shown_command(cmd: list[str], out: Path, data_dir: Path) -> str:
    """The command as the results record it: relative to the checkout, with placeholders for the
    temporary output folder and the data folder, so results say nothing about the host."""
    text = " ".join(cmd).replace(str(out), "<tmp>").replace(str(data_dir), "<data_dir>")
    return text.replace(str(ROOT) + os.sep, "")


def run_one(args: argparse.Namespace, task: str, template: str, method: Method) -> dict[str, Any]:
    """One ``launch/train.py`` run; its eval metric, and for training methods the learning curve."""
    from mezo_dist.tasks import get_task

    metric = get_task(task).metric
    with tempfile.TemporaryDirectory(prefix=f"fidelity-{task}-{template}-{method.name}-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, str(TRAIN), *base_flags(args, task, template, out, tensorboard=method.trains),
               *method.flags(args)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        results_file = out / "eval_results.json"
        row: dict[str, Any] = {"wall_s": round(wall, 1), "command": shown_command(cmd[1:], out, args.data_dir)}
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["(no output)"])[-20:]
            row["error"] = f"exit {proc.returncode}: " + "\n".join(tail)
            return row
        if not results_file.is_file():
            row["error"] = "no eval_results.json written"
            return row
        res = json.loads(results_file.read_text())
        key = f"eval_{metric}"
        if key not in res:
            row["error"] = f"eval_results.json has no {key}: {sorted(res)}"
            return row
        row["metric"] = metric
        row["score"] = float(res[key])
        row["eval_count"] = int(res.get("eval_count", 0))
        if f"initial_{key}" in res:
            row["initial_score"] = float(res[f"initial_{key}"])
        if method.trains:
            for k in ("best_dev", "best_step"):
                if k in res:
                    row[k] = res[k]
            curve, source = [], "tensorboard"
            try:
                tb = scalars_from_tensorboard(out / "tensorboard", [f"dev/{metric}", "perf/step_time_s"])
                curve = tb[f"dev/{metric}"]
                times = sorted(v for _, v in tb["perf/step_time_s"])
                if times:
                    row["median_step_s"] = round(times[len(times) // 2], 2)
            except Exception as e:  # noqa: BLE001 - a log we cannot read falls back to stdout
                row["tensorboard_error"] = f"{type(e).__name__}: {e}"
            if not curve:
                curve, source = curve_from_stdout(proc.stdout), "stdout"
            row["curve"], row["curve_source"] = curve, source
            if curve and "best_step" not in row:
                best = max(curve, key=lambda p: p[1])
                row["best_step"], row["best_dev"] = best[0], best[1]
        return row


# --------------------------------------------------------------------------------------- reports
BUDGET_KEYS = ("steps", "eval_steps", "batch_size", "learning_rate", "zo_eps", "bp_learning_rate", "num_train", "num_dev",
               "num_eval", "num_demos", "icl_pool", "seed")


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a row was measured with (rows of one table may come from several invocations)."""
    return {k: getattr(args, k) for k in BUDGET_KEYS}


def budget_text(b: dict[str, Any], methods: Any = ()) -> str:
    text = (f"MeZO {b['steps']} steps at batch {b['batch_size']}, lr {b['learning_rate']:g}, eps {b['zo_eps']:g}, "
            f"{b['num_train']} train examples, dev ({b['num_dev']} examples) every {b['eval_steps']} steps; ")
    if "backprop" in methods:
        text += f"backprop AdamW the same, lr {b['bp_learning_rate']:g}; "
    return text + (f"ICL {b['num_demos']} demonstrations from {b['icl_pool']} train examples; "
                   f"{b['num_eval']} eval examples; seed {b['seed']}")


def load_rows(path: Path) -> list[dict]:
    """Rows of an earlier results file (``--append``); none if it does not exist."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    rows = data.get("rows", [])
    for r in rows:
        # Files written before rows carried their budget had one budget for all, in the meta.
        if "budget" not in r:
            meta = data.get("meta", {})
            missing = [k for k in BUDGET_KEYS if k not in meta and k != "bp_learning_rate"]  # older than backprop
            if missing:
                raise SystemExit(f"fidelity: error: {path} records no {', '.join(missing)} for its rows; "
                                 "run without --append")
            r["budget"] = {k: meta.get(k) for k in BUDGET_KEYS}
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def markdown(rows: list[dict], meta: dict, methods: list[str], args: argparse.Namespace) -> str:
    # Columns for every method some row has (rows added with --append may have run others).
    methods = [m for m in METHODS if m in methods or any(m in r["methods"] for r in rows)]
    cols = [METHODS[m].label(args) for m in methods]
    trained = [m for m in methods if METHODS[m].trains]
    gains = [f"{METHODS[m].label(args).split(' (')[0]} gain over zero-shot (points)" for m in trained
             if "zero_shot" in methods]
    budgets = {budget_text(r["budget"], r["methods"]) for r in rows if "budget" in r}
    lines = [
        f"# Zero-shot vs ICL vs MeZO: {meta['model']}",
        "",
        "MeZO reports the eval score of its best-dev checkpoint. Every method of a row scores the same "
        "eval examples (validation split; fewer where the split is smaller). Accuracy in %. "
        f"Machine: {meta['machine']}. Total wall time {meta['wall_s'] / 60:.1f} min.",
        "",
    ]
    if len(budgets) == 1:
        lines += [f"Budget: {budgets.pop()}.", ""]
    else:
        lines += ["Budgets, per row: " + "; ".join(f"{r['task']} / {r['template']}: "
                                                   f"{budget_text(r['budget'], r['methods'])}" for r in rows) + ".", ""]
    lines += [
        "| task | template | training steps | " + " | ".join(cols + gains) + " |",
        "|---|---|---|" + "---|" * (len(cols) + len(gains)),
    ]
    for r in rows:
        cells = []
        for m in methods:
            got = r["methods"].get(m)
            if got is None:
                cells.append("not run")
            elif "error" in got:
                cells.append("failed")
            elif METHODS[m].trains and got.get("best_step") is not None:
                cells.append(f"{_pct(got['score'])} (step {got['best_step']})")
            else:
                cells.append(_pct(got.get("score")))
        for m in trained:
            if "zero_shot" in methods:
                g = r.get("gain_points", {}).get(m)
                cells.append(("n/a" if m in r["methods"] else "") if g is None else f"{g:+.1f}")
        trains = any(METHODS[m].trains for m in r["methods"] if m in METHODS)
        steps = r.get("budget", {}).get("steps", meta.get("steps")) if trains else "-"
        lines.append(f"| {r['task']} | {r['template']} | {steps} | " + " | ".join(cells) + " |")
    step_times = [f"{r['task']} / {r['template']} {m} {got['median_step_s']:.1f} s" for r in rows
                  for m, got in r["methods"].items() if got.get("median_step_s") is not None]
    if step_times:
        lines += ["", "Median step time: " + "; ".join(step_times) + "."]
    failed = [(r["task"], r["template"], m, got["error"]) for r in rows for m, got in r["methods"].items()
              if "error" in got]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"* {t} / {tp} / {m}: `{e.splitlines()[-1][:200]}`" for t, tp, m, e in failed]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for r in rows:
        for m, got in r["methods"].items():
            curve = got.get("curve")
            if not curve:
                continue
            steps, values = [p[0] for p in curve], [100 * p[1] for p in curve]
            (line,) = ax.plot(steps, values, marker="o", ms=3, label=f"{r['task']} / {r['template']} ({m})")
            if got.get("best_step") in steps:
                i = steps.index(got["best_step"])
                ax.plot([steps[i]], [values[i]], marker="*", ms=12, color=line.get_color())
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no learning curves (no MeZO run finished)", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"dev accuracy (%), {meta['num_dev']} examples")
    ax.set_title(f"Learning curves: {meta['model']} (star: best dev step)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def write_all(out: Path, name: str, rows: list[dict], meta: dict, methods: list[str], args) -> None:
    write_results(out, name, meta, rows, markdown(rows, meta, methods, args), lambda rows, path: plot(rows, meta, path))


def model_label(name: str) -> str:
    from mezo_dist import assets

    if name == assets.DEFAULT_MODEL:
        return "SmolLM2-135M (smollm2-135m)"
    return Path(name).name or name


# ------------------------------------------------------------------------------------------ main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="SST2,RTE", help="comma-separated task names (local data needed)")
    p.add_argument("--templates", default="paper,default", help="comma-separated; 'default' is the task's default")
    p.add_argument("--methods", default="zero_shot,icl,mezo", help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--model_name_or_path", default="smollm2-135m")
    p.add_argument("--data_dir", default=str(DEFAULT_DATA), help="task files (default: $MEZO_DIST_DATA or ../shared/data)")
    p.add_argument("--steps", type=int, default=400, help="MeZO steps")
    p.add_argument("--eval_steps", type=int, default=50, help="MeZO: score dev every N steps, keep the best")
    p.add_argument("--num_eval", type=int, default=200, help="eval examples (validation split), for every method")
    p.add_argument("--num_dev", type=int, default=100, help="MeZO dev examples (from the train split)")
    p.add_argument("--num_train", type=int, default=1000, help="MeZO train examples")
    p.add_argument("--num_demos", type=int, default=4, help="ICL demonstrations")
    p.add_argument("--icl_pool", type=int, default=32, help="train examples the ICL demonstrations are drawn from")
    p.add_argument("--learning_rate", type=float, default=1e-5, help="MeZO learning rate")
    p.add_argument("--bp_learning_rate", type=float, default=1e-5, help="backprop (AdamW) learning rate")
    p.add_argument("--zo_eps", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=16, help="MeZO batch")
    p.add_argument("--eval_batch_size", type=int, default=16, help="sequences per forward when scoring")
    p.add_argument("--max_length", type=int, default=None,
                   help="passed to train.py: prompts longer than this are cut from the left (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="train/dev sample and MeZO run seed")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix for the result files")
    p.add_argument("--render_only", action="store_true",
                   help="run nothing: rewrite the markdown table and the plot from the results JSON")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in the results file (a (task, template) run again replaces its row)")
    args = p.parse_args(argv)
    args.data_dir = Path(args.data_dir).resolve()
    return args


def results_name(args: argparse.Namespace) -> str:
    """The stem of the result files: ``fidelity`` or ``fidelity_<tag>``."""
    return "fidelity" + (f"_{args.tag}" if args.tag else "")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.render_only:
        path = Path(args.results) / f"{results_name(args)}.json"
        if not path.is_file():
            raise SystemExit(f"fidelity: error: {path} not found; nothing to render")
        data = json.loads(path.read_text())
        write_all(path.parent, path.stem, load_rows(path), data["meta"], data["meta"].get("methods", []), args)
        print(f"rendered {path.with_suffix('.md')} and {path.with_suffix('.png')}")
        return 0
    from mezo_dist.errors import ConfigError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"fidelity: error: unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "mezo" in methods and (args.steps < 1 or args.eval_steps < 1 or args.num_dev < 1):
        raise SystemExit("fidelity: error: MeZO needs --steps, --eval_steps and --num_dev >= 1")
    if args.num_eval < 1 or args.num_demos < 0:
        raise SystemExit("fidelity: error: --num_eval must be >= 1 and --num_demos >= 0")
    try:
        import matplotlib  # noqa: F401  (checked now, not after hours of runs)
    except ImportError:
        raise SystemExit("fidelity: error: the learning-curve plot needs matplotlib (pip install matplotlib)") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    templates = [t.strip() for t in args.templates.split(",") if t.strip()]
    try:
        from mezo_dist.tasks import get_task

        tasks = [get_task(t).name for t in tasks]
        plan = [(t, label, name) for t in tasks for label, name in resolve_templates(t, templates)]
    except ConfigError as e:
        raise SystemExit(f"fidelity: error: {e}") from None
    check_data(args.data_dir, tasks, methods)

    est = estimate_seconds(args, len(plan), methods)
    print(f"{len(plan)} (task, template) pairs x {len(methods)} methods; about {est / 60:.0f} min on a 2-core CPU "
          f"(SST-2-length inputs)", flush=True)
    meta = {
        "model": model_label(args.model_name_or_path), "model_name_or_path": args.model_name_or_path,
        "tasks": tasks, "templates": templates, "methods": methods,
        "steps": args.steps, "eval_steps": args.eval_steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "zo_eps": args.zo_eps, "bp_learning_rate": args.bp_learning_rate,
        "num_train": args.num_train,
        "num_dev": args.num_dev, "num_eval": args.num_eval, "num_demos": args.num_demos, "icl_pool": args.icl_pool,
        "max_length": args.max_length, "seed": args.seed, "machine": machine(),
        "estimated_2core_cpu_s": round(est), "wall_s": 0.0,
    }
    out = Path(args.results)
    name = results_name(args)
    rows: list[dict] = load_rows(out / f"{name}.json") if args.append else []
    if args.append and rows:
        old = json.loads((out / f"{name}.json").read_text())["meta"]
        meta["tasks"] = list(dict.fromkeys(old.get("tasks", []) + tasks))
        meta["wall_s_before"] = old.get("wall_s", 0.0)  # that file's total, earlier invocations included
    t_start = time.perf_counter()
    failed = 0
    est_left = est
    for task, label, template in plan:
        row: dict[str, Any] = {"task": task, "template": label, "template_name": template, "budget": budget(args),
                               "methods": {}}
        rows = [r for r in rows if (r["task"], r["template"]) != (task, label)] + [row]
        for m in methods:
            got = run_one(args, task, template, METHODS[m])
            est_left -= estimate_run_seconds(args, m)
            row["methods"][m] = got
            failed += "error" in got
            shown = got.get("error", "").splitlines()[-1:] or [_pct(got.get("score"))]
            extra = f" (best dev step {got['best_step']})" if got.get("best_step") is not None else ""
            elapsed = time.perf_counter() - t_start
            pace = elapsed / max(est - est_left, 1e-9)  # measured time over the cost model's, so far
            print(f"{task:>5} / {label:<18} {m:<9} {shown[0]}{extra}  [{got['wall_s']:.0f} s; "
                  f"about {pace * est_left / 60:.0f} min left at this pace]", flush=True)
            zs = row["methods"].get("zero_shot", {}).get("score")
            row["gain_points"] = {k: round(100 * (v["score"] - zs), 2) for k, v in row["methods"].items()
                                  if METHODS[k].trains and zs is not None and "score" in v}
            meta["wall_s"] = round(time.perf_counter() - t_start + meta.get("wall_s_before", 0.0), 1)
            write_all(out, name, rows, meta, methods, args)
    print(markdown(rows, meta, methods, args))
    print(f"results in {out}/{name}.{{json,md,png}}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
