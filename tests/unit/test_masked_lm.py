"""Masked LMs (the paper's RoBERTa family): a candidate is scored at mask tokens put where its
tokens go, a masked LM trains on tasks with MeZO, and what it cannot do is refused in one line."""

from __future__ import annotations

import pytest
import torch

from mezo_dist.cli import main
from mezo_dist.tasks.base import Sample


def test_candidates_are_scored_at_mask_positions(tiny_models):
    from mezo_dist.models import is_masked_lm, load_config, load_pretrained, load_tokenizer
    from mezo_dist.scoring import candidate_logprobs

    path = str(tiny_models["roberta"])
    tok = load_tokenizer(path)
    model = load_pretrained(path, dtype=torch.float32).eval()
    masked = is_masked_lm(load_config(path))
    assert masked and type(model).__name__ == "RobertaForMaskedLM"
    # The flag is passed, never stored on the tokenizer.
    assert not hasattr(tok, "mezo_masked_lm")
    sample = Sample(context="a fine film. It was", candidates=[" ok", " bad"], gold=0, answers=[" ok"])
    got = candidate_logprobs(model, tok, [sample], device="cpu", masked_lm=masked)[0]
    ctx = tok(sample.context, add_special_tokens=False)["input_ids"]
    for cand, score in zip(sample.candidates, got):
        target = tok(cand, add_special_tokens=False)["input_ids"]
        ids = [tok.cls_token_id, *ctx, *[tok.mask_token_id] * len(target), tok.sep_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        at = range(1 + len(ctx), 1 + len(ctx) + len(target))
        manual = sum(logp[p, t].item() for p, t in zip(at, target)) / len(target)
        assert score == pytest.approx(manual, abs=1e-5)


@pytest.mark.parametrize("flags,pattern", [
    (["--train_file", "{text}"], "a masked LM trains on a --task_name"),
    (["--task_name", "SQuAD"], "needs a causal LM"),
])
def test_what_a_masked_lm_cannot_do_is_refused(flags, pattern, tiny_models, text_file, tmp_path, capsys):
    flags = [f.format(text=text_file) for f in flags]
    argv = ["--model_name_or_path", str(tiny_models["roberta"]), "--output_dir", str(tmp_path / "out"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and pattern in err[0], err
