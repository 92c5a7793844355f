"""Worker for sharded-evaluation tests: task metrics on 1 process, 2-rank FSDP2 or 2-rank ZeRO-3.

Builds the placement with the project's own builders, evaluates SST2 (24 and 23 validation rows:
equal and unequal shares) and SQuAD (6 and 5 validation rows, greedy decoding) with
``mezo_dist.evaluate.evaluate_task``, and writes on rank 0 a JSON report: the metrics, rank 0's
predictions by sample index, and every rank's forward calls per evaluation (total, and how many
of them were the 1x1 balancing forwards).

Usage: eval_worker.py {single,fsdp,zero3} MODEL_DIR DATA_DIR OUT_JSON [DS_CONFIG]
"""

import json
import sys

import torch.distributed as dist


def main() -> None:
    backend, model_dir, data_dir, out = sys.argv[1:5]
    ds_config = sys.argv[5] if len(sys.argv) > 5 else None

    from mezo_dist.config import ModelArguments
    from mezo_dist.distributed import init_distributed, teardown
    from mezo_dist.evaluate import evaluate_task
    from mezo_dist.models import load_tokenizer
    from mezo_dist.tasks import get_task
    from mezo_dist.placement.build import build_placement

    state = init_distributed(use_deepspeed=backend == "zero3", need_group=backend == "fsdp")
    try:
        placement = build_placement(ModelArguments(model_name_or_path=model_dir, torch_dtype="float32"), state,
                                    backend=backend, ds_config=ds_config, micro_batch=1)
        tokenizer = load_tokenizer(model_dir)

        # Count every forward this rank makes, dummy (1x1) ones apart.
        counts = {"total": 0, "dummy": 0}
        inner = placement.forward

        def counting(**batch):
            counts["total"] += 1
            counts["dummy"] += int(tuple(batch["input_ids"].shape) == (1, 1))
            return inner(**batch)

        placement.forward = counting

        sst2, squad = get_task("SST2"), get_task("SQuAD")
        cls = [sst2.build(r) for r in sst2.load("validation", data_dir=data_dir)[:24]]
        gen = [squad.build(r) for r in squad.load("validation", data_dir=data_dir)[:6]]
        # The tiny model has 256 positions and a character tokenizer: cut prompts to 128 tokens.
        runs = {
            "cls24": dict(samples=cls, batch_size=8),
            "cls23": dict(samples=cls[:23], batch_size=2),  # 12 vs 11 forwards: balancing needed
            "gen6": dict(samples=gen, max_new_tokens=8),
            "gen5": dict(samples=gen[:5], max_new_tokens=8),  # 3 vs 2 samples: rank 1 must keep joining
        }
        report = {"backend": backend, "world_size": state.world_size, "metrics": {}, "predictions": {},
                  "forwards": {}}
        for name, kw in runs.items():
            counts.update(total=0, dummy=0)
            preds: dict = {}
            report["metrics"][name] = evaluate_task(placement, tokenizer, metric_prefix=name, max_length=128,
                                                    predictions=preds, **kw)
            report["predictions"][name] = {str(i): p for i, p in sorted(preds.items())}
            mine = dict(counts)
            if dist.is_initialized() and dist.get_world_size() > 1:
                every = [None] * dist.get_world_size()
                dist.all_gather_object(every, mine)
                # The metrics must be identical on every rank, not only on rank 0.
                metrics = [None] * dist.get_world_size()
                dist.all_gather_object(metrics, report["metrics"][name])
                assert all(m == metrics[0] for m in metrics), metrics
            else:
                every = [mine]
            report["forwards"][name] = every
        if state.is_main:
            with open(out, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        teardown()


if __name__ == "__main__":
    main()
