"""Prefix tuning (peft) with MeZO: the prefix starts from the base model's own keys and values of
real tokens, MeZO moves only the prefix, both trainers run it, and the export is peft's format."""

from __future__ import annotations

import torch

from mezo_dist.cli import main


def prefix_args(**kw):
    from mezo_dist.config import PeftArguments

    return PeftArguments(prefix_tuning=True, num_prefix=3, **kw)


def test_prefix_starts_from_real_activations(tiny_models):
    from transformers import AutoModelForCausalLM

    from mezo_dist.models import apply_peft, prefix_embedding

    model = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_models["opt"]), prefix_args(prefix_init_seed=4))
    weight = prefix_embedding(model).detach()
    # The same random tokens through the base model: row t holds every layer's key and value of token t.
    ids = torch.randint(0, model.get_base_model().config.vocab_size, (1, 3), generator=torch.Generator().manual_seed(4))
    cache = model.get_base_model()(input_ids=ids, use_cache=True).past_key_values
    layer1_value = cache.layers[1].values[0]  # (heads, tokens, head_dim)
    heads, _, head_dim = layer1_value.shape
    rows = weight.view(3, -1, heads, head_dim)  # (tokens, layers x {key, value}, heads, head_dim)
    assert torch.allclose(rows[:, 3], layer1_value.permute(1, 0, 2), atol=1e-6)
    random = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_models["opt"]), prefix_args(prefix_init="random"))
    assert not torch.allclose(prefix_embedding(random), weight)


def test_mezo_and_backprop_train_only_the_prefix(tiny_models, text_file, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mezo_dist.models import apply_peft, prefix_embedding

    start = prefix_embedding(apply_peft(AutoModelForCausalLM.from_pretrained(tiny_models["opt"]), prefix_args())).detach()
    for trainer in ("zo", "regular"):
        out = tmp_path / trainer
        assert main(["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file),
                     "--prefix_tuning", "--num_prefix", "3", "--trainer", trainer, "--max_steps", "3",
                     "--learning_rate", "1e-2", "--max_length", "24", "--per_device_train_batch_size", "2",
                     "--output_dir", str(out), "--disable_tqdm", "--report_to", "none"]) == 0
        saved = load_file(str(out / "final" / "adapter_model.safetensors"))
        assert len(saved) == 1, "the export holds the prefix alone"
        (trained,) = saved.values()
        assert trained.shape == start.shape and not torch.allclose(trained, start), trainer
