"""The README and docs/ tell the truth: the API example runs, the launch flags they use exist, and
docs/flags.md is what ``--help`` prints."""

import re
import shlex

from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}


def code_blocks(text: str = README) -> list[tuple[str, str]]:
    """(heading above the block, block text) for each fenced block of ``text``."""
    out, heading = [], ""
    for part in re.split(r"(^```[a-z]*\n.*?^```$)", text, flags=re.S | re.M):
        if part.startswith("```"):
            out.append((heading, part.split("\n", 1)[1].rsplit("```", 1)[0]))
        else:
            heads = re.findall(r"^#+ (.+)$", part, flags=re.M)
            heading = heads[-1] if heads else heading
    return out


def test_quick_start_is_first_and_has_setup_and_test_commands():
    heading, block = code_blocks()[0]
    assert heading == "Quick start"
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2
    assert lines[0].startswith("bash scripts/setup.sh && python launch/train.py")
    ci = (ROOT / ".ci" / "run").read_text()
    assert lines[1] in ci, "CI must run the README's test command"


def test_api_example_runs(capsys):
    (block,) = [b for h, b in code_blocks() if h == "How to add MeZO to my own code"]
    exec(compile(block, "README-example", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in printed[-3:]] == ["0", "1", "2"]


def test_trainer_example_runs():
    # In a fresh interpreter, as a user runs it: Trainer starts accelerate's process state, which
    # would otherwise stay in the test session's process (its default process group included).
    import os
    import subprocess
    import sys

    (block,) = [b for h, b in code_blocks() if h == "With a Hugging Face Trainer"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    losses = eval(out.stdout.strip().splitlines()[-1])
    assert len(losses) == 3 and all(loss > 0 for loss in losses)


def test_every_train_flag_in_the_readme_exists():
    from transformers import HfArgumentParser

    from mezo_dist.config import ARG_GROUPS

    known = {a for action in HfArgumentParser(ARG_GROUPS)._actions
             for a in action.option_strings}
    used = set()
    for _, block in [b for text in (README, *DOCS.values()) for b in code_blocks(text)]:
        for line in block.replace("\\\n", " ").splitlines():  # continued lines as one
            if "launch/train.py" in line:
                tail = line.split("launch/train.py", 1)[1]
                used |= {t for t in shlex.split(tail) if t.startswith("--")}
    used |= set(re.findall(r"^\| `(--\w+)`", README, flags=re.M))
    assert used and used <= known, used - known


def test_every_shipped_ds_config_is_accepted_by_its_trainer():
    import json

    import torch

    from mezo_dist.placement.deepspeed_config import read_ds_config
    from mezo_dist.placement.deepspeed_config import check_with_deepspeed

    shipped = sorted((ROOT / "ds_configs").glob("*.json"))
    assert {p.name for p in shipped} >= {"zero3.json", "zero3_offload.json", "zero3_adamw.json",
                                         "zero3_adamw_offload.json"}
    for path in shipped:
        # A config with an optimizer section is the backprop baseline's; the others are MeZO's.
        with_optimizer = "optimizer" in json.loads(path.read_text())
        cfg = read_ds_config(str(path), with_optimizer=with_optimizer)
        assert cfg["zero_optimization"]["stage"] == 3, path.name
        # ... and by DeepSpeed's own config classes, as the start-up check runs them.
        check_with_deepspeed(cfg, str(path), micro_batch=2, accumulation=2, world_size=2, dtype=torch.bfloat16)
        assert any(path.name in text for text in (README, *DOCS.values())), f"no doc mentions {path.name}"


def test_docs_flags_is_what_help_prints():
    """Every flag of launch/train.py and launch/replay.py is in docs/flags.md, with the default and
    help text of --help (regenerate: python -m mezo_dist.flag_docs docs/flags.md)."""
    from transformers import HfArgumentParser

    from mezo_dist.config import ARG_GROUPS
    from mezo_dist.flag_docs import render
    from mezo_dist.replay import REPLAY

    doc = DOCS["flags.md"]
    flags = {s for types in (ARG_GROUPS, REPLAY.groups)
             for action in HfArgumentParser(types)._actions for s in action.option_strings
             if s.startswith("--") and "-" not in s[2:] and s != "--help"}
    missing = sorted(f for f in flags if f"`{f}`" not in doc)
    assert not missing, f"docs/flags.md lacks {', '.join(missing)}"
    assert doc == render(), "docs/flags.md differs from --help: python -m mezo_dist.flag_docs docs/flags.md"


def test_readme_links_resolve():
    links = re.findall(r"\]\(((?:docs/)[^)#]*)\)", README)
    links += [f"docs/{target}" for text in DOCS.values() for target in re.findall(r"\]\(([\w./-]+\.md)\)", text)]
    assert links and all((ROOT / link).exists() for link in links), [x for x in links if not (ROOT / x).exists()]
