"""The planner's host-memory figures and its backprop figures against DeepSpeed's own estimator.

Host memory outside the step: with today's start-up and export, rank 0 holds the whole model (what
``load_pretrained`` returns, counted here on a real model), the other ranks nothing; a training
checkpoint copies each rank's own shard; the target once start-up and export read and write per-rank
slices is a shard plus one block.

DeepSpeed ships an estimator of ZeRO-3's model-state memory
(``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``). What each counts:
* model states: DeepSpeed charges 18 bytes per parameter, divided by the GPUs; the planner the
  ZeRO paper's 16 (16-bit weights and gradients, fp32 master and two moments), per tensor with
  DeepSpeed's padding, plus the persistent parameters kept whole (DeepSpeed's estimator omits them);
* the working set: DeepSpeed 4 bytes per element of the largest layer (16-bit weight and
  gradient of one gathered layer); the planner the root and two blocks gathered at once;
* activations: the planner only (DeepSpeed's estimator is of model states);
* offload: DeepSpeed gives host memory per node with a 1.5 safety factor and 18 bytes per
  parameter; the planner per rank, the 16-bit partitions plus the 12 optimizer bytes, no factor.
"""

from __future__ import annotations

import pytest

from mezo_dist import plan

GPUS_PER_NODE = 8


def test_today_start_up_holds_what_load_pretrained_returns(tiny_models):
    import torch

    from mezo_dist.models import load_pretrained

    folder = str(tiny_models["opt"])
    loaded = load_pretrained(folder, dtype=torch.float32).state_dict()
    # Tied weights appear twice in a state dict, once in the planner (and in memory).
    held = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in loaded.values()}.values())
    shape = plan.resolve_model(folder)
    for backend in ("fsdp", "zero3"):
        h = plan.host_io(shape, backend, plan.Setting(gpus=2, seq_len=32, batch_size=1, dtype="fp32"))
        assert h.startup_main == h.export_main == held and h.startup_other == h.export_other == 0


@pytest.mark.parametrize("backend,gpus,replicas", [("fsdp", 16, 2), ("fsdp", 32, 4), ("zero3", 16, 1), ("zero3", 32, 1)])
def test_66b_host_today_and_sharded(backend, gpus, replicas):
    shape = plan.opt_shape("66b")
    s = plan.Setting(gpus=gpus, seq_len=400, batch_size=1, dtype="fp16", runtime_overhead_bytes=2 * plan.GiB,
                     hsdp_replicas=replicas)
    h = plan.host_io(shape, backend, s)
    whole, runtime = 2 * shape.params, s.runtime_overhead_bytes
    shard = plan.estimate(shape, "mezo", backend, s).parameters
    if backend == "zero3":  # the persistent copies are device memory; a checkpoint writes them once (rank 0)
        shard -= 2 * plan.persistent_numel(shape)
    assert h.startup_main == h.export_main == whole + runtime  # 122 GiB on rank 0 today
    assert h.startup_other == h.export_other == runtime
    persistent = 2 * plan.persistent_numel(shape) if backend == "zero3" else 0
    assert h.checkpoint == shard + persistent + runtime
    assert h.sharded == shard + 2 * shape.block_params + runtime < whole / 4


def test_cli_prints_both_host_figures(capsys):
    argv = ["--model_name_or_path", "facebook/opt-66b", "--gpus", "16", "--hsdp_replicas", "2"]
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    assert "HSDP, 2 replicas of 8" in out and "today's code" in out and "sharded" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-4:]}
    assert set(rows) == set(plan.BACKENDS)
    assert float(rows["fsdp"][0]) > 120 > 20 > float(rows["fsdp"][-1])  # start r0 today vs the sharded target


@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize("size", ["1.3b", "13b", "66b", "175b"])
def test_backprop_against_deepspeed_estimator(size, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = plan.opt_shape(size)
    gpus = GPUS_PER_NODE * nodes
    s = plan.Setting(gpus=gpus, seq_len=400, batch_size=1, dtype="fp16")
    ours = plan.estimate(shape, "adam_full", "zero3", s)
    tensors = sum(c for _, c in shape.tensors)  # per-tensor padding: under one element each
    _, gpu, largest = estimate_zero3_model_states_mem_needs(
        shape.params, shape.largest_param, GPUS_PER_NODE, nodes, cpu_offload=False, cpu_offload_params=False)
    states = ours.parameters - 2 * plan.persistent_numel(shape) + ours.optimizer + ours.gradients
    assert abs(states - 16 * shape.params / gpus) <= 16 * tensors
    assert abs((gpu - largest) - 18 * shape.params / gpus) <= 1 and largest == 4 * shape.largest_param
    # The working sets: one layer in DeepSpeed's, the root and two blocks in the planner's.
    assert ours.gathered == 2 * (shape.root_params + 2 * shape.block_params) > largest

    off = plan.estimate(shape, "adam_full", "zero3_offload", s)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        shape.params, shape.largest_param, GPUS_PER_NODE, nodes, cpu_offload=True, cpu_offload_params=True)
    assert gpu == largest
    per_node = GPUS_PER_NODE * off.host  # 2 + 12 bytes per parameter of the node's ranks
    assert abs(per_node - 14 * shape.params / nodes) <= 14 * tensors * GPUS_PER_NODE
    assert abs(cpu - 1.5 * 18 * shape.params / nodes) <= 1
