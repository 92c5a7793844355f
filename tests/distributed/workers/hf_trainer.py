"""A Hugging Face Trainer script with MeZOTrainer: the same script under python, accelerate
launch (ZeRO-3 or the FSDP config) and torchrun.

The training set is the texts in the order mezo_dist's GlobalOrder visits them for the global
batch, and Trainer samples it sequentially: every layout, and launch/train.py on the same file,
sees the same examples at every step. Every text has ``max_length`` tokens, so no row is padded.

Writes ``<output_dir>/placement.json`` (which placement the step ran on) besides Trainer's outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--texts", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global_batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--max_length", type=int, default=24)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--save_steps", type=int, default=0)
    p.add_argument("--stop_at", type=int, default=0, help="stop training after this step (an interruption)")
    p.add_argument("--resume", default=None)
    p.add_argument("--ds_config", default=None)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--zo_optimizer", default="mezo")
    return p.parse_args(argv)


def ordered_dataset(texts: list[str], tokenizer, *, max_length: int, global_batch: int, steps: int, seed: int):
    """The examples of steps 0..steps-1 in mezo_dist's order (GlobalOrder of the global batch)."""
    from mezo_dist.data import GlobalOrder

    rows = [tokenizer(t, truncation=True, max_length=max_length) for t in texts]
    assert all(len(r["input_ids"]) == max_length for r in rows), "every text must fill max_length"
    order = GlobalOrder(len(rows), micro_batch=global_batch, rank=0, world_size=1, seed=seed)
    return [dict(rows[i]) for step in range(steps) for i in order.global_indices(step)]


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    import torch

    from mezo_dist.distributed import env_world, init_distributed

    world = env_world()[1]
    accelerator_config = None
    if a.ds_config and world > 1 and not torch.cuda.is_available():
        # Without a GPU, accelerate's state sees no distributed backend for DeepSpeed (it picks
        # one per device type) and TrainingArguments would count one process: start the group on
        # gloo, configure accelerate's state on it, and tell TrainingArguments to use that state.
        from accelerate import PartialState

        init_distributed(use_deepspeed=True)
        PartialState(backend="gloo")
        accelerator_config = {"use_configured_state": True}
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainerCallback

    from mezo_dist.integrations.transformers import MeZOTrainer, MeZOTrainingArguments

    micro = a.global_batch // (world * a.accumulation)
    fsdp = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}} if a.fsdp else {}
    # TrainingArguments first: with a ZeRO-3 config, from_pretrained then builds the model partitioned.
    args = MeZOTrainingArguments(
        output_dir=a.output_dir, max_steps=a.steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=a.accumulation, learning_rate=1e-3, weight_decay=0.1, lr_scheduler_type="linear",
        zo_eps=1e-3, zo_optimizer=a.zo_optimizer, seed=a.seed, train_sampling_strategy="sequential", logging_steps=1,
        save_steps=a.save_steps or 10**9,
        save_strategy="steps" if a.save_steps else "no", report_to="none", disable_tqdm=True, deepspeed=a.ds_config,
        ddp_backend="gloo" if world > 1 else None, accelerator_config=accelerator_config,
        # Replicas on CPU ranks: accelerate counts CPU processes only when told it runs on CPU.
        use_cpu=world > 1 and not a.ds_config and not torch.cuda.is_available(), **fsdp)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    texts = [json.loads(line)["text"] for line in Path(a.texts).read_text().splitlines()]
    data = ordered_dataset(texts, tokenizer, max_length=a.max_length, global_batch=a.global_batch, steps=a.steps,
                           seed=a.seed)

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if a.stop_at and state.global_step == a.stop_at:
                control.should_training_stop = True

    trainer = MeZOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[StopAt()])
    trainer.train(resume_from_checkpoint=a.resume)
    if not a.stop_at:
        trainer.save_model(os.path.join(a.output_dir, "final"))
    if trainer.args.should_save:
        placed = {"placement": trainer._placement.name, "world_size": world,
                  "log": [h for h in trainer.state.log_history if "loss" in h]}
        Path(a.output_dir, "placement.json").write_text(json.dumps(placed))


if __name__ == "__main__":
    main()
    from mezo_dist.distributed import teardown

    teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
