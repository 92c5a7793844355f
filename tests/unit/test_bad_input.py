"""Each bad input gets one line naming the problem, before any process group starts."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from mezo_dist.cli import main
from tests.helpers import ROOT


@pytest.fixture
def files(tmp_path, tiny_models, text_file):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "notjson.jsonl").write_text('{"text": "fine"}\nthis is not json\n')
    (tmp_path / "notext.jsonl").write_text('{"sentence": "no text field"}\n')
    (tmp_path / "bad.json").write_text("{ not json")
    stage2 = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    stage2["zero_optimization"]["stage"] = 2
    (tmp_path / "stage2.json").write_text(json.dumps(stage2))
    with_opt = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    with_opt["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-5}}
    (tmp_path / "with_opt.json").write_text(json.dumps(with_opt))
    with_opt["optimizer"]["params"]["amsgrad"] = "auto"
    (tmp_path / "auto_amsgrad.json").write_text(json.dumps(with_opt))
    return {"tmp": tmp_path, "model": str(tiny_models["opt"]), "text": str(text_file)}


CASES = [
    ("unknown backend", ["--backend", "tp"], r"unknown backend 'tp'"),
    ("ds_config missing", ["--ds_config", "{tmp}/none.json"], r"ds_config .*none.json does not exist"),
    ("ds_config unreadable", ["--ds_config", "{tmp}/bad.json"], r"ds_config .*bad.json is not readable JSON"),
    ("ds_config stage 2", ["--ds_config", "{tmp}/stage2.json"], r"has ZeRO stage 2; the zero3 backend needs stage 3"),
    ("ds_config optimizer", ["--ds_config", "{tmp}/with_opt.json"], r"defines an optimizer"),
    ("zero3 without ds_config", ["--backend", "zero3"], r"zero3 backend needs --ds_config"),
    ("ds_config on fsdp", ["--backend", "fsdp", "--ds_config", "ds_configs/zero3.json"], r"--ds_config is for the zero3"),
    ("eps zero", ["--zo_eps", "0"], r"--zo_eps must be > 0, got 0.0"),
    ("eps negative", ["--zo_eps=-1e-3"], r"--zo_eps must be > 0"),
    ("eps nan", ["--zo_eps", "nan"], r"--zo_eps must be > 0"),
    ("batch size zero", ["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size must be >= 1"),
    ("negative lr", ["--learning_rate=-1"], r"--learning_rate must be >= 0"),
    ("train file missing", ["--train_file", "{tmp}/nope.jsonl"], r"train file .*nope.jsonl does not exist"),
    ("train file empty", ["--train_file", "{tmp}/empty.jsonl"], r"train file .*empty.jsonl is empty"),
    ("train file not jsonl", ["--train_file", "{tmp}/notjson.jsonl"], r"is not JSON Lines: line 2"),
    ("train file no text", ["--train_file", "{tmp}/notext.jsonl"], r'line 1 has no string "text" field'),
    ("model path missing", ["--model_name_or_path", "{tmp}/no_model"], r"model path .*no_model does not exist"),
    ("model folder without config", ["--model_name_or_path", "{tmp}"], r"has no config.json"),
    ("unknown schedule", ["--lr_scheduler_type", "cosine_warm"], r"unknown --lr_scheduler_type 'cosine_warm'"),
    ("unknown flag", ["--learning_rat", "1"], r"unrecognized arguments: --learning_rat"),
    ("unknown trainer", ["--trainer", "adam"], r"unknown --trainer 'adam'; choose one of zo, regular"),
    ("unknown optim", ["--trainer", "regular", "--optim", "lion"], r"unknown --optim 'lion'"),
    ("directions zero", ["--zo_num_directions", "0"], r"--zo_num_directions must be >= 1"),
    ("directions with backprop", ["--trainer", "regular", "--zo_num_directions", "2"], r"--zo_num_directions is a MeZO setting"),
    ("accumulation zero", ["--gradient_accumulation_steps", "0"], r"--gradient_accumulation_steps must be >= 1"),
    ("beta out of range", ["--trainer", "regular", "--adam_beta2", "1.0"], r"--adam_beta2 must be in \[0, 1\)"),
    ("backprop resume", ["--trainer", "regular", "--resume_from_checkpoint", "{tmp}"], r"would also need the optimizer state"),
    ("backprop without ds optimizer", ["--trainer", "regular", "--ds_config", "ds_configs/zero3.json"],
     r"has no optimizer section; --trainer regular needs one"),
    ("backprop optimizer mismatch", ["--trainer", "regular", "--optim", "sgd", "--ds_config", "ds_configs/zero3_adamw.json"],
     r"has optimizer adamw; --optim is sgd"),
    ("backprop non_diff", ["--trainer", "regular", "--task_name", "SST2", "--non_diff"], r"--non_diff needs --trainer zo"),
    ("backprop auto field unfillable", ["--trainer", "regular", "--ds_config", "{tmp}/auto_amsgrad.json"],
     r"optimizer params amsgrad are 'auto', but only lr, betas, eps, weight_decay, momentum are filled"),
    ("backprop fp16 without loss scaling", ["--trainer", "regular", "--precision", "fp16"],
     r"--precision fp16 needs loss scaling, which only the zero3 backend's engine does"),
    ("negative grad norm", ["--trainer", "regular", "--max_grad_norm=-1"], r"--max_grad_norm must be >= 0"),
    ("unknown prefix init", ["--prefix_tuning", "--prefix_init", "zeros"], r"unknown --prefix_init 'zeros'"),
    ("lora rank zero", ["--lora", "--lora_r", "0"], r"--lora_r must be >= 1"),
    ("lora and prefix", ["--lora", "--prefix_tuning"], r"--lora and --prefix_tuning are exclusive"),
    ("prefix length zero", ["--prefix_tuning", "--num_prefix", "0"], r"--num_prefix must be >= 1"),
    ("unknown perturbation", ["--zo_perturbation", "uniform"], r"unknown --zo_perturbation 'uniform'"),
    ("unknown zo optimizer", ["--zo_optimizer", "adam"], r"unknown --zo_optimizer 'adam'; choose one of mezo, fzoo"),
    ("zo optimizer with backprop", ["--trainer", "regular", "--zo_optimizer", "fzoo"],
     r"--zo_optimizer fzoo is a zeroth-order setting"),
    ("fzoo one direction", ["--zo_optimizer", "fzoo", "--zo_num_directions", "1"],
     r"--zo_optimizer fzoo needs --zo_num_directions >= 2"),
    ("adamezo several directions", ["--zo_optimizer", "adamezo", "--zo_num_directions", "2"],
     r"--zo_optimizer adamezo takes one direction per step"),
    ("sparsity one", ["--zo_optimizer", "sparse", "--zo_sparsity", "1.0"],
     r"--zo_sparsity must be in \[0, 1\), got 1.0"),
    ("sparse refresh negative", ["--zo_sparse_refresh=-1"], r"--zo_sparse_refresh must be >= 0"),
    ("zo beta out of range", ["--zo_optimizer", "adamezo", "--zo_beta1", "1"], r"--zo_beta1 must be in \[0, 1\)"),
    ("zo history zero", ["--zo_history", "0"], r"--zo_history must be >= 1, got 0"),
    ("zo adam eps zero", ["--zo_adam_eps", "0"], r"--zo_adam_eps must be > 0"),
    ("unknown kernel", ["--zo_kernel", "cuda"], r"unknown --zo_kernel 'cuda'; choose one of auto, blocks, triton"),
    ("unknown precision", ["--precision", "fp8"], r"unknown --precision 'fp8'"),
    ("precision contradicts dtype", ["--torch_dtype", "bfloat16", "--precision", "fp16"],
     r"--precision fp16 contradicts --torch_dtype bfloat16"),
    ("fp32 compute of bf16 values", ["--torch_dtype", "float16", "--precision", "fp32"],
     r"--precision fp32 contradicts --torch_dtype float16"),
    ("unknown task", ["--task_name", "imdb"], r"unknown task 'imdb'"),
    ("task with train_file", ["--task_name", "SST2"], r"--train_file .* and --task_name are exclusive"),
    ("non_diff objective mismatch", ["--task_name", "SST2", "--non_diff", "--objective", "f1"],
     r"--objective f1 does not fit task SST2"),
]


@pytest.mark.parametrize("flags,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line(files, flags, pattern, capsys, tmp_path):
    base = {"--model_name_or_path": files["model"], "--train_file": files["text"],
            "--output_dir": str(tmp_path / "out"), "--max_steps": "1"}
    flags = [f.format(tmp=files["tmp"]) for f in flags]
    for flag in flags:
        base.pop(flag.split("=")[0], None)
    argv = [x for kv in base.items() for x in kv] + flags
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mezo_dist: error: "), err
    import re

    assert re.search(pattern, err[0]), err[0]
    assert not dist.is_initialized()
    assert not (tmp_path / "out").exists(), "nothing may be written for bad input"


# -- checkpoints, output folders and the seed log --------------------------------------------

@pytest.fixture
def trained(tmp_path, tiny_models, text_file):
    """A finished 2-step run with a checkpoint at each step."""
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file), "--output_dir", str(out),
            "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "16",
            "--disable_tqdm", "--report_to", "none"]
    assert main(argv) == 0
    return {"out": out, "argv": argv, "llama": str(tiny_models["llama"])}


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CKPT_CASES = [
    ("resume path missing", lambda t: ["--resume_from_checkpoint", str(t["out"] / "checkpoint-9")], None,
     r"checkpoint .*checkpoint-9 does not exist"),
    ("checkpoint truncated", lambda t: ["--resume_from_checkpoint", str(t["out"] / "checkpoint-1")],
     lambda t: truncate(t["out"] / "checkpoint-1" / "rank-00000.safetensors"), r"is truncated: rank-00000.safetensors"),
    ("checkpoint without index", lambda t: ["--resume_from_checkpoint", str(t["out"] / "checkpoint-1")],
     lambda t: (t["out"] / "checkpoint-1" / "index.json").unlink(), r"is incomplete: index.json is missing"),
    ("checkpoint of another config", lambda t: ["--resume_from_checkpoint", "latest", "--zo_eps", "0.002"], None,
     r"was written with zo_eps=0.001; this run has 0.002"),
    ("checkpoint of another batch", lambda t: ["--resume_from_checkpoint", "latest", "--per_device_train_batch_size", "3"],
     None, r"was written with global_batch=2; this run has 3"),
    ("checkpoint of another model", lambda t: ["--resume_from_checkpoint", "latest", "--model_name_or_path", t["llama"]],
     None, r"is from another model: parameter model.decoder"),
    ("checkpoint past max_steps", lambda t: ["--resume_from_checkpoint", "latest", "--max_steps", "1"], None,
     r"is at step 2, past --max_steps 1"),
    ("output_dir holds a run", lambda t: [], None, r"already holds a run; pass --resume_from_checkpoint latest"),
]


@pytest.mark.parametrize("flags,damage,pattern", [c[1:] for c in CKPT_CASES], ids=[c[0] for c in CKPT_CASES])
def test_bad_checkpoint_gets_one_line_and_nothing_is_overwritten(trained, flags, damage, pattern, capsys):
    import re

    if damage:
        damage(trained)
    before = snapshot(trained["out"])
    capsys.readouterr()
    argv = list(trained["argv"])
    extra = flags(trained)
    for flag in extra[::2]:
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mezo_dist: error: ") and re.search(pattern, err[-1]), err
    assert not any("Traceback" in line for line in err)
    assert snapshot(trained["out"]) == before, "a refused run changed the output folder"


REPLAY_CASES = [
    ("trajectory missing", lambda t: str(t["out"] / "nope.jsonl"), r"trajectory .*nope.jsonl does not exist"),
    ("trajectory gap", lambda t: _write(t, '{"step": 1, "seed": 1, "projected_grad": 0.1, "lr": 0.1, "eps": 0.001, "wd": 0}'),
     r"is step 1, expected 0"),
    ("trajectory old format", lambda t: _write(t, '{"step": 0, "seed": 1, "projected_grad": 0.1, "lr": 0.1}'),
     r"line 1 lacks eps, wd"),
    ("trajectory unknown optimizer", lambda t: _write(t, _ROW + ', "optimizer": "lion"}'),
     r"line 1 has unknown optimizer 'lion'"),
    ("trajectory fzoo without sigma",
     lambda t: _write(t, _ROW + ', "optimizer": "fzoo", "directions": [[1, 0.1], [2, 0.2]]}'),
     r"line 1 lacks sigma \(fzoo\)"),
    ("trajectory changes optimizer", lambda t: _write(t, _ROW + "}\n" + _ROW.replace('"step": 0', '"step": 1')
                                                      + ', "optimizer": "adamezo", "beta1": 0.9, "beta2": 0.99, '
                                                      '"history": 8, "adam_eps": 1e-8}'),
     r"line 2 changes optimizer mid-run"),
]


_ROW = '{"step": 0, "seed": 1, "projected_grad": 0.1, "lr": 0.1, "eps": 0.001, "wd": 0'


def _write(t, line):
    path = t["out"] / "bad.jsonl"
    path.write_text(line + "\n")
    return str(path)


@pytest.mark.parametrize("trajectory,pattern", [c[1:] for c in REPLAY_CASES], ids=[c[0] for c in REPLAY_CASES])
def test_bad_replay_input_gets_one_line(trained, trajectory, pattern, capsys, tmp_path):
    import re

    from mezo_dist.replay import main as replay_main

    code = replay_main(["--model_name_or_path", trained["argv"][1], "--trajectory", trajectory(trained),
                        "--output_dir", str(tmp_path / "rebuilt")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err
    assert not (tmp_path / "rebuilt").exists()


def test_triton_kernel_without_cuda_or_interpreter_gets_one_line(files, capsys, tmp_path, monkeypatch):
    from mezo_dist.zo import passes

    if passes.triton_available():
        pytest.skip("CUDA and triton are present: --zo_kernel triton is valid here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["--model_name_or_path", files["model"], "--train_file", files["text"], "--output_dir",
            str(tmp_path / "out"), "--max_steps", "1", "--zo_kernel", "triton"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mezo_dist: error: --zo_kernel triton needs a CUDA device and the triton package (or "
                   "TRITON_INTERPRET=1 for Triton's interpreter)"]
    assert not (tmp_path / "out").exists()
