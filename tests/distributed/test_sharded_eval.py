"""Task evaluation on a sharded model gives the metrics of one process.

Under FSDP2 and ZeRO-3 every forward is collective, so ranks scoring different samples must still
make the same number of forward calls; ``evaluate_task`` keeps them in step with dummy forwards
(a mismatch would hang the run, so the launch timeout is part of the test).
"""

from __future__ import annotations

import json

import pytest
import torch

from mezo_dist.distributed import DistState
from mezo_dist.errors import ConfigError
from tests.distributed.test_equivalence import zero3_config
from tests.helpers import launch

WORKER = "tests/distributed/workers/eval_worker.py"
BACKENDS = [("single", "python"), ("fsdp", "torchrun"), ("zero3", "torchrun")]


@pytest.fixture(scope="module")
def reports(tiny_models, real_data, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("sharded_eval")
    out = {}
    for backend, launcher in BACKENDS:
        path = tmp / f"{backend}.json"
        args = [backend, str(tiny_models["opt"]), str(real_data), str(path)]
        if backend == "zero3":
            args.append(zero3_config(tmp, 0))
        # A forward-count mismatch deadlocks the ranks: fail in minutes, not at the default 10.
        launch(launcher, WORKER, args, timeout=240)
        out[backend] = json.loads(path.read_text())
    return out


def test_sharded_metrics_equal_one_process(reports):
    ref = reports["single"]
    assert ref["world_size"] == 1
    assert ref["metrics"]["cls24"]["cls24_count"] == 24
    assert ref["metrics"]["cls23"]["cls23_count"] == 23
    assert ref["metrics"]["gen6"]["gen6_count"] == 6
    assert ref["metrics"]["gen5"]["gen5_count"] == 5
    for backend in ("fsdp", "zero3"):
        got = reports[backend]
        assert got["world_size"] == 2
        for name in ("cls24", "cls23"):
            assert got["metrics"][name] == ref["metrics"][name], (backend, name)
        for name in ("gen6", "gen5"):
            gen, gen_ref = got["metrics"][name], ref["metrics"][name]
            assert set(gen) == {f"{name}_f1", f"{name}_exact_match", f"{name}_count"}
            for k in gen:
                assert abs(gen[k] - gen_ref[k]) <= 1e-9, (backend, k, gen, gen_ref)


def test_rank0_predictions_match_one_process(reports):
    # A random tiny model's metrics say little (F1 is likely 0); its per-sample predictions
    # (candidate index, generated text) must also be those of one process.
    ref = reports["single"]["predictions"]
    for backend in ("fsdp", "zero3"):
        got = reports[backend]["predictions"]
        for name, n in (("cls24", 24), ("cls23", 23), ("gen6", 6), ("gen5", 5)):
            assert sorted(got[name], key=int) == [str(i) for i in range(0, n, 2)], (backend, name)
            assert {i: ref[name][i] for i in got[name]} == got[name], (backend, name)


def test_every_rank_makes_the_same_number_of_forwards(reports):
    single = reports["single"]["forwards"]
    assert all(f == [{"total": f[0]["total"], "dummy": 0}] for f in single.values()), single
    for backend in ("fsdp", "zero3"):
        fw = reports[backend]["forwards"]
        for name, per_rank in fw.items():
            assert len(per_rank) == 2
            assert per_rank[0]["total"] == per_rank[1]["total"], (backend, name, per_rank)
            # No wasted rounds: the busiest rank ran no dummy forward.
            assert min(r["dummy"] for r in per_rank) == 0, (backend, name, per_rank)
        # 23 samples x 2 candidates, 2 sequences a call: rank 0 makes 12 calls, rank 1 makes 11
        # and one dummy forward.
        assert fw["cls23"] == [{"total": 12, "dummy": 0}, {"total": 12, "dummy": 1}], (backend, fw["cls23"])
        assert fw["cls24"] == [{"total": 3, "dummy": 0}, {"total": 3, "dummy": 0}], (backend, fw["cls24"])


# ------------------------------------------------------------------------------- in-process (1 rank)
@pytest.fixture(scope="module")
def single(tiny_models):
    from mezo_dist.config import ModelArguments
    from mezo_dist.models import load_tokenizer
    from mezo_dist.placement.build import build_placement

    state = DistState(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="")
    path = str(tiny_models["opt"])
    placement = build_placement(ModelArguments(model_name_or_path=path, torch_dtype="float32"), state,
                                backend="single", ds_config=None, micro_batch=1)
    return placement, load_tokenizer(path)


def test_agrees_with_scoring_evaluate_in_one_process(single, real_data):
    from mezo_dist.evaluate import BalancedForward, evaluate_task
    from mezo_dist.scoring import evaluate
    from mezo_dist.tasks import get_task

    placement, tok = single
    sst2, squad = get_task("SST2"), get_task("SQuAD")
    cls = [sst2.build(r) for r in sst2.load("validation", data_dir=real_data)[:24]]
    gen = [squad.build(r) for r in squad.load("validation", data_dir=real_data)[:4]]

    preds: dict = {}
    got = evaluate_task(placement, tok, cls, max_length=128, predictions=preds)
    want = evaluate(placement.forward, tok, cls, device="cpu", max_length=128)
    assert got == {"eval_accuracy": want["accuracy"], "eval_count": 24}
    assert sorted(preds) == list(range(24)) and set(preds.values()) <= {0, 1}

    got = evaluate_task(placement, tok, gen, metric_prefix="dev", max_new_tokens=6, max_length=128)
    want = evaluate(placement.forward, tok, gen, device="cpu", max_new_tokens=6, max_length=128)
    assert got == {"dev_f1": want["f1"], "dev_exact_match": want["exact_match"], "dev_count": 4}

    # One process: the plain forward, no collective, no dummy forward.
    fwd = BalancedForward(placement)
    x = torch.tensor([[5, 6, 7]])
    assert torch.equal(fwd(input_ids=x).logits, placement.forward(input_ids=x).logits)
    assert fwd.finish() == 0 and fwd.calls == 1

    with pytest.raises(ConfigError):
        evaluate_task(placement, tok, [])
    with pytest.raises(ConfigError):
        evaluate_task(placement, tok, cls[:2] + gen[:1])
    with pytest.raises(ConfigError):
        evaluate_task(placement, tok, cls, batch_size=0)
