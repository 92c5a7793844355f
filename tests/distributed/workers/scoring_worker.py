"""Worker for the sharded scoring test: the scoring path on 2-rank FSDP2 or 2-rank ZeRO-3.

For a causal and a masked LM with SmolLM2's tokenizer, each rank scores its contiguous share of a
global batch (single-token SST-2, multi-token COPA, and a batch whose halves differ: SST-2 on
rank 0, COPA on rank 1), padded to the global batch's shape as training does: candidate
log-likelihoods (gathered) and both training losses (all-reduced means). The causal LM also
decodes SQuAD through ``evaluate_task`` (batched, cached, balanced across ranks). Rank 0 writes a
JSON report.

Usage: scoring_worker.py {fsdp,zero3} LLAMA_DIR ROBERTA_DIR DATA_DIR OUT_JSON [DS_CONFIG]
"""

import json
import sys

import torch
import torch.distributed as dist

MAX_LENGTH = 128


def cases(data_dir: str) -> dict:
    from tests.scoring_cases import task_samples

    sst2, copa = task_samples("SST2", data_dir, n=8), task_samples("Copa", data_dir, n=8)
    return {"sst2": sst2, "copa": copa, "mixed": sst2[:4] + copa[:4]}


def score(placement, tokenizer, samples: list, rank: int, world: int) -> dict:
    from mezo_dist.encoding import encoded_shape
    from mezo_dist.scoring import candidate_logprobs, candidate_loss

    n = len(samples) // world
    share = samples[rank * n:(rank + 1) * n]
    out = {}
    with torch.no_grad():
        for name, as_cls in (("loss_classification", True), ("loss_gold_tokens", False)):
            shape = encoded_shape(tokenizer, samples, as_classification=as_cls, max_length=MAX_LENGTH)
            total, count = candidate_loss(placement.forward, tokenizer, share, device=placement.state.device,
                                          as_classification=as_cls, max_length=MAX_LENGTH, pad_to=shape)
            t = torch.stack([total.double(), count.double()])
            dist.all_reduce(t)
            out[name] = (t[0] / t[1]).item()
        mine = candidate_logprobs(placement.forward, tokenizer, share, device=placement.state.device,
                                  batch_size=None, max_length=MAX_LENGTH)
    every = [None] * world
    dist.all_gather_object(every, mine)
    out["scores"] = [row for part in every for row in part]
    return out


def main() -> None:
    backend, llama, roberta, data_dir, out = sys.argv[1:6]
    ds_config = sys.argv[6] if len(sys.argv) > 6 else None

    from mezo_dist.config import ModelArguments
    from mezo_dist.distributed import init_distributed, teardown
    from mezo_dist.evaluate import evaluate_task
    from mezo_dist.models import load_tokenizer
    from mezo_dist.train import build_placement
    from tests.scoring_cases import task_samples

    state = init_distributed(use_deepspeed=backend == "zero3", need_group=backend == "fsdp")
    try:
        report = {"backend": backend, "world_size": state.world_size, "models": {}}
        for name, path in (("llama", llama), ("roberta", roberta)):
            placement = build_placement(ModelArguments(model_name_or_path=path, torch_dtype="float32"), state,
                                        backend=backend, ds_config=ds_config, micro_batch=1)
            placement.eval()
            tokenizer = load_tokenizer(path)
            got = {case: score(placement, tokenizer, samples, state.rank, state.world_size)
                   for case, samples in cases(data_dir).items()}
            if name == "llama":
                squad = task_samples("SQuAD", data_dir, n=5)  # 3 and 2 contexts: ranks decode unequal shares
                preds: dict = {}
                got["squad"] = evaluate_task(placement, tokenizer, squad, metric_prefix="squad", batch_size=2,
                                             max_new_tokens=8, max_length=MAX_LENGTH, predictions=preds)
                every = [None] * state.world_size
                dist.all_gather_object(every, preds)
                got["squad_predictions"] = {str(i): p for part in every for i, p in sorted(part.items())}
            report["models"][name] = got
            del placement
        if state.is_main:
            with open(out, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        teardown()


if __name__ == "__main__":
    main()
