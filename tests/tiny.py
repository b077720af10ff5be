"""Tiny random Hugging Face models of every supported family, for tests that compare against transformers."""

import json
from pathlib import Path

import torch

ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# Each entry: transformers config class name and its kwargs. Sizes are tiny but keep every structural
# feature: GQA, MHA, tied/untied embeddings, q/k/v bias, head_dim != hidden/heads, llama3 rope scaling
# active (sequences in the tests are longer than original_max_position_embeddings=16).
FAMILIES = {
    "llama3": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama3.1": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=ROPE_LLAMA3)),
    "llama3.2": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True, rope_parameters={**ROPE_LLAMA3, "factor": 32.0})),
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4, rms_norm_eps=1e-5, intermediate_size=256)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, head_dim=32, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2-untied": ("Qwen2Config", dict(num_key_value_heads=1, head_dim=24)),
    "smollm2": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True, intermediate_size=96, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    # The newer families, at odd sizes: head_dim != hidden/heads (Qwen3, Gemma 3), GQA, 3 query heads per kv head.
    "qwen3": ("Qwen3Config", dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2, head_dim=20, intermediate_size=136, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3-untied": ("Qwen3Config", dict(num_key_value_heads=1, head_dim=24)),
    "olmo2": ("Olmo2Config", dict(eos_token_id=3, hidden_size=72, num_attention_heads=6, num_key_value_heads=2, intermediate_size=136, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    # Gemma 3: local layers (window 8, their own base) around global ones with linear rope scaling; tests run
    # sequences several windows long. query_pre_attn_scalar != head_dim, so the attention scale is its own.
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2, head_dim=20, intermediate_size=136, num_hidden_layers=5, query_pre_attn_scalar=18, sliding_window=8, tie_word_embeddings=True, layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"], rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
}
# Families whose norm weights (and QK-norm weights) are made random: their inits are constants (1, or 0 for
# Gemma's 1 + w), which would hide a norm weight converted in the wrong order.
RANDOM_NORMS = ("qwen3", "qwen3-untied", "olmo2", "gemma3")


def hf_config(family: str, **overrides):
    import transformers

    cls_name, kwargs = FAMILIES[family]
    base = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=512, max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False)
    return getattr(transformers, cls_name)(**{**base, **kwargs, **overrides})


def hf_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32)
    if family in RANDOM_NORMS:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def save_hf(model, path: Path, config_style: int = 5, **save_kwargs) -> Path:
    """save_pretrained, optionally rewriting config.json the way transformers 4 wrote it (rope_theta and
    rope_scaling at the top level, torch_dtype), as real Llama 3 checkpoints on the hub still are."""
    model.save_pretrained(path, **save_kwargs)
    if config_style == 4:
        cfg_path = Path(path) / "config.json"
        cfg = json.loads(cfg_path.read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = None if rope["rope_type"] == "default" else {**rope, "type": rope["rope_type"]}
        cfg["torch_dtype"] = cfg.pop("dtype")
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return Path(path)


def native_model(tmp_path: Path, family: str, seed: int = 0, **overrides):
    """A tiny HF model converted to a native dir in fp32. Returns (hf_model, native_dir)."""
    import convert

    hf = hf_model(family, seed, **overrides)
    hf_dir = save_hf(hf, tmp_path / f"{family}-hf")
    native_dir = tmp_path / f"{family}-native"
    convert.main(["--ckpt_paths", str(hf_dir), "--output_dir", str(native_dir), "--precision", "fp32"])
    return hf, native_dir


def dense_mask(segments: torch.Tensor, rows: int, width: int, window: int | None = None) -> torch.Tensor:
    """The dense reference for model.segment_attention: bool [rows, 1, T, T], True where query i may see key j.
    A query of segment (row, start, end, prefix_start, prefix_end) sees its segment's keys up to itself and
    every key of the prefix; with a window, only keys fewer than `window` positions back (the prefix's
    positions run just before the segment's). Positions in no segment see themselves only (no NaN row)."""
    mask = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1)
    for r, a, b, pa, pb in segments.tolist():
        i = torch.arange(a, b)[:, None]
        own = torch.arange(width)[None, :]
        see = (own >= a) & (own <= i)
        see |= (own >= pa) & (own < pb)
        if window:
            # the distance in positions: within the segment i - j; to the prefix (i - a) + (pb - j)
            dist = torch.where(own >= a, i - own, (i - a) + (pb - own))
            see &= dist < window
        mask[r, a:b] = see
    return mask[:, None]
