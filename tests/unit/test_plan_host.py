"""The planner's host-memory figures and its backprop figures against DeepSpeed's own estimator.

Host memory outside the step, as the code does it: under FSDP2 and ZeRO-3 every rank reads and
writes only its own part, one tensor in flight (on GPUs the shard itself is device memory; on CPUs
it is host memory too); ``single`` loads the whole model on every process (what ``load_pretrained``
returns, counted here on a real model). tests/distributed/test_host_memory.py measures the CPU
figures.

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


def test_single_start_up_holds_what_load_pretrained_returns(tiny_models):
    import torch

    from mezo_dist.models import load_pretrained

    folder = str(tiny_models["opt"])
    loaded = load_pretrained(folder, dtype=torch.float32).state_dict()
    # Tied weights appear twice in a state dict, once in the planner (and in memory).
    held = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in loaded.values()}.values())
    shape = plan.resolve_model(folder)
    s = plan.Setting(gpus=2, seq_len=32, batch_size=1, dtype="fp32")
    h = plan.host_io(shape, "single", s)
    assert h.startup == h.export == held
    # On CPU ranks the export's state dict is a copy beside the model itself.
    assert plan.host_io(shape, "single", s, on_cpu=True).export == 2 * held


@pytest.mark.parametrize("backend,gpus,replicas", [("fsdp", 16, 2), ("fsdp", 32, 4), ("zero3", 16, 1), ("zero3", 32, 1)])
def test_66b_host_holds_one_tensor_beside_the_shard(backend, gpus, replicas):
    shape = plan.opt_shape("66b")
    s = plan.Setting(gpus=gpus, seq_len=400, batch_size=1, dtype="fp16", runtime_overhead_bytes=2 * plan.GiB,
                     hsdp_replicas=replicas)
    h, cpu = plan.host_io(shape, backend, s), plan.host_io(shape, backend, s, on_cpu=True)
    runtime, largest = s.runtime_overhead_bytes, 2 * shape.largest_param  # the embeddings, 50272 x 9216
    ranks = gpus // replicas
    piece = 2 * -(-shape.largest_param // ranks)  # 50272 rows split 8 or 16 ways: even
    # GPUs: start-up stages one tensor's piece on the host, export one whole tensor (0.86 GiB).
    assert (h.startup, h.export, h.checkpoint) == (piece + runtime, largest + runtime, piece + runtime)
    # CPUs: the shard (and ZeRO-3's persistent parameters) plus the same, the export's twice; all
    # within a shard plus one block (from OPT-66B up; below, the embeddings outweigh a block), far
    # from the whole model (122 GiB).
    params = plan.estimate(shape, "mezo", backend, s).parameters
    made = largest if backend == "zero3" else piece  # zero.Init makes each parameter whole first
    assert (cpu.startup, cpu.export) == (params + made + runtime, params + 2 * largest + runtime)
    assert 2 * largest < 2 * shape.block_params and cpu.export < 2 * shape.params / 4


def test_cli_prints_the_host_table(capsys):
    argv = ["--model_name_or_path", "facebook/opt-66b", "--gpus", "16", "--hsdp_replicas", "2"]
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    assert "HSDP, 2 replicas of 8" in out and "Host memory per rank outside the step" in out
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.splitlines()[-4:]}
    assert set(rows) == set(plan.BACKENDS)
    assert rows["single"][0] > 120 > 1 > rows["fsdp"][1] > rows["fsdp"][0]  # the whole model vs one tensor


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
