"""The scoring path on 2-rank FSDP2 and 2-rank ZeRO-3 (every parameter partitioned, the tied
head too) gives the reference's numbers of one process: candidate log-likelihoods and both
training losses within 1e-5, the same predictions, and the same greedy answers.

For a causal and a masked LM with SmolLM2's tokenizer, each rank scores its contiguous share of a
global batch (single-token SST-2, multi-token COPA, and a batch whose halves differ: SST-2 on
rank 0, COPA on rank 1), padded to the global batch's shape as training does. The causal LM also
decodes SQuAD through ``evaluate_task`` (batched, cached, balanced across ranks).
"""

from __future__ import annotations

import pytest
import torch

from mezo_dist.metrics_text import generation_scores
from tests.distributed.test_equivalence import zero3_config
from tests.scoring_cases import task_samples

MAX_LENGTH = 128


def cases(data_dir) -> dict:
    sst2, copa = task_samples("SST2", data_dir, n=8), task_samples("Copa", data_dir, n=8)
    return {"sst2": sst2, "copa": copa, "mixed": sst2[:4] + copa[:4]}


def _score(placement, tokenizer, samples: list, masked_lm: bool) -> dict:
    import torch.distributed as dist

    from mezo_dist.encoding import encoded_shape
    from mezo_dist.scoring import candidate_logprobs, candidate_loss

    rank, world = dist.get_rank(), dist.get_world_size()
    n = len(samples) // world
    share = samples[rank * n:(rank + 1) * n]
    device = placement.state.device
    out = {}
    with torch.no_grad():
        for name, as_cls in (("loss_classification", True), ("loss_gold_tokens", False)):
            shape = encoded_shape(tokenizer, samples, as_classification=as_cls, max_length=MAX_LENGTH,
                                  masked_lm=masked_lm)
            total, count = candidate_loss(placement.forward, tokenizer, share, device=device,
                                          as_classification=as_cls, max_length=MAX_LENGTH, pad_to=shape,
                                          masked_lm=masked_lm)
            t = torch.stack([total.double(), count.double()])
            dist.all_reduce(t)
            out[name] = (t[0] / t[1]).item()
        mine = candidate_logprobs(placement.forward, tokenizer, share, device=device, batch_size=None,
                                  max_length=MAX_LENGTH, masked_lm=masked_lm)
    every = [None] * world
    dist.all_gather_object(every, mine)
    out["scores"] = [row for part in every for row in part]
    return out


def sharded_scores(state, backend: str, models: dict[str, str], data_dir: str, ds_config: str | None) -> dict:
    """On every rank of the pool: the scoring path's numbers on ``backend``."""
    import torch.distributed as dist

    from mezo_dist.config import ModelArguments
    from mezo_dist.evaluate import evaluate_task
    from mezo_dist.models import is_masked_lm, load_config, load_tokenizer
    from mezo_dist.placement.build import build_placement

    report = {}
    for name, path in models.items():
        placement = build_placement(ModelArguments(model_name_or_path=path, torch_dtype="float32"), state,
                                    backend=backend, ds_config=ds_config, micro_batch=1)
        placement.eval()
        tokenizer, masked = load_tokenizer(path), is_masked_lm(load_config(path))
        got = {case: _score(placement, tokenizer, samples, masked) for case, samples in cases(data_dir).items()}
        if name == "llama":
            squad = task_samples("SQuAD", data_dir, n=5)  # 3 and 2 contexts: ranks decode unequal shares
            preds: dict = {}
            got["squad"] = evaluate_task(placement, tokenizer, squad, metric_prefix="squad", batch_size=2,
                                         max_new_tokens=8, max_length=MAX_LENGTH, predictions=preds)
            every = [None] * state.world_size
            dist.all_gather_object(every, preds)
            got["squad_predictions"] = {str(i): p for part in every for i, p in sorted(part.items())}
        report[name] = got
        del placement
    return report


@pytest.fixture(scope="module")
def expected(bpe_models, real_data) -> dict[str, dict]:
    """One process, the reference way (one sequence per candidate, full logits, no cache)."""
    from mezo_dist import scoring_reference as ref
    from mezo_dist.models import is_masked_lm, load_config, load_pretrained, load_tokenizer

    out = {}
    for name in ("llama", "roberta"):
        path = str(bpe_models[name])
        model, tok = load_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path)
        mlm = {"masked_lm": is_masked_lm(load_config(path))}
        got = {}
        for case, samples in cases(real_data).items():
            row = {"scores": ref.candidate_logprobs(model, tok, samples, device="cpu", max_length=MAX_LENGTH, **mlm)}
            with torch.no_grad():
                for key, as_cls in (("loss_classification", True), ("loss_gold_tokens", False)):
                    total, count = ref.candidate_loss(model, tok, samples, device="cpu", as_classification=as_cls,
                                                      max_length=MAX_LENGTH, **mlm)
                    row[key] = total.item() / count.item()
            got[case] = row
        if name == "llama":
            squad = task_samples("SQuAD", real_data, n=5)
            texts = [t for _, t in ref.greedy_generate(model, tok, [s.context for s in squad], device="cpu",
                                                       max_new_tokens=8, max_length=MAX_LENGTH)]
            got["squad_predictions"] = {str(i): t for i, t in enumerate(texts)}
            got["squad"] = generation_scores(texts, [s.answers for s in squad])
        out[name] = got
    return out


@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_sharded_scoring_matches_the_one_process_reference(backend, rank_pool, bpe_models, real_data, expected,
                                                           tmp_path):
    ds_config = zero3_config(tmp_path, 0) if backend == "zero3" else None
    models = {name: str(bpe_models[name]) for name in ("llama", "roberta")}
    reports = rank_pool.run(sharded_scores, backend, models, str(real_data), ds_config)
    assert reports[0] == reports[1]  # gathered and all-reduced: every rank holds the same numbers
    for name in ("llama", "roberta"):
        got, want = reports[0][name], expected[name]
        for case in ("sst2", "copa", "mixed"):
            g, w = got[case], want[case]
            assert [len(r) for r in g["scores"]] == [len(r) for r in w["scores"]]
            worst = max(abs(a - b) for rg, rw in zip(g["scores"], w["scores"]) for a, b in zip(rg, rw))
            assert worst <= 1e-5, (name, case, worst)
            argmax = [[max(range(len(r)), key=r.__getitem__) for r in x["scores"]] for x in (g, w)]
            assert argmax[0] == argmax[1], (name, case)
            for key in ("loss_classification", "loss_gold_tokens"):
                assert abs(g[key] - w[key]) <= 1e-5, (name, case, key, g[key], w[key])
    got, want = reports[0]["llama"], expected["llama"]
    assert got["squad_predictions"] == want["squad_predictions"]
    assert got["squad"]["squad_count"] == 5
    for key in ("f1", "exact_match"):
        assert abs(got["squad"][f"squad_{key}"] - want["squad"][key]) <= 1e-9
