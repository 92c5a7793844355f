"""Each bad input gets one line naming the problem, before any process group starts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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
    for name, edit in DS_EDITS.items():
        ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
        edit(ds)
        (tmp_path / f"ds_{name}.json").write_text(json.dumps(ds))
    (tmp_path / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "a \\ud800 b"}\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "afile").write_text("not a folder\n")
    for name, damage in MODEL_DAMAGE.items():
        shutil.copytree(tiny_models["opt"], tmp_path / f"model_{name}")
        damage(tmp_path / f"model_{name}")
    for name, rows in TASK_ROWS.items():
        (tmp_path / f"task_{name}" / "sst2").mkdir(parents=True)
        for split in ("train", "validation"):
            (tmp_path / f"task_{name}" / "sst2" / f"{split}.jsonl").write_text("".join(r + "\n" for r in rows))
    return {"tmp": tmp_path, "model": str(tiny_models["opt"]), "text": str(text_file)}


def _edit(**changes):
    """A ds_config edit: dotted keys set to values (None deletes)."""
    def apply(ds):
        for dotted, value in changes.items():
            *path, last = dotted.split("__")
            d = ds
            for k in path:
                d = d[k]
            d[last] = value
    return apply


DS_EDITS = {
    "zero_int": _edit(zero_optimization=3),
    "unknown_key": _edit(zero_optimization__stage3_prefetch_everything=True),
    "offload_device": _edit(zero_optimization__offload_param={"device": "gpu"}),
    "bf16_not_bool": _edit(bf16={"enabled": "sometimes"}),
    "live_params_text": _edit(zero_optimization__stage3_max_live_parameters="lots"),
    "batch_mismatch": _edit(train_batch_size=7),
    "optimizer_text": _edit(optimizer="adam"),
}


def _rewrite_json(name, edit):
    def damage(folder):
        path = folder / name
        obj = json.loads(path.read_text())
        edit(obj)
        path.write_text(json.dumps(obj))
    return damage


def _weight_index(target):
    def damage(folder):
        header = json.loads((folder / "model.safetensors").read_bytes()[8:][:int.from_bytes(
            (folder / "model.safetensors").read_bytes()[:8], "little")])
        weight_map = {k: target(folder) for k in header if k != "__metadata__"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return damage


def _truncate_file(name):
    def damage(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) - 40])
    return damage


def _header_length(folder):
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    (folder / "model.safetensors").write_bytes(bytes(data))


MODEL_DAMAGE = {
    "unknown_type": _rewrite_json("config.json", lambda c: c.update(model_type="nonesuch")),
    "config_garbled": lambda f: (f / "config.json").write_text('{"model_type": "opt",'),
    "tokenizer_garbled": lambda f: (f / "tokenizer.json").write_text("{ truncated"),
    "weights_truncated": _truncate_file("model.safetensors"),
    "header_length": _header_length,
    "index_escapes": _weight_index(lambda f: "../" + shutil.copy(f / "model.safetensors", f.parent / "x.safetensors").name),
    "index_absolute": _weight_index(lambda f: str(f / "model.safetensors")),
    "index_missing_file": _weight_index(lambda f: "model-00002-of-00002.safetensors"),
}

# Six rows: --num_train 4 --num_dev 2 samples every one of them, so the bad row is always built.
SST2_OK = ['{"sentence": "a fine film", "label": 1}', '{"sentence": "a dull film", "label": 0}'] * 3
TASK_ROWS = {
    "no_label": SST2_OK[:3] + ['{"sentence": "no label here"}'] + SST2_OK[4:],
    "unknown_field": ['{"review": "a fine film", "label": 1}'] * 6,
    "label_range": SST2_OK[:1] + ['{"sentence": "odd", "label": 7}'] + SST2_OK[2:],
    "label_type": SST2_OK[:1] + ['{"sentence": "odd", "label": "positive"}'] + SST2_OK[2:],
    "surrogate": SST2_OK[:2] + ['{"sentence": "bad \\udc80 text", "label": 1}'] + SST2_OK[3:],
    "not_object": SST2_OK[:2] + ['["a list", 1]'] + SST2_OK[3:],
}


def _missing_tracker() -> str | None:
    """One of accelerate's trackers whose package this install lacks (None: all installed)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    installed = {str(t) for t in get_available_trackers()}
    return next((name for name in LOGGER_TYPE_TO_CLASS if name not in installed), None)


_MISSING = _missing_tracker()

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
    ("unknown kernel", ["--zo_kernel", "cuda"], r"unknown --zo_kernel 'cuda'; choose one of auto, compiled, blocks, triton"),
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
    ("unknown precision", ["--precision", "fp8"], r"unknown --precision 'fp8'"),
    ("unknown tracker", ["--report_to", "tensorboard,nonesuch"],
     r"unknown --report_to 'nonesuch'; choose none, all or any of .*tensorboard"),
    *([("tracker not installed", ["--report_to", f"tensorboard,{_MISSING}"],
        rf"--report_to {_MISSING}: the {_MISSING} package is not installed")] if _MISSING else []),
    ("precision contradicts dtype", ["--torch_dtype", "bfloat16", "--precision", "fp16"],
     r"--precision fp16 contradicts --torch_dtype bfloat16"),
    ("fp32 compute of bf16 values", ["--torch_dtype", "float16", "--precision", "fp32"],
     r"--precision fp32 contradicts --torch_dtype float16"),
    ("unknown task", ["--task_name", "imdb"], r"unknown task 'imdb'"),
    ("task with train_file", ["--task_name", "SST2"], r"--train_file .* and --task_name are exclusive"),
    ("non_diff objective mismatch", ["--task_name", "SST2", "--non_diff", "--objective", "f1"],
     r"--objective f1 does not fit task SST2"),
    # finite values that cannot work
    ("eps beyond float32", ["--zo_eps", "1e300"], r"--zo_eps 1e\+300 is too large: theta \+ eps \* z .* overflows"),
    ("eps beyond float16", ["--torch_dtype", "float16", "--zo_eps", "1e4"], r"--zo_eps 10000 is too large"),
    ("eps below float32", ["--zo_eps", "1e-300"], r"--zo_eps 1e-300 is too small: .* the perturbation vanishes"),
    ("lr beyond float32", ["--learning_rate", "1e300"], r"--learning_rate 1e\+300 does not fit float32"),
    ("max_length beyond positions", ["--max_length", "100000"], r"--max_length 100000 exceeds the 256 positions"),
    ("non_diff without a task", ["--non_diff"], r"--non_diff optimises a task's metric; --train_file trains on the text"),
    # data files
    ("train file lone surrogate", ["--train_file", "{tmp}/surrogate.jsonl"], r"line 2 holds a lone surrogate \(\\ud800\)"),
    ("train file not utf-8", ["--train_file", "{tmp}/latin1.jsonl"], r"latin1.jsonl is not readable UTF-8 text"),
    # model folders
    ("model of unknown type", ["--model_name_or_path", "{tmp}/model_unknown_type"],
     r"model_unknown_type: config.json is not a model transformers can build: .*nonesuch"),
    ("model config garbled", ["--model_name_or_path", "{tmp}/model_config_garbled"], r"config.json is not readable JSON"),
    ("model tokenizer garbled", ["--model_name_or_path", "{tmp}/model_tokenizer_garbled"],
     r"tokenizer.json is not readable JSON"),
    ("model weights truncated", ["--model_name_or_path", "{tmp}/model_weights_truncated"],
     r"model.safetensors is truncated or corrupt \(its tensors need \d+ bytes, the file has \d+\)"),
    ("model header length corrupt", ["--model_name_or_path", "{tmp}/model_header_length"],
     r"model.safetensors is truncated or corrupt \(header length 1000000000000"),
    ("model weight index escapes", ["--model_name_or_path", "{tmp}/model_index_escapes"],
     r"model.safetensors.index.json names '\.\./x.safetensors', which is outside"),
    ("model weight index absolute", ["--model_name_or_path", "{tmp}/model_index_absolute"],
     r"model.safetensors.index.json names the absolute path"),
    ("model weight index missing file", ["--model_name_or_path", "{tmp}/model_index_missing_file"],
     r"names model-00002-of-00002.safetensors, which is missing"),
    # ds_configs, judged by DeepSpeed's own config classes where our reading passes
    ("ds_config zero section not an object", ["--ds_config", "{tmp}/ds_zero_int.json"],
     r"zero_optimization must be an object, got 3"),
    ("ds_config unknown zero key", ["--ds_config", "{tmp}/ds_unknown_key.json"],
     r"zero_optimization.stage3_prefetch_everything: Extra inputs are not permitted"),
    ("ds_config unknown offload device", ["--ds_config", "{tmp}/ds_offload_device.json"],
     r"zero_optimization.offload_param.device: Input should be 'none', 'cpu' or 'nvme' \(got 'gpu'\)"),
    ("ds_config bf16 not a boolean", ["--ds_config", "{tmp}/ds_bf16_not_bool.json"], r"bf16.enabled: Input should be a valid boolean"),
    ("ds_config count as text", ["--ds_config", "{tmp}/ds_live_params_text.json"],
     r"zero_optimization.stage3_max_live_parameters: Input should be a valid integer"),
    ("ds_config batch mismatch", ["--ds_config", "{tmp}/ds_batch_mismatch.json"],
     r"sets train_batch_size=7, but the run's global batch is 8 x 1 ranks x 1 = 8"),
    ("ds_config optimizer not an object", ["--trainer", "regular", "--ds_config", "{tmp}/ds_optimizer_text.json"],
     r"optimizer must be an object, got 'adam'"),
    # output paths
    ("output_dir is a file", ["--output_dir", "{tmp}/afile"], r"--output_dir .*afile is a file, not a folder"),
    ("output_dir under a file", ["--output_dir", "{tmp}/afile/run"], r"--output_dir .*afile/run cannot be made: .*afile is a file"),
    ("output_dir not writable", ["--output_dir", "/proc/1/mezo_out"], r"--output_dir /proc/1/mezo_out is not writable"),
    # task rows (checked once the process group exists, before anything is written)
    *[(f"task rows: {name.replace('_', ' ')}", ["--task_name", "SST2", "--data_dir", f"{{tmp}}/task_{name}", "--num_train", "4",
                              "--num_dev", "2", "--num_eval", "2", "--train_file", None], pattern)
      for name, pattern in (
          ("no_label", r"task SST2: .*task_no_label/sst2/train.jsonl line 4 has no field label$"),
          ("unknown_field", r"task SST2: .*task_unknown_field/sst2/train.jsonl line \d has no field sentence or text$"),
          ("label_range", r"task SST2: .*label_range/sst2/train.jsonl line 2: unexpected label 7"),
          ("label_type", r"task SST2: .*label_type/sst2/train.jsonl line 2: unexpected label 'positive'"),
          ("surrogate", r"task SST2: .*surrogate/sst2/train.jsonl line 3 holds a lone surrogate \(\\udc80\)"),
          ("not_object", r"task SST2: .*not_object/sst2/train.jsonl line 3 is not a JSON object"),
      )],
]


@pytest.mark.parametrize("flags,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line(files, flags, pattern, capsys, tmp_path):
    base = {"--model_name_or_path": files["model"], "--train_file": files["text"],
            "--output_dir": str(tmp_path / "out"), "--max_steps": "1"}
    if "/proc/1/" in " ".join(f for f in flags if f) and not os.path.isdir("/proc/1"):
        pytest.skip("needs Linux's /proc")
    for flag in flags:
        if flag is not None:
            base.pop(flag.split("=")[0], None)
    # A flag followed by None is dropped altogether (a task run has no --train_file).
    pairs = [(a, b) for a, b in zip(flags, flags[1:] + [""]) if b is None]
    flags = [f.format(tmp=files["tmp"]) for f in flags if f is not None and (f, None) not in pairs]
    argv = [x for kv in base.items() for x in kv] + flags
    before = snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mezo_dist: error: "), err
    import re

    assert re.search(pattern, err[0]), err[0]
    assert not dist.is_initialized()
    assert not (tmp_path / "out").exists(), "nothing may be written for bad input"
    assert snapshot(tmp_path) == before, "a refused run created, changed or moved a file"


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
    """Every file and folder under ``folder``, with the bytes of the files."""
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(Path(folder).rglob("*"))}


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def RESUME_1(t):
    return ["--resume_from_checkpoint", str(t["out"] / "checkpoint-1")]


def _index(t, edit):
    path = t["out"] / "checkpoint-1" / "index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def _rename_file(name):
    def edit(index):
        index["files"] = {name: size for size in index["files"].values()}
        index["sha256"] = {}
        for chunks in index["chunks"].values():
            for c in chunks:
                c[0] = name
    return edit


def _swap_chunk_keys(index):
    a, b = sorted(index["chunks"])[:2]
    index["chunks"][a], index["chunks"][b] = index["chunks"][b], index["chunks"][a]


def _state(t, edit):
    path = t["out"] / "checkpoint-1" / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # a low mantissa bit of the last parameter value
    path.write_bytes(bytes(data))


def _trajectory(t, n, edit):
    path = t["out"] / "trajectory.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[n] = edit(rows[n]) or rows[n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


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
    # paths an index names stay inside the checkpoint; its shape is checked before use
    ("checkpoint index escapes", RESUME_1, lambda t: _index(t, _rename_file("../../outside.safetensors")),
     r"index.json names '\.\./\.\./outside.safetensors', which is outside"),
    ("checkpoint index absolute path", RESUME_1, lambda t: _index(t, _rename_file(str(t["out"] / "checkpoint-2" / "rank-00000.safetensors"))),
     r"index.json names the absolute path"),
    ("checkpoint index lacks chunks", RESUME_1, lambda t: _index(t, lambda i: i.pop("chunks")),
     r"malformed index.json: it lacks 'chunks'"),
    ("checkpoint index chunk mislabelled", RESUME_1, lambda t: _index(t, _swap_chunk_keys),
     r"malformed index.json: chunk .* is not \[listed file, '<name>\|<offset>', offset, count\]"),
    ("checkpoint index size of another type", RESUME_1, lambda t: _index(t, lambda i: i["files"].update({"rank-00000.safetensors": "big"})),
     r"malformed index.json: file rank-00000.safetensors has size 'big'"),
    ("checkpoint trainer state edited", RESUME_1, lambda t: _state(t, lambda st: st.update(step=0)),
     r"checkpoint-1 is corrupt: trainer_state.json does not match its sha256"),
    ("checkpoint trainer state lacks step", RESUME_1, lambda t: (_index(t, lambda i: i.pop("sha256")), _state(t, lambda st: st.pop("step"))),
     r"malformed trainer_state.json: 'step' is 'missing', not a count"),
    # checksums: found once the model is built, still one line and nothing written
    ("checkpoint byte flipped", lambda t: ["--resume_from_checkpoint", "latest"], lambda t: _flip(t["out"] / "checkpoint-2" / "rank-00000.safetensors"),
     r"checkpoint-2 is corrupt: rank-00000.safetensors does not match its sha256"),
    ("checkpoint file swapped in", lambda t: ["--resume_from_checkpoint", "latest"],
     lambda t: shutil.copy(t["out"] / "checkpoint-1" / "rank-00000.safetensors", t["out"] / "checkpoint-2" / "rank-00000.safetensors"),
     r"checkpoint-2 is corrupt: rank-00000.safetensors does not match its sha256"),
    # the trajectory a resumed run keeps
    ("trajectory step of another type", lambda t: ["--resume_from_checkpoint", "latest"],
     lambda t: _trajectory(t, 0, lambda r: r.update(step="0")), r"trajectory .* line 1 has no integer step \(got '0'\)"),
    ("trajectory row not an object", lambda t: ["--resume_from_checkpoint", "latest"],
     lambda t: _trajectory(t, 0, lambda r: [1, 2]), r"trajectory .* line 1 has no integer step \(got None\)"),
    # what `latest` and the output folder may overwrite
    ("latest on a finished run without checkpoints", lambda t: ["--resume_from_checkpoint", "latest"],
     lambda t: [shutil.rmtree(c) for c in t["out"].glob("checkpoint-*")],
     r"holds a finished run \(final, train_results.json\) and no checkpoint to resume from; pass --overwrite_output_dir"),
    ("final is a file", lambda t: ["--overwrite_output_dir"],
     lambda t: (shutil.rmtree(t["out"] / "final"), (t["out"] / "final").write_text("mine\n")),
     r"holds final as a file; a run writes it as a folder"),
    ("output_dir is the run's trajectory", lambda t: ["--output_dir", str(t["out"] / "trajectory.jsonl")], None,
     r"--output_dir .*trajectory.jsonl is a file, not a folder"),
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
    ("trajectory row a list", lambda t: _write(t, '[0, 1, 0.1]'), r"line 1 is not a JSON object"),
    ("trajectory step a string", lambda t: _write(t, ROW.replace('"step": 0', '"step": "0"')),
     r"line 1: step is '0', not a non-negative integer"),
    ("trajectory gradient a string", lambda t: _write(t, ROW.replace('"projected_grad": 0.1', '"projected_grad": "0.1"')),
     r"line 1: projected_grad is '0.1', not a number"),
    ("trajectory eps absurd", lambda t: _write(t, ROW.replace('"eps": 0.001', '"eps": -1')),
     r"line 1: lr, eps and wd must be finite and eps > 0"),
    ("trajectory directions malformed", lambda t: _write(t, ROW.replace("}", ', "directions": [[1]]}')),
     r"line 1: directions must be a list of \[seed, projected_grad\] pairs"),
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
ROW = '{"step": 0, "seed": 1, "projected_grad": 0.1, "lr": 0.1, "eps": 0.001, "wd": 0}'


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


REPLAY_OUTPUT_CASES = [
    ("into the training run's folder", lambda t: t["out"], r"--output_dir .*run already holds a training run \(trajectory.jsonl, final"),
    ("into a file", lambda t: t["out"] / "train_results.json", r"--output_dir .*train_results.json is a file, not a folder"),
    ("into a folder of other files", lambda t: t["out"] / "final", r"--output_dir .*final already holds \d+ entries"),
]


@pytest.mark.parametrize("target,pattern", [c[1:] for c in REPLAY_OUTPUT_CASES], ids=[c[0] for c in REPLAY_OUTPUT_CASES])
def test_replay_never_replaces_what_it_did_not_make(trained, target, pattern, capsys):
    import re

    from mezo_dist.replay import main as replay_main

    before = snapshot(trained["out"])
    code = replay_main(["--model_name_or_path", trained["argv"][1], "--trajectory", str(trained["out"] / "trajectory.jsonl"),
                        "--output_dir", str(target(trained))])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err
    assert snapshot(trained["out"]) == before, "a refused replay changed the run's folder"


def test_replay_overwrites_only_when_asked(trained, tmp_path):
    from mezo_dist.replay import main as replay_main

    target = tmp_path / "rebuilt"
    target.mkdir()
    (target / "notes.txt").write_text("mine\n")
    argv = ["--model_name_or_path", trained["argv"][1], "--trajectory", str(trained["out"] / "trajectory.jsonl"),
            "--output_dir", str(target)]
    assert replay_main(argv) == 2 and (target / "notes.txt").exists()
    assert replay_main(argv + ["--overwrite_output_dir"]) == 0
    assert (target / "config.json").exists() and not (target / "notes.txt").exists()


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
