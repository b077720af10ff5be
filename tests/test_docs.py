"""The README and docs/ as a reader meets them: the README stays a front door (under 250 lines), every relative
link and #anchor in README.md and docs/*.md resolves, every --flag the pages name exists in some script's --help,
and the README's first run runs as written (its commands and its example jsonl, in a fresh dir) with a tiny
random SmolLM2-shaped model standing in for the one `hf download` would fetch."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sft_fixtures import REPO, env, free_port, train_bpe_tokenizer

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def prose(text: str) -> str:
    """The page without its fenced blocks (a YAML comment or a bash comment is not a heading)."""
    return FENCE.sub("", text)


def blocks(text: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(text) if kind == lang]


def commands(block: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", prose(path.read_text()), re.M)}


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move depth into docs/"
    first_train = next(i for i, line in enumerate(lines) if "train_sft.py" in line and "torchrun" in line)
    assert first_train < 60, f"the first training command is at line {first_train + 1}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page):
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{page.relative_to(REPO)}: " + "; ".join(bad)


def test_no_internal_vocabulary():
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"\bthe seed\b|\bseed's\b", text, re.I), f"{page.name}: call it 'the torchllms README'"


# -- flags ------------------------------------------------------------------------------------------------
SCRIPTS = ["train_sft.py", "train_dpo.py", "train_simpo.py", "train_grpo.py", "convert.py", "generate.py",
           "data.py", "tokenize_chat.py", "memory_plan.py", "dev/bench.py", "dev/plot.py", "dev/gpu_check.py",
           "dev/demo.py fetch", "dev/demo.py data", "dev/demo.py score"]
OUTSIDE = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",  # torchrun
           "--local-dir"}  # hf download


@pytest.fixture(scope="module")
def help_flags() -> dict[str, set[str]]:
    """Each script's flags, from its own --help (its main() in this process: torch is imported once)."""
    import contextlib
    import importlib
    import io

    flags = {}
    for s in SCRIPTS:
        path, *sub = s.split()
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            importlib.import_module(path.removesuffix(".py").replace("/", ".")).main([*sub, "--help"])
        assert exit_.value.code in (0, None), f"{s} --help failed:\n{out.getvalue()}"
        flags[s] = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", out.getvalue()))
    return flags


def script_of(cmd: str) -> tuple[str | None, list[str]]:
    """The repo script a command runs and the words after it (torchrun's own flags come before it)."""
    words = shlex.split(cmd)
    for i, w in enumerate(words):
        if w == "-m" and i + 1 < len(words) and words[i + 1].startswith("dev."):
            return words[i + 1].replace(".", "/") + ".py", words[i + 2:]
        if w.endswith(".py"):
            name = w
            if name == "dev/demo.py" and i + 1 < len(words):
                return f"{name} {words[i + 1]}", words[i + 2:]
            return name, words[i + 1:]
    return None, words


def test_commands_use_flags_that_exist(help_flags):
    """Every command in a bash block of the README or docs/ (a bare line of flags counts as a trainer's)."""
    bad = []
    for page in PAGES:
        for block in blocks(page.read_text(), "bash"):
            for cmd in commands(block):
                script, words = script_of(cmd)
                if script is None and not cmd.startswith("--"):
                    continue  # hf download, make, pip
                script = script or "train_sft.py"
                if script not in help_flags:
                    bad.append(f"{page.name}: {script} is not a script this test knows")
                    continue
                for w in words:
                    flag = w.split("=")[0]
                    if flag.startswith("--") and flag not in help_flags[script]:
                        bad.append(f"{page.name}: {script} has no {flag}")
    assert not bad, "\n".join(bad)


def test_flags_in_prose_exist(help_flags):
    """Every `--flag` the pages name anywhere is some script's (or torchrun's, or hf download's)."""
    known = set().union(*help_flags.values()) | OUTSIDE
    bad = {(page.name, f) for page in PAGES
           for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", page.read_text()) if f not in known}
    assert not bad, sorted(bad)


# -- the first run ----------------------------------------------------------------------------------------
def first_run(readme: str) -> tuple[list[str], list[str], list[str]]:
    """The section's bash commands, its example jsonl lines, and the `python ...` commands quoted in its prose."""
    section = readme.split("## Your first run", 1)[1].split("\n## ", 1)[0]
    (bash,), (jsonl,) = blocks(section, "bash"), blocks(section, "jsonl")
    inline = [" ".join(c.split()) for c in re.findall(r"`(python [^`]+)`", prose(section))]
    return commands(bash), jsonl.splitlines(), inline


def argv(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    if words[0] == "python":
        return [sys.executable, str(REPO / words[1]), *words[2:]]
    if words[0] == "torchrun":
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        return [sys.executable, "-m", "torch.distributed.run", *words[1:script], "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), str(REPO / words[script]), *words[script + 1:]]
    raise AssertionError(f"the first run has a command this test cannot run: {cmd}")


def stand_in_model(local_dir: Path):
    """What `hf download HuggingFaceTB/SmolLM2-135M-Instruct` writes, tiny: a random SmolLM2-shaped Llama
    (tied embeddings) with a small ChatML byte-level BPE tokenizer."""
    import shutil

    from tiny import hf_model, save_hf

    tok = train_bpe_tokenizer(local_dir.parent / "bpe")
    save_hf(hf_model("smollm2", vocab_size=512), local_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, local_dir / name)
    # SmolLM2's own chat template writes its default system prompt: convert.py picks smollm2_chat by it.
    (local_dir / "chat_template.jinja").write_text("{{ '<|im_start|>system\\nYou are a helpful AI assistant named "
                                                   "SmolLM, trained by Hugging Face<|im_end|>\\n' }}")


def test_first_run_runs_as_written(tmp_path):
    cmds, jsonl, inline = first_run((REPO / "README.md").read_text())
    (tmp_path / "my_data.jsonl").write_text("\n".join(jsonl) + "\n")
    run_env = {**env(), "LLM_DATA_CACHE": str(tmp_path / "cache")}
    for cmd in cmds + [c for c in inline if not c.endswith("--help")]:  # --help: test_commands_use_flags...
        if cmd.startswith("hf download"):
            stand_in_model(tmp_path / shlex.split(cmd)[shlex.split(cmd).index("--local-dir") + 1])
            continue
        chat = "--chat" in cmd
        result = subprocess.run(argv(cmd), cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300,
                                input="What is 47 + 38?\n/exit\n" if chat else None)
        assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    out = tmp_path / "outputs"
    sft = next(p for p in out.iterdir() if (p / "adapter").is_dir())
    assert (sft / "consolidated.00.pth").exists() and (sft / "adapter" / "adapter.pth").exists()
    assert (sft / "smollm2_chat.yaml").exists() and (sft / "metrics.png").exists()
    from transformers import AutoModelForCausalLM

    hf_dir = next(p for p in out.iterdir() if (p / "model.safetensors").exists())
    AutoModelForCausalLM.from_pretrained(hf_dir)
