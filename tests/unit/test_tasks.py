"""Task registry, templates and sampling on the real task files; scoring helpers on a tiny model."""

from collections import Counter

import pytest
import torch

from mezo_dist.scoring import (
    candidate_logprobs, candidate_loss, demonstrations, evaluate, greedy_generate, greedy_generate_ids, predict,
    with_demonstrations,
)
from mezo_dist.tasks import TASK_NAMES, Sample, get_task

# Tasks with local files, and the splits each has there.
LOCAL = {
    "SST2": ("train", "validation"), "SST5": ("train", "validation", "test"), "TREC": ("train", "test"),
    "RTE": ("train", "validation"), "CB": ("train", "validation"), "Copa": ("train", "validation"),
    "WIC": ("train", "validation"), "WSC": ("train", "validation"), "MultiRC": ("train", "validation"),
    "SNLI": ("train", "validation"), "MNLI": ("train", "validation"),
    "BoolQ": ("validation",), "SQuAD": ("validation",),
}
WITH_TRAIN = sorted(n for n, splits in LOCAL.items() if "train" in splits)


# ------------------------------------------------------------------------------------------ registry
def test_registry_names_and_case_insensitive_lookup():
    assert len(TASK_NAMES) == 16 and TASK_NAMES[-1] == "Polarity"  # the paper's 15, then the default
    for name in TASK_NAMES:
        assert get_task(name.lower()).name == name
        assert get_task(name.upper()) is get_task(name)
        assert "paper" in get_task(name).templates
    assert get_task("sst2").default_template == "review"


def test_unknown_task_is_a_one_line_value_error():
    with pytest.raises(ValueError) as e:
        get_task("imdb")
    msg = str(e.value)
    assert "\n" not in msg and "imdb" in msg
    assert all(name in msg for name in TASK_NAMES)


# -------------------------------------------------------------------------------------- real files
@pytest.mark.parametrize("name", sorted(LOCAL))
def test_every_split_and_template_builds_valid_samples(real_data, name):
    task = get_task(name)
    for split in LOCAL[name]:
        rows = task.load(split, real_data)
        assert rows, (name, split)
        for template in task.templates:
            for row in rows:
                s = task.build(row, template)
                assert s.context.strip()
                if task.kind == "generation":
                    assert s.candidates == [] and s.gold == -1 and s.answers and all(a for a in s.answers)
                else:
                    assert len(s.candidates) >= 2 and 0 <= s.gold < len(s.candidates)
                    assert s.answers == [s.candidates[s.gold]] and s.target == s.candidates[s.gold]


@pytest.mark.parametrize("name", WITH_TRAIN)
def test_sample_splits_sizes_disjointness_determinism_and_labels(real_data, name):
    task = get_task(name)
    train, dev, ev = task.sample_splits(200, 50, 100, seed=1, data_dir=real_data)
    assert (len(train), len(dev)) == (200, 50)
    assert len(ev) == min(100, len(task.load(task.eval_split, real_data)))
    # Rows are shared objects of one loaded list, so identity means "the same row of the split".
    assert not {id(s.row) for s in train} & {id(s.row) for s in dev}
    assert len({id(s.row) for s in train}) == 200
    again = task.sample_splits(200, 50, 100, seed=1, data_dir=real_data)
    assert [s.context for s in again[0]] == [s.context for s in train]
    assert [s.context for s in again[1]] == [s.context for s in dev]
    assert [s.context for s in again[2]] == [s.context for s in ev]
    other = task.sample_splits(200, 50, 100, seed=2, data_dir=real_data)
    assert [s.context for s in other[0]] != [s.context for s in train]
    assert [s.context for s in other[2]] == [s.context for s in ev]  # eval set fixed across seeds
    for samples in (train, ev):
        golds = Counter(s.gold for s in samples)
        assert len(golds) >= 2 and max(golds.values()) < 0.9 * len(samples), (name, golds)


def test_eval_only_sampling_without_a_local_train_file(real_data):
    for name in ("BoolQ", "SQuAD"):
        task = get_task(name)
        _, _, ev = task.sample_splits(0, 0, 50, seed=0, data_dir=real_data)
        assert len(ev) == 50
        with pytest.raises(ValueError) as e:
            task.sample_splits(8, 0, 50, seed=0, data_dir=real_data)
        assert str(real_data / task.task_dir / "train.jsonl") in str(e.value) and "\n" not in str(e.value)


def test_small_train_split_gives_dev_its_full_size(real_data):
    train, dev, _ = get_task("CB").sample_splits(1000, 100, 10, seed=0, data_dir=real_data)
    assert (len(train), len(dev)) == (150, 100)


def test_missing_data_folder_names_the_path(tmp_path):
    with pytest.raises(ValueError) as e:
        get_task("rte").load("train", tmp_path)
    assert str(tmp_path / "rte") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no template"):
        get_task("rte").build({"premise": "p", "hypothesis": "h", "label": 0}, "nope")


def test_schema_details_of_the_local_files(real_data):
    # MultiRC: one sample per answer option (README: 27,243 train / 4,848 validation options).
    multirc = get_task("MultiRC")
    assert len(multirc.load("train", real_data)) == 27243
    assert len(multirc.load("validation", real_data)) == 4848
    # TREC: candidates follow the local LM-BFF label ids.
    trec = get_task("TREC")
    for row in trec.load("train", real_data):
        assert trec.build(row).gold == row["label"]
    # SST-5 is evaluated on its test split, as in LM-BFF.
    assert get_task("SST5").eval_split == "test"


# ------------------------------------------------------------------------------- hand-written rows
def test_hub_and_release_schemas_build_the_same_sample():
    rte = get_task("RTE")
    a = rte.build({"premise": "A cat sat.", "hypothesis": "A cat exists.", "label": "entailment"}, "paper")
    b = rte.build({"premise": "A cat sat.", "hypothesis": "A cat exists.", "label": 0, "idx": 3}, "paper")
    assert a == b and a.candidates == ["Yes", "No"] and a.gold == 0
    wsc = get_task("WSC")
    nested = {"text": "Tom hit Bob because he was mad.", "label": True,
              "target": {"span1_text": "Tom", "span2_text": "He", "span1_index": 0, "span2_index": 4}}
    flat = {"text": nested["text"], "label": 1, **nested["target"]}
    assert wsc.build(nested) == wsc.build(flat) and wsc.build(flat).gold == 1
    assert 'pronoun "he" refer to Tom?' in wsc.build(flat).context
    # Hub TREC numbers coarse classes ABBR=0, ENTY=1, DESC=2, ...; ABBR is our candidate 2.
    assert get_task("TREC").build({"text": "What is NASA ?", "coarse_label": 0}).gold == 2
    snli = get_task("SNLI")
    assert snli.expand({"premise": "p", "hypothesis": "h", "label": -1}) == []


def test_record_from_release_and_hub_rows():
    record = get_task("ReCoRD")
    assert record.kind == "multiple_choice" and record.hub == ("super_glue", "record")
    text = "Ann met Bob in Rome.\n@highlight\nAnn travels"
    release = {"passage": {"text": text, "entities": [{"start": 0, "end": 2}, {"start": 8, "end": 10},
                                                      {"start": 15, "end": 18}, {"start": 0, "end": 2}]},
               "qas": [{"id": "q1", "query": "@placeholder was the host.",
                        "answers": [{"start": 8, "end": 10, "text": "Bob"}]}]}
    rows = record.expand(release)
    assert len(rows) == 1 and rows[0]["entities"] == ["Ann", "Bob", "Rome", "Ann"]
    s = record.build(rows[0])
    assert s.context == "Ann met Bob in Rome.\n- Ann travels\n-"
    assert s.candidates == [" Ann was the host.", " Bob was the host.", " Rome was the host."]
    assert s.gold == 1 and s.is_correct(1) and not s.is_correct(0)
    hub = {"passage": text, "query": "@placeholder was the host.", "entities": ["Ann", "Bob", "Rome"],
           "answers": ["Bob"], "idx": {"passage": 0, "query": 0}}
    assert record.build(hub) == s


def test_drop_and_squad_rows():
    drop = get_task("DROP")
    hub = {"passage": "The Bears scored 7 points.", "question": "How many points?",
           "answers_spans": {"spans": ["7", "7"], "types": ["number", "number"]}}
    s = drop.build(hub)
    assert s.context.endswith("Question: How many points?\nAnswer:") and s.answers == ["7"]
    assert s.target == " 7" and s.gold == -1
    official = {"passage": "The Bears scored 7 points on 3 May 2001.", "qa_pairs": [
        {"question": "How many?", "query_id": "a", "answer": {"number": "7", "date": {}, "spans": []}},
        {"question": "When?", "query_id": "b",
         "answer": {"number": "", "date": {"day": "3", "month": "May", "year": "2001"}, "spans": []},
         "validated_answers": [{"number": "", "date": {}, "spans": ["3 May 2001"]}]}]}
    rows = drop.expand(official)
    assert [drop.build(r).answers for r in rows] == [["7"], ["May 3 2001", "3 May 2001"]]
    squad = get_task("SQuAD")
    q = squad.build({"id": "x", "title": "Paris", "context": "Paris is in France.", "question": "Where is Paris?",
                     "answers": {"text": ["France", "France", "in France"], "answer_start": [12, 12, 9]}})
    assert q.context == "Title: Paris\nContext: Paris is in France.\nQuestion: Where is Paris?\nAnswer:"
    assert q.answers == ["France", "in France"]


def test_copa_and_sst_templates():
    copa = get_task("Copa").build({"premise": "The man fell.", "choice1": "He tripped.", "choice2": "He sang.",
                                   "question": "cause", "label": 0})
    assert copa.context == "The man fell because" and copa.candidates == [" he tripped.", " he sang."]
    sst2 = get_task("SST2")
    row = {"sentence": "a fine film ", "label": 1}
    assert sst2.build(row, "paper").context == "a fine film It was"
    assert sst2.build(row).context == "Review: a fine film\nSentiment:"
    assert sst2.build(row).target == " positive"


# ---------------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def opt(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models["opt"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()  # eval: the tiny OPT has dropout
    return model, AutoTokenizer.from_pretrained(path)


SAMPLES = [
    Sample(context="Review: fun movie\nSentiment:", candidates=[" negative", " positive"], gold=1,
           answers=[" positive"]),
    Sample(context="The man fell because", candidates=[" he tripped on a rock.", " he sang."], gold=0,
           answers=[" he tripped on a rock."]),
    Sample(context="Is it?\n", candidates=["Yes", "No", "Maybe"], gold=2, answers=["Maybe"]),
]


def test_candidate_logprobs_match_a_hand_computation(opt):
    model, tok = opt
    s = SAMPLES[1]
    got = candidate_logprobs(model, tok, [s], device="cpu")[0]
    for cand, value in zip(s.candidates, got):
        ids = tok(s.context + cand)["input_ids"]
        n_ctx = len(tok(s.context)["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        by_hand = sum(logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids))) / (len(ids) - n_ctx)
        assert value == pytest.approx(by_hand, abs=1e-5)


def test_candidate_logprobs_do_not_depend_on_batching_or_padding(tiny_models, opt):
    from transformers import AutoModelForCausalLM

    for model, tok in (opt, (AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval(), opt[1])):
        one = candidate_logprobs(model, tok, SAMPLES, device="cpu", batch_size=1)
        four = candidate_logprobs(model, tok, SAMPLES, device="cpu", batch_size=4)
        assert [len(r) for r in one] == [2, 2, 3]
        for a, b in zip(sum(one, []), sum(four, [])):
            assert a == pytest.approx(b, abs=1e-5)
        assert predict(model, tok, SAMPLES, device="cpu", batch_size=3) == [max(range(len(r)), key=r.__getitem__)
                                                                            for r in one]


def test_candidate_loss_sums_and_counts(opt):
    model, tok = opt
    with torch.no_grad():
        total, count = candidate_loss(model, tok, SAMPLES, device="cpu", as_classification=True)
    assert torch.isfinite(total) and count.item() == len(SAMPLES)
    scores = candidate_logprobs(model, tok, SAMPLES, device="cpu")
    expected = sum(-torch.log_softmax(torch.tensor(r), 0)[s.gold].item() for r, s in zip(scores, SAMPLES))
    assert total.item() == pytest.approx(expected, abs=1e-4)

    gen = Sample(context="Q: capital of France?\nAnswer:", candidates=[], gold=-1, answers=["Paris", "paris"])
    with torch.no_grad():
        total, count = candidate_loss(model, tok, [*SAMPLES, gen], device="cpu", as_classification=False,
                                      batch_size=2)
    targets = [s.target for s in [*SAMPLES, gen]]
    n_tokens = sum(len(tok(s.context + t)["input_ids"]) - len(tok(s.context)["input_ids"])
                   for s, t in zip([*SAMPLES, gen], targets))
    assert targets[-1] == " Paris" and count.item() == n_tokens
    assert torch.isfinite(total) and total.item() > 0
    with pytest.raises(ValueError):
        candidate_loss(model, tok, [gen], device="cpu", as_classification=True)
    # Gradients flow when enabled (first-order baselines).
    total, _ = candidate_loss(model, tok, SAMPLES[:1], device="cpu", as_classification=True)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_greedy_generate_stops_at_newline_and_token_limit(opt):
    model, tok = opt
    contexts = ["Q: what is 2+2?\nA:", "Hello", "abc\n"]
    outs = greedy_generate(model, tok, contexts, device="cpu", max_new_tokens=6)
    ids = greedy_generate_ids(model, tok, contexts, device="cpu", max_new_tokens=6)
    newline = tok.convert_tokens_to_ids("\n")
    assert len(outs) == 3 and all(isinstance(o, str) and "\n" not in o for o in outs)
    assert all(len(x) <= 6 and newline not in x for x in ids)
    assert all(len(x) <= 2 for x in greedy_generate_ids(model, tok, contexts, device="cpu", max_new_tokens=2))
    # Without a stop string only the token limit ends decoding (EOS aside).
    assert all(len(x) <= 4 for x in greedy_generate_ids(model, tok, contexts, device="cpu", max_new_tokens=4,
                                                         stop=None))


def test_demonstrations_and_evaluate(opt):
    model, tok = opt
    demos = demonstrations(SAMPLES, 2, seed=0)
    assert demos == demonstrations(SAMPLES, 2, seed=0) and demos.count("\n\n") == 1
    picked = [s for s in SAMPLES if s.context + s.target in demos]
    assert len(picked) == 2
    s = with_demonstrations(SAMPLES[0], demos)
    assert s.context == demos + "\n\n" + SAMPLES[0].context and s.candidates == SAMPLES[0].candidates
    assert demonstrations(SAMPLES, 0, seed=0) == "" and with_demonstrations(SAMPLES[0], "") is SAMPLES[0]
    acc = evaluate(model, tok, SAMPLES, device="cpu")["accuracy"]
    assert 0.0 <= acc <= 1.0
    gen = Sample(context="Answer:", candidates=[], gold=-1, answers=["x"])
    scores = evaluate(model, tok, [gen, gen], device="cpu", max_new_tokens=3)
    assert set(scores) == {"f1", "exact_match"}
