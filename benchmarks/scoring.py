"""Does a step do only the work that is scored?

SmolLM2-135M (the cached default model, fp32) on real SST-2 (the paper's template, trained as
classification, batch 16), one process. A MeZO step is timed three ways, on the same batches:

* ``project``: this project's scoring (one sequence per example when the candidates are single
  tokens, logits only at the answer position) and its own MeZO step (passes and noise as they are);
* ``reference``: the MeZO reference's way, written out here as the baseline: one sequence per
  candidate with full-vocabulary logits, and four passes over the parameters that each reseed
  the global generator and draw z per parameter with ``torch.normal`` (perturb +eps, -2 eps,
  +eps to restore, then the update), adding out of place;
* ``project_before``: the project before scoring was trimmed (one sequence per candidate, full
  logits: ``mezo_dist.scoring_reference``) with the project's own MeZO step.

Beside them: one forward of each scoring way (so a step can be read against two forwards), and
greedy SQuAD evaluation in examples per second, before (one question at a time, no key/value
cache) and after (batched, cached), on a fixed sample of real validation questions; the two
must give the same tokens.

    python benchmarks/scoring.py                   # results/scoring.{json,md,png}
    python benchmarks/scoring.py --steps 3 --squad 16

Run it alone on the machine: the ratios are of times taken in one run. The chart needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import data_dir, machine, save_figure  # noqa: E402

WAYS = ("project", "reference", "project_before")


# ------------------------------------------------------------------------------ the reference's step
def reference_pass(params: list[tuple[str, torch.nn.Parameter]], seed: int, scale: float) -> None:
    """theta += scale z, z drawn per parameter after reseeding the global generator."""
    torch.manual_seed(seed)
    for _, p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data + scale * z


def reference_step(params, loss, *, seed: int, lr: float, eps: float, weight_decay: float) -> float:
    """The reference's MeZO step: three perturbation passes, then an update that draws z again."""
    reference_pass(params, seed, eps)
    plus = loss()
    reference_pass(params, seed, -2 * eps)
    minus = loss()
    grad = (plus - minus) / (2 * eps)
    reference_pass(params, seed, eps)
    torch.manual_seed(seed)
    for name, p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        decay = weight_decay if "bias" not in name and "norm" not in name else 0.0
        p.data = p.data - lr * (grad * z + decay * p.data)
    return grad


# -------------------------------------------------------------------------------------------- timing
def median_time(fn, n: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def measure_steps(args, placement, tokenizer, train) -> dict:
    from mezo_dist import scoring_reference as ref
    from mezo_dist.objectives import TaskObjective
    from mezo_dist.scoring import candidate_loss
    from mezo_dist.zo.step import MeZO

    device = placement.state.device
    objective = TaskObjective(train, tokenizer, micro_batch=args.batch, rank=0, world_size=1, seed=args.seed,
                              device=device, as_classification=True)

    def batch(step: int):
        return [train[i] for i in objective.order.local_indices(step)]

    def before_closure(step: int):
        samples = batch(step)
        width = ref.sequence_width(tokenizer, samples, as_classification=True)

        def closure():
            total, count = ref.candidate_loss(placement.forward, tokenizer, samples, device=device,
                                              as_classification=True, pad_to=width)
            return total.double(), count.double()

        return closure

    def reference_loss(step: int):
        samples = batch(step)

        def loss() -> float:
            with torch.no_grad():
                total, count = ref.candidate_loss(placement.forward, tokenizer, samples, device=device,
                                                  as_classification=True)
            return total.item() / count.item()

        return loss

    zo = MeZO(placement, lr=args.lr, eps=args.eps, seed=args.seed)
    params = [(n, p) for n, p in placement.module.named_parameters() if p.requires_grad]
    run = {
        "project": lambda t: zo.step(objective.closure(placement, t)[0]),
        "project_before": lambda t: zo.step(before_closure(t)),
        "reference": lambda t: reference_step(params, reference_loss(t), seed=args.seed * 1000 + t, lr=args.lr,
                                              eps=args.eps, weight_decay=0.0),
    }

    # One forward of each scoring way, on the same batches.
    def forward(way: str, step: int) -> float:
        fn = candidate_loss if way == "new" else ref.candidate_loss
        with torch.no_grad():
            total, count = fn(placement.forward, tokenizer, batch(step), device=device, as_classification=True)
        return total.item() / count.item()

    times = {w: [] for w in WAYS}
    fwd = {"new": [], "old": []}
    diffs = []
    # Steps and forwards take turns, batch by batch, so that a drift of the machine's speed hits
    # every way alike.
    for t in range(args.warmup + args.steps):
        got = {}
        for way in fwd:
            t0 = time.perf_counter()
            got[way] = forward(way, t)
            if t >= args.warmup:
                fwd[way].append(time.perf_counter() - t0)
        diffs.append(abs(got["new"] - got["old"]))
        for w in WAYS:
            t0 = time.perf_counter()
            run[w](t)
            if t >= args.warmup:
                times[w].append(time.perf_counter() - t0)
        if t >= args.warmup:
            print(f"step {t}: forwards new {fwd['new'][-1]:.2f}s, old {fwd['old'][-1]:.2f}s; steps "
                  + ", ".join(f"{w} {times[w][-1]:.2f}s" for w in WAYS), flush=True)
    return {"step_s": {w: statistics.median(v) for w, v in times.items()}, "step_times": times,
            "forward_s": {w: statistics.median(v) for w, v in fwd.items()}, "forward_times": fwd,
            "loss_max_abs_diff": max(diffs)}


def measure_squad(args, model, tokenizer) -> dict:
    from mezo_dist import scoring_reference as ref
    from mezo_dist.generation import greedy_continuations
    from mezo_dist.metrics_text import generation_scores
    from mezo_dist.tasks import get_task

    task = get_task("SQuAD")
    rows = task.load("validation", data_dir=data_dir())
    picked = random.Random(args.seed).sample(range(len(rows)), args.squad)
    samples = [task.build(rows[i]) for i in picked]
    contexts = [s.context for s in samples]
    kw = dict(device="cpu", max_new_tokens=args.max_new_tokens)
    # Warm-up: the first forwards of a shape pay for allocations.
    ref.greedy_generate(model, tokenizer, contexts[:1], **kw)
    greedy_continuations(model, tokenizer, contexts[:2], batch_size=2, **kw)

    t0 = time.perf_counter()
    before = ref.greedy_generate(model, tokenizer, contexts, **kw)
    before_s = time.perf_counter() - t0
    print(f"SQuAD before: {before_s:.1f}s for {len(contexts)} questions", flush=True)
    t0 = time.perf_counter()
    after = greedy_continuations(model, tokenizer, contexts, batch_size=args.squad_batch, **kw)
    after_s = time.perf_counter() - t0
    print(f"SQuAD after: {after_s:.1f}s", flush=True)
    answers = [s.answers for s in samples]
    return {
        "questions": len(contexts), "batch_size": args.squad_batch, "max_new_tokens": args.max_new_tokens,
        "before_s": before_s, "after_s": after_s,
        "before_examples_per_s": len(contexts) / before_s, "after_examples_per_s": len(contexts) / after_s,
        "speedup": before_s / after_s,
        "identical_tokens": [ids for ids, _ in after] == [ids for ids, _ in before],
        "identical_texts": [t.strip() for _, t in after] == [t for _, t in before],
        "mean_new_tokens": statistics.mean(len(ids) for ids, _ in before),
        "f1_before": generation_scores([t for _, t in before], answers)["f1"],
        "f1_after": generation_scores([t.strip() for _, t in after], answers)["f1"],
    }


# ------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    meta, steps, squad = result["meta"], result["steps"], result["squad"]
    s, f = steps["step_s"], steps["forward_s"]
    two = {"project": 2 * f["new"], "reference": 2 * f["old"], "project_before": 2 * f["old"]}
    names = {"project": "this project (one sequence per example, logits at the answer)",
             "reference": "the reference's way (per-candidate sequences, full logits, torch.normal passes)",
             "project_before": "this project before (per-candidate sequences, full logits, own passes)"}
    lines = [
        f"# A step does only the work that is scored: {meta['model']}, SST-2 (paper template), batch {meta['batch']}",
        "",
        f"Machine: {meta['machine']}, {meta['threads']} threads; load average at start "
        f"{' / '.join(f'{x:.2f}' for x in meta['loadavg_start'])}. Medians of {meta['steps']} steps after "
        f"{meta['warmup']} warm-up, the ways (and their forwards) taking turns batch by batch; load average "
        f"at the end {' / '.join(f'{x:.2f}' for x in meta['loadavg_end'])}.",
        "",
        "| way | MeZO step (s) | two forwards (s) | step / two forwards | reference step / this step |",
        "|---|---|---|---|---|",
    ]
    for w in WAYS:
        lines.append(f"| {names[w]} | {s[w]:.3f} | {two[w]:.3f} | {s[w] / two[w]:.2f}x | "
                     f"{s['reference'] / s[w]:.2f}x |")
    lines += [
        "",
        f"* One forward: {f['new']:.3f} s scoring one sequence per example with logits at the answer, "
        f"{f['old']:.3f} s scoring each candidate with full logits ({f['old'] / f['new']:.2f}x); "
        f"their losses differ by at most {steps['loss_max_abs_diff']:.1e}.",
        f"* `speedup_vs_reference` (reference step / this project's step): {result['speedup_vs_reference']:.2f}x.",
        "",
        f"## SQuAD greedy evaluation ({squad['questions']} validation questions, up to {squad['max_new_tokens']} "
        "new tokens, stop at a newline)",
        "",
        "| decoding | time (s) | examples / s |",
        "|---|---|---|",
        f"| before: one question at a time, no key/value cache | {squad['before_s']:.1f} | "
        f"{squad['before_examples_per_s']:.3f} |",
        f"| after: batches of {squad['batch_size']}, left-padded, key/value cache | {squad['after_s']:.1f} | "
        f"{squad['after_examples_per_s']:.3f} |",
        "",
        f"* {squad['speedup']:.2f}x faster; the same tokens: {'yes' if squad['identical_tokens'] else 'NO'}; "
        f"{squad['mean_new_tokens']:.1f} new tokens per answer on average; F1 {100 * squad['f1_before']:.1f}.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, squad = result["steps"], result["squad"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    labels = ["this project", "reference's way", "project before"]
    two = [2 * steps["forward_s"]["new"], 2 * steps["forward_s"]["old"], 2 * steps["forward_s"]["old"]]
    x = range(len(WAYS))
    ax.bar([i - 0.2 for i in x], [steps["step_s"][w] for w in WAYS], width=0.4, label="MeZO step")
    ax.bar([i + 0.2 for i in x], two, width=0.4, label="two forwards")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("seconds")
    ax.set_title(f"MeZO step, SST-2 batch {result['meta']['batch']} ({result['meta']['model']})", fontsize=10)
    ax.legend()
    bx.bar(["before", "after"], [squad["before_examples_per_s"], squad["after_examples_per_s"]], color=["grey", "C2"])
    bx.set_ylabel("examples / s")
    bx.set_title(f"SQuAD greedy evaluation ({squad['speedup']:.1f}x)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per way")
    p.add_argument("--warmup", type=int, default=1)
    # 16 questions: one at a time without a cache they take about 5 minutes on 2 cores.
    p.add_argument("--squad", type=int, default=16, help="SQuAD validation questions (a fixed random sample)")
    p.add_argument("--squad_batch", type=int, default=16, help="questions decoded together after the change")
    p.add_argument("--max_new_tokens", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    loadavg = list(os.getloadavg())
    from mezo_dist.distributed import DistState
    from mezo_dist.metrics import atomic_write_text
    from mezo_dist.models import load_tokenizer
    from mezo_dist.placement.single import build_single
    from mezo_dist.tasks import get_task

    if args.model_name_or_path == "smollm2-135m":
        from mezo_dist.assets import default_model_dir

        args.model_name_or_path = str(default_model_dir())
    state = DistState(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="")
    placement = build_single(args.model_name_or_path, state, dtype=torch.float32)
    placement.eval()
    tokenizer = load_tokenizer(args.model_name_or_path)
    need = args.batch * (args.warmup + args.steps)
    train, _, _ = get_task("SST2").sample_splits(need, 0, 0, args.seed, data_dir=data_dir(), template="paper")
    steps = measure_steps(args, placement, tokenizer, train)
    squad = measure_squad(args, placement.module, tokenizer)
    result = {
        "meta": {"model": Path(args.model_name_or_path).name, "machine": machine(), "threads": torch.get_num_threads(),
                 "loadavg_start": loadavg, "loadavg_end": list(os.getloadavg()), "batch": args.batch,
                 "steps": args.steps, "warmup": args.warmup, "task": "SST2", "template": "paper",
                 "train_as_classification": True, "lr": args.lr, "eps": args.eps},
        "steps": steps,
        "speedup_vs_reference": steps["step_s"]["reference"] / steps["step_s"]["project"],
        "squad": squad,
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scoring.json", json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    atomic_write_text(out / "scoring.md", md)
    try:
        plot(result, out / "scoring.png")
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)", flush=True)
    print(md)


if __name__ == "__main__":
    main()
