"""What a forward computes is what is read, and the numbers stay those of the reference
(``mezo_dist.scoring_reference``: one sequence per candidate, full logits, one context at a time
without a key/value cache).

* Samples whose candidates are single tokens after one prefix are one sequence, scored from the
  logits at the answer position; other candidates are a sequence each.
* The vocabulary head runs only at the positions read (``logits_to_keep``; hooks for RoBERTa).
* Greedy decoding is batched, left-padded and cached, and keeps the reference's tokens.

Models: tiny random ones with SmolLM2's tokenizer (single-token verbalizers; a causal and a masked
LM) and the character-level OPT (every candidate is several tokens).
"""

from __future__ import annotations

import pytest
import torch

from mezo_dist import scoring
from mezo_dist import scoring_reference as ref
from mezo_dist.encoding import BatchShape, candidate_groups, encode_groups, encoded_shape
from mezo_dist.tasks.base import Sample
from tests.scoring_cases import REAL_TASKS, SINGLE_TOKEN, task_samples

MAX_LENGTH = 128
CANDIDATE_TASKS = [t for t in REAL_TASKS if t != "SQuAD"] + ["SNLI/question", "MNLI/question", "ReCoRD"]


@pytest.fixture(scope="module")
def models(bpe_models, tiny_models):
    from mezo_dist.models import is_masked_lm, load_config, load_pretrained, load_tokenizer

    out = {}
    for name, path in (("llama", bpe_models["llama"]), ("roberta", bpe_models["roberta"]), ("opt", tiny_models["opt"])):
        # (model, tokenizer, whether it is a masked LM: read from its config, as a run does)
        out[name] = (load_pretrained(str(path), dtype=torch.float32).eval(), load_tokenizer(str(path)),
                     is_masked_lm(load_config(str(path))))
    assert [name for name, (_, _, masked) in out.items() if masked] == ["roberta"]
    return out


def _mean_loss(fn, model, tok, samples, **kw):
    with torch.no_grad():
        total, count = fn(model, tok, samples, device="cpu", max_length=MAX_LENGTH, **kw)
    return total.item() / count.item(), count.item()


def _check_scores(model, tok, samples, batch_size=None, *, masked_lm=False):
    mlm = {"masked_lm": masked_lm}
    got = scoring.candidate_logprobs(model, tok, samples, device="cpu", batch_size=batch_size, max_length=MAX_LENGTH,
                                     **mlm)
    want = ref.candidate_logprobs(model, tok, samples, device="cpu", batch_size=4, max_length=MAX_LENGTH, **mlm)
    assert [len(r) for r in got] == [len(s.candidates) for s in samples]
    assert max(abs(a - b) for ra, rb in zip(got, want) for a, b in zip(ra, rb)) <= 1e-5
    preds = scoring.predict(model, tok, samples, device="cpu", batch_size=batch_size, max_length=MAX_LENGTH, **mlm)
    assert preds == [max(range(len(r)), key=r.__getitem__) for r in want]
    for as_cls in (True, False):
        new = _mean_loss(scoring.candidate_loss, model, tok, samples, as_classification=as_cls, **mlm)
        old = _mean_loss(ref.candidate_loss, model, tok, samples, as_classification=as_cls, **mlm)
        assert new[1] == old[1] and abs(new[0] - old[0]) <= 1e-5, (as_cls, new, old)


@pytest.mark.parametrize("model_name", ["llama", "roberta", "opt"])
@pytest.mark.parametrize("task", CANDIDATE_TASKS)
def test_candidate_scores_and_losses_match_the_reference(task, model_name, models, real_data):
    model, tok, masked = models[model_name]
    samples = task_samples(task, real_data)
    enc = encode_groups(tok, candidate_groups(samples), MAX_LENGTH, masked_lm=masked)
    single = model_name != "opt" and task in SINGLE_TOKEN
    assert len(enc.rows) == (len(samples) if single else sum(len(s.candidates) for s in samples)), task
    _check_scores(model, tok, samples, masked_lm=masked)
    _check_scores(model, tok, samples, batch_size=3, masked_lm=masked)  # rows of one sample split across forwards


@pytest.mark.parametrize("task", ["SQuAD", "DROP"])
def test_gold_answer_loss_of_generation_tasks_matches_the_reference(task, models, real_data):
    for name in ("llama", "roberta", "opt"):
        model, tok, masked = models[name]
        samples = task_samples(task, real_data)
        new = _mean_loss(scoring.candidate_loss, model, tok, samples, as_classification=False, masked_lm=masked)
        old = _mean_loss(ref.candidate_loss, model, tok, samples, as_classification=False, masked_lm=masked)
        assert new[1] == old[1] and abs(new[0] - old[0]) <= 1e-5, (name, new, old)


def test_demonstrations_and_mixed_batches_match_the_reference(models, real_data):
    # ICL prompts (long contexts before each example), and one batch holding single-token samples
    # (one row) beside multi-token ones (a row per candidate).
    train = task_samples("SST2", real_data, n=16)
    demos = scoring.demonstrations(train, 2, seed=0)
    icl = [scoring.with_demonstrations(s, demos) for s in task_samples("RTE", real_data, n=4)]
    mixed = task_samples("SST2", real_data, n=3) + task_samples("Copa", real_data, n=3) + icl
    for name in ("llama", "roberta"):
        model, tok, masked = models[name]
        assert len(encode_groups(tok, candidate_groups(mixed), MAX_LENGTH, masked_lm=masked).rows) == 3 + 6 + 4
        _check_scores(model, tok, icl, masked_lm=masked)
        _check_scores(model, tok, mixed, masked_lm=masked)


def test_padding_to_a_global_shape_changes_nothing(models, real_data):
    # A rank pads its share to the global batch's shape; the share's loss must not move.
    model, tok, _ = models["llama"]
    share = task_samples("SST2", real_data, n=4)
    whole = share + task_samples("Copa", real_data, n=4)
    for as_cls in (True, False):
        base = encoded_shape(tok, whole, as_classification=as_cls, max_length=MAX_LENGTH)
        assert base.keep > 1  # Copa's candidates are several tokens
        shape = BatchShape(base.width + 7, base.keep)
        padded = _mean_loss(scoring.candidate_loss, model, tok, share, as_classification=as_cls, pad_to=shape)
        alone = _mean_loss(scoring.candidate_loss, model, tok, share, as_classification=as_cls)
        assert padded[1] == alone[1] and abs(padded[0] - alone[0]) <= 1e-5
    calls = []

    def counting(**batch):
        calls.append((tuple(batch["input_ids"].shape), tuple(batch["logits_to_keep"].shape)))
        return model(**batch)

    with torch.no_grad():
        scoring.candidate_loss(counting, tok, share, device="cpu", as_classification=True, max_length=MAX_LENGTH,
                               pad_to=BatchShape(40, 3))
    # One forward of one row per sample, at the shape it was asked for.
    assert calls == [((4, 40), (4, 3))]


@pytest.mark.parametrize("task", ["SST2", "Copa"])
def test_gradients_match_the_reference(task, models, real_data):
    # The backprop baseline differentiates the same loss.
    model, tok, _ = models["llama"]
    samples = task_samples(task, real_data, n=4)
    grads = []
    for fn in (scoring.candidate_loss, ref.candidate_loss):
        model.zero_grad(set_to_none=True)
        total, count = fn(model, tok, samples, device="cpu", as_classification=True, max_length=MAX_LENGTH)
        (total / count).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "roberta"])
def test_logits_are_computed_where_read_and_only_when_asked(name, models):
    from mezo_dist.logits import kept_logits, support_logits_to_keep

    model, tok, _ = models[name]
    support_logits_to_keep(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    positions = torch.tensor([[0, 5], [16, 16], [7, 2]])
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: head_rows.append(a[0].shape[:2]))
    try:
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits
            kept = kept_logits(model, ids, mask, positions)
            last = kept_logits(model, ids, mask, 2)
            again = model(input_ids=ids, attention_mask=mask).logits  # the selection does not linger
    finally:
        hook.remove()
    torch.testing.assert_close(kept, torch.take_along_dim(full, positions[..., None], dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(last, full[:, -2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(again, full, atol=0, rtol=0)
    assert head_rows == [(3, 17), (3, 2), (3, 2), (3, 17)]


# ---------------------------------------------------------------------------------------- generation
def _eos_sometimes(model, eos: int):
    """The model, with EOS made the greedy choice wherever the top token's id is a multiple of 7:
    a function of each position's logits alone, so both decoders see the same rule."""
    def forward(**batch):
        out = model(**batch)
        top = out.logits.argmax(-1, keepdim=True)
        boost = torch.where(top % 7 == 0, out.logits.max(-1, keepdim=True).values + 1.0,
                            out.logits[..., eos:eos + 1])
        out.logits[..., eos:eos + 1] = boost
        return out

    return forward


@pytest.mark.parametrize("stop", ["\n", "ing", None])
@pytest.mark.parametrize("name,max_length", [("llama", None), ("llama", 64), ("opt", 200)])
def test_greedy_decoding_keeps_the_reference_tokens(stop, name, max_length, models, real_data):
    # max_length 64 cuts SQuAD prompts from the left; the character-level OPT needs 200 for its
    # 256 positions.
    contexts = [s.context for s in task_samples("SQuAD", real_data, n=10) + task_samples("DROP", real_data)]
    model, tok, _ = models[name]
    kw = dict(device="cpu", max_new_tokens=12, stop=stop, max_length=max_length)
    for forward in (model, _eos_sometimes(model, tok.eos_token_id)):
        want = ref.greedy_generate(forward, tok, contexts, **kw)
        for batch_size, cache in ((4, True), (None, True), (1, True), (5, False)):
            ids = scoring.greedy_generate_ids(forward, tok, contexts, batch_size=batch_size, use_cache=cache, **kw)
            assert ids == [i for i, _ in want], (batch_size, cache)
        assert scoring.greedy_generate(forward, tok, contexts, batch_size=4, **kw) == [t for _, t in want]
    if name == "llama":  # the character-level OPT repeats one token; the wider llama wanders
        # With EOS in play, decoding ended at different steps.
        assert len({len(i) for i, _ in want}) > 1


def test_a_batch_runs_as_many_forwards_as_its_longest_answer(models, real_data):
    model, tok, _ = models["llama"]
    forward = _eos_sometimes(model, tok.eos_token_id)
    contexts = [s.context for s in task_samples("SQuAD", real_data, n=8)]
    want = ref.greedy_generate(forward, tok, contexts, device="cpu", max_new_tokens=10, stop="ing")
    # A context needs one forward per kept token, plus one for the token that ended it early.
    need = {c: len(i) + (len(i) < 10) for c, (i, _) in zip(contexts, want)}
    assert len(set(need.values())) > 1
    calls = []

    def counting(**batch):
        calls.append(tuple(batch["input_ids"].shape))
        return forward(**batch)

    scoring.greedy_generate_ids(counting, tok, contexts, device="cpu", max_new_tokens=10, stop="ing", batch_size=3)
    # Contexts are batched longest first; the first call of a batch reads the prompts, the rest one token a row.
    order = sorted(contexts, key=lambda c: -len(tok(c)["input_ids"]))
    batches = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert len(calls) == sum(max(need[c] for c in b) for b in batches)
    assert sum(1 for shape in calls if shape[1] > 1) == len(batches)


def test_prefix_tuned_model_decodes_without_a_cache_and_keeps_the_reference_tokens(bpe_models, real_data):
    from peft import PrefixTuningConfig, get_peft_model

    from mezo_dist.generation import supports_kv_cache
    from mezo_dist.models import load_pretrained, load_tokenizer

    path = str(bpe_models["llama"])
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    model = get_peft_model(load_pretrained(path, dtype=torch.float32),
                           PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        model.prompt_encoder[model.active_adapter].embedding.weight.normal_(0, 1.0)
    assert not supports_kv_cache(model) and supports_kv_cache(model.get_base_model())
    contexts = [s.context for s in task_samples("SQuAD", real_data, n=6)]
    want = ref.greedy_generate(model, tok, contexts, device="cpu", max_new_tokens=8, stop=None)
    got = scoring.greedy_generate_ids(model, tok, contexts, device="cpu", max_new_tokens=8, stop=None, batch_size=3)
    assert got == [i for i, _ in want]


def test_generation_refuses_what_it_refused_before(models):
    model, tok, masked = models["roberta"]
    with pytest.raises(ValueError, match="needs a causal LM"):
        scoring.greedy_generate(model, tok, ["Answer:"], device="cpu", masked_lm=masked)
    model, tok, _ = models["llama"]
    with pytest.raises(ValueError, match="leaves no room"):
        scoring.greedy_generate(model, tok, ["Answer:"], device="cpu", max_new_tokens=8, max_length=8)
    with pytest.raises(ValueError, match="batch_size"):
        scoring.greedy_generate(model, tok, ["Answer:"], device="cpu", batch_size=0)
    gen = Sample(context="Q?\nAnswer:", candidates=[], gold=-1, answers=["x"])
    with pytest.raises(ValueError, match="no candidates"):
        scoring.candidate_logprobs(model, tok, [gen], device="cpu")


def test_non_differentiable_f1_objective_decodes_as_the_reference(bpe_models, real_data):
    # --non_diff --objective f1: minus the summed F1 of greedy answers, decoded batched and cached.
    # The gold answers are set to the reference's own answers, so each one decoded alike scores 1.
    import dataclasses

    from mezo_dist import wrap
    from mezo_dist.distributed import DistState
    from mezo_dist.metrics_text import f1
    from mezo_dist.models import load_pretrained, load_tokenizer
    from mezo_dist.objectives import TaskObjective

    path = str(bpe_models["llama"])
    model, tok = load_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path)
    state = DistState(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="")
    samples = task_samples("SQuAD", real_data, n=4) + task_samples("DROP", real_data, n=2)
    texts = [t for _, t in ref.greedy_generate(model, tok, [s.context for s in samples], device="cpu",
                                               max_new_tokens=6, max_length=MAX_LENGTH)]
    samples = [dataclasses.replace(s, answers=[t]) for s, t in zip(samples, texts)]
    assert sum(f1(t, [t]) for t in texts) == len(samples)
    objective = TaskObjective(samples, tok, micro_batch=len(samples), rank=0, world_size=1, seed=0,
                              device=torch.device("cpu"), as_classification=False, non_diff="f1",
                              max_length=MAX_LENGTH, max_new_tokens=6)
    with torch.no_grad():
        loss, count = objective.closure(wrap(model, state), 0)[0]()
    assert count.item() == len(samples) and loss.item() == -len(samples)
