"""The scoring path on 2-rank FSDP2 and 2-rank ZeRO-3 (every parameter partitioned, the tied
head too) gives the reference's numbers of one process: candidate log-likelihoods and both
training losses within 1e-5, the same predictions, and the same greedy answers."""

from __future__ import annotations

import json

import pytest
import torch

from mezo_dist.metrics_text import generation_scores
from tests.distributed.test_equivalence import zero3_config
from tests.distributed.workers.scoring_worker import MAX_LENGTH, cases
from tests.helpers import launch
from tests.scoring_cases import task_samples

WORKER = "tests/distributed/workers/scoring_worker.py"


@pytest.fixture(scope="module")
def reports(bpe_models, real_data, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("sharded_scoring")
    out = {}
    for backend in ("fsdp", "zero3"):
        path = tmp / f"{backend}.json"
        args = [backend, str(bpe_models["llama"]), str(bpe_models["roberta"]), str(real_data), str(path)]
        if backend == "zero3":
            args.append(zero3_config(tmp, 0))
        launch("torchrun", WORKER, args, timeout=420)
        out[backend] = json.loads(path.read_text())
    return out


@pytest.fixture(scope="module")
def expected(bpe_models, real_data) -> dict[str, dict]:
    """One process, the reference way (one sequence per candidate, full logits, no cache)."""
    from mezo_dist import scoring_reference as ref
    from mezo_dist.models import load_pretrained, load_tokenizer

    out = {}
    for name in ("llama", "roberta"):
        path = str(bpe_models[name])
        model, tok = load_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path)
        got = {}
        for case, samples in cases(real_data).items():
            row = {"scores": ref.candidate_logprobs(model, tok, samples, device="cpu", max_length=MAX_LENGTH)}
            with torch.no_grad():
                for key, as_cls in (("loss_classification", True), ("loss_gold_tokens", False)):
                    total, count = ref.candidate_loss(model, tok, samples, device="cpu", as_classification=as_cls,
                                                      max_length=MAX_LENGTH)
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
def test_sharded_scoring_matches_the_one_process_reference(backend, reports, expected):
    report = reports[backend]
    assert report["world_size"] == 2
    for name in ("llama", "roberta"):
        got, want = report["models"][name], expected[name]
        for case in ("sst2", "copa", "mixed"):
            g, w = got[case], want[case]
            assert [len(r) for r in g["scores"]] == [len(r) for r in w["scores"]]
            worst = max(abs(a - b) for rg, rw in zip(g["scores"], w["scores"]) for a, b in zip(rg, rw))
            assert worst <= 1e-5, (name, case, worst)
            argmax = [[max(range(len(r)), key=r.__getitem__) for r in x["scores"]] for x in (g, w)]
            assert argmax[0] == argmax[1], (name, case)
            for key in ("loss_classification", "loss_gold_tokens"):
                assert abs(g[key] - w[key]) <= 1e-5, (name, case, key, g[key], w[key])
    got, want = report["models"]["llama"], expected["llama"]
    assert got["squad_predictions"] == want["squad_predictions"]
    assert got["squad"]["squad_count"] == 5
    for key in ("f1", "exact_match"):
        assert abs(got["squad"][f"squad_{key}"] - want["squad"][key]) <= 1e-9
