"""Convert a Hugging Face checkpoint dir to the native format (Meta's `consolidated.00.pth` + `params.json`),
and back with `--to_hf`.

    python convert.py --ckpt_paths checkpoints/llama3.1_8b_instruct --output_dir checkpoints/llama3.1_8b_instruct
    python convert.py --to_hf --ckpt_paths outputs/sft_example --output_dir outputs/sft_example_hf

One name map serves both directions. HF stores each q/k projection with its rotary pairs split into two
halves per head; Meta (and model.py) interleaves them, so q and k are permuted on the way in and back on
the way out. Conversion streams tensor by tensor, so memory stays near one input shard, and writes into a
temp dir that is renamed into place only when everything succeeded.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from model import DTYPES, ModelArgs, Transformer, check_state_dict, load_state_dict, resolve_weights
from tokenize_chat import (TEMPLATES_DIR, TOKENIZER_FILES, TemplateError, TokenizerError, load_template, load_tokenizer,
                           shipped_templates)

# native key -> HF key; "{}" is the layer index. Inverted for HF -> native.
NAME_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.attention.wq.bias": "model.layers.{}.self_attn.q_proj.bias",
    "layers.{}.attention.wk.bias": "model.layers.{}.self_attn.k_proj.bias",
    "layers.{}.attention.wv.bias": "model.layers.{}.self_attn.v_proj.bias",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",  # Qwen3, OLMo 2, Gemma 3
    "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
}
# Where a block also norms its sublayers' outputs (OLMo 2, Gemma 3), HF's post_attention_layernorm is that
# output norm, not Llama's pre-MLP norm (which Gemma calls pre_feedforward_layernorm): these entries override.
POST_NORM_NAMES = {
    "layers.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "layers.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.post_ffn_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}
HF_TO_NATIVE = {hf: native for native, hf in NAME_MAP.items()}  # Llama's names (bench.py); see name_map
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma3_text", "gemma3")
# What the other model types of these families are, and why they are refused.
REFUSED_MODEL_TYPES = {
    "qwen3_moe": "Qwen3-MoE (mixture-of-experts MLP layers) is not supported; only dense Qwen3 is",
    "qwen2_moe": "Qwen2-MoE (mixture-of-experts MLP layers) is not supported; only dense Qwen2 is",
    "olmo3": "OLMo 3 (sliding-window layers from layer_types/sliding_window) is not supported; only OLMo 2 is",
    "olmoe": "OLMoE (mixture-of-experts MLP layers) is not supported; only OLMo 2 is",
    "gemma2": "Gemma 2 (logit soft-capping) is not supported; only Gemma 3 is",
    "gemma3n": "Gemma 3n (per-layer embeddings, AltUp) is not supported; only Gemma 3 is",
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# Gemma3TextConfig's defaults: a multimodal Gemma 3 config.json lists only the text_config keys that differ.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                            tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                            rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window_pattern=6)
# A multimodal Gemma 3 checkpoint keeps the language model under one of these prefixes (transformers 5 / 4).
LANGUAGE_MODEL_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                           "language_model.lm_head.": "lm_head."}
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SHARD_BYTES = 5 * 1024**3
# What each direction writes. A conversion replaces every file of these names that it does not write
# itself: a previous output's model.safetensors beside new shards would be the one transformers loads.
NATIVE_FILES = ("consolidated.*.pth", "params.json", *TOKENIZER_FILES, *(f"{t}.yaml" for t in shipped_templates()))
HF_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json", *TOKENIZER_FILES)


class ConvertError(ValueError):
    """Bad input: the message names the file or tensor and what is wrong. main reports it in one line and exits 1,
    as it does model.py's ValueErrors (a truncated or pickled checkpoint, tensors that do not match params.json)."""


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


# -- the name map and the rotary permutation, used both ways ---------------------------------------------------
def name_map(args: ModelArgs) -> dict:
    return {**NAME_MAP, **POST_NORM_NAMES} if args.post_norm else NAME_MAP


def rename(key: str, mapping: dict) -> str | None:
    """Map one key through NAME_MAP (or its inverse), treating the layer index as a wildcard."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            target = mapping.get(".".join(parts[:i] + ["{}"] + parts[i + 1:]))
            return target.format(p) if target else None
    return mapping.get(key)


def rotary_heads(native: str, args: ModelArgs) -> int | None:
    """How many heads' rotary halves a tensor's rows hold (it is permuted between the layouts), else None.
    A QK-norm weight scales q or k element-wise, so it follows q's and k's rows: per head ([head_dim], one
    head) or over the whole projection (OLMo 2, every head). The norm itself, a mean over the head or the
    projection, does not see the order."""
    full = args.qk_norm == "full"
    return {"wq": args.n_heads, "wk": args.n_kv_heads, "q_norm": args.n_heads if full else 1,
            "k_norm": args.n_kv_heads if full else 1}.get(native.split(".")[-2])


def permute_to_native(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split rotary layout -> Meta's interleaved pairs, per head (rows of a weight or a bias)."""
    return w.unflatten(0, (n_heads, 2, -1)).transpose(1, 2).reshape(w.shape)


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    return w.unflatten(0, (n_heads, -1, 2)).transpose(1, 2).reshape(w.shape)


# -- HF config -> ModelArgs --------------------------------------------------------------------------------
def text_config(config: dict, path: Path, language_model_only: bool = False) -> dict:
    """The language model's config: config.json itself, or a multimodal Gemma 3's text_config (with its
    defaults filled in) when only the language model is wanted."""
    if config.get("model_type") != "gemma3":
        return config
    if not language_model_only:
        raise ConvertError(f"{path}: model_type 'gemma3' is Gemma 3 with its vision tower (vision_config; tensors "
                           f"model.vision_tower.*, model.multi_modal_projector.*); this repo trains the language "
                           f"model only: pass --language_model_only to convert it alone (the vision weights are "
                           f"left out)")
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ConvertError(f"{path}: model_type 'gemma3' without a text_config object")
    return {**GEMMA3_TEXT_DEFAULTS, **text, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
            **{k: config[k] for k in ("torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id")
               if k in config and k not in text}}


def gemma3_rope(config: dict, path: Path) -> tuple[float, float, dict | None]:
    """(global rope_theta, local rope_theta, global rope scaling) from transformers 5's rope_parameters
    {"full_attention": ..., "sliding_attention": ...} or 4's rope_theta / rope_local_base_freq / rope_scaling."""
    nested = config.get("rope_parameters")
    if isinstance(nested, dict) and "full_attention" in nested:
        full, local = dict(nested.get("full_attention") or {}), dict(nested.get("sliding_attention") or {})
    else:
        full = {"rope_theta": config.get("rope_theta", 1000000.0), **(config.get("rope_scaling") or {})}
        local = {"rope_theta": config.get("rope_local_base_freq", 10000.0)}
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ConvertError(f"{path}: rope scaling on the sliding_attention layers is not supported "
                           f"(got {local.get('rope_type', local.get('type'))!r})")
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ConvertError(f"{path}: Gemma 3 rope type {kind!r} on the full_attention layers is not supported "
                           f"(default and linear are)")
    scaling = {"rope_type": "linear", "factor": float(full["factor"])} if kind == "linear" else None
    return full.get("rope_theta", 1000000.0), local.get("rope_theta", 10000.0), scaling


def args_from_hf_config(config: dict, path: Path) -> ModelArgs:
    """Every key that would change the function the model computes is read or refused by name: a checkpoint
    that converts computes what transformers computes."""
    model_type = config.get("model_type")
    if model_type in REFUSED_MODEL_TYPES:
        raise ConvertError(f"{path}: model_type {model_type!r}: {REFUSED_MODEL_TYPES[model_type]} (supported "
                           f"model types: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConvertError(f"{path}: model_type {model_type!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3/3.1/3.2, SmolLM2, Mistral, Qwen2/2.5, "
                           f"Qwen3, OLMo 2, Gemma 3)")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
    if missing := [key for key in required if key not in config]:
        raise ConvertError(f"{path}: missing required key {missing[0]!r}")
    for key in (*required, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = config.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise ConvertError(f"{path}: {key} must be a positive integer, got {value!r}")
    n_heads = config["num_attention_heads"]
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    if n_heads % n_kv_heads:
        raise ConvertError(f"{path}: num_attention_heads={n_heads} is not a multiple of "
                           f"num_key_value_heads={n_kv_heads}")
    gemma = model_type == "gemma3_text"
    # model.py's MLP is gated with SiLU (Gemma: GELU-tanh); any other activation would convert into a
    # different function.
    act_key = "hidden_activation" if gemma and "hidden_activation" in config else "hidden_act"
    act = config.get(act_key, "gelu_pytorch_tanh" if gemma else "silu")
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise ConvertError(f"{path}: {act_key} {act!r} is not supported for {model_type} "
                           f"(only {'gelu_pytorch_tanh' if gemma else 'silu'})")
    for key in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
        if gemma and config.get(key):
            raise ConvertError(f"{path}: {key}={config[key]!r} is not supported (Gemma 3 has it null/false)")
    if config.get("mlp_bias") or (model_type != "qwen2" and config.get("attention_bias")):
        raise ConvertError(f"{path}: attention_bias/mlp_bias on a {model_type} model are not supported "
                           f"(only Qwen2's q/k/v biases are)")

    # Mistral applies sliding_window (every layer) whenever it is set, and model.py does the same; Gemma 3 on
    # its sliding_attention layers. Qwen2/Qwen3 apply it only with use_sliding_window, and then only from layer
    # max_window_layers on; Qwen3 and OLMo 2 on their layer_types' sliding layers: neither is supported, unless
    # the window is at least max_position_embeddings long (full attention).
    max_seq_len = config.get("max_position_embeddings") or 8192
    window = config.get("sliding_window", 4096 if gemma else None) if model_type in ("mistral", "gemma3_text") else None
    if window is not None and (type(window) is not int or window <= 0):
        raise ConvertError(f"{path}: sliding_window must be a positive integer or null, got {window!r}")
    full_attention = (config.get("sliding_window") or 0) >= max_seq_len
    if model_type in ("qwen2", "qwen3") and config.get("use_sliding_window") and not full_attention:
        raise ConvertError(f"{path}: {model_type}'s use_sliding_window (a window on layers from max_window_layers on) "
                           f"is not supported: only full attention, which differs past "
                           f"{config.get('sliding_window')} tokens")
    if model_type in ("qwen3", "olmo2") and "sliding_attention" in (config.get("layer_types") or []) \
            and not full_attention:
        raise ConvertError(f"{path}: layer_types has sliding_attention layers: a sliding window on some "
                           f"{model_type} layers is not supported (only full attention)")

    layer_types, rope_local_theta, rope_scaling = None, None, None
    if gemma:
        layer_types = config.get("layer_types")
        if layer_types is None:  # transformers 4: every sliding_window_pattern-th layer is global
            pattern = config.get("sliding_window_pattern", 6)
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                           for i in range(config["num_hidden_layers"])]
        rope_theta, rope_local_theta, rope_scaling = gemma3_rope(config, path)
        rope_type = "default"
    else:  # transformers 5 nests rotary settings in rope_parameters; 4 has rope_theta + rope_scaling.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ConvertError(f"{path}: rope type {rope_type!r} is not supported (default and llama3 are)")
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if missing := [k for k in keys if k not in rope]:
                raise ConvertError(f"{path}: llama3 rope scaling lacks {', '.join(missing)}")
            rope_scaling = {k: rope[k] for k in keys}

    dim = config["hidden_size"]
    # OLMo 2 has no head_dim key (transformers derives it); Qwen3 and Gemma 3 set it, often != dim / heads.
    head_dim = (None if model_type == "olmo2" else config.get("head_dim")) or dim // n_heads
    multiple_of, ffn_dim_multiplier = ffn_params(dim, config["intermediate_size"])
    scalar = config.get("query_pre_attn_scalar", 256) if gemma else None
    if scalar is not None and (not isinstance(scalar, (int, float)) or scalar <= 0):
        raise ConvertError(f"{path}: query_pre_attn_scalar must be a positive number, got {scalar!r}")
    try:  # ModelArgs checks what is left (layer_types against n_layers and sliding_window)
        return ModelArgs(
            dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
            vocab_size=config["vocab_size"], multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier,
            norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, use_scaled_rope=rope_type == "llama3",
            rope_scaling=rope_scaling, head_dim=head_dim if head_dim != dim // n_heads else None,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", gemma)), qkv_bias=model_type == "qwen2",
            max_seq_len=max_seq_len, sliding_window=window,
            qk_norm={"qwen3": "head", "gemma3_text": "head", "olmo2": "full"}.get(model_type),
            pre_norm=model_type != "olmo2", post_norm=model_type in ("olmo2", "gemma3_text"),
            norm_unit_offset=gemma, norm_fp32_weight=model_type == "olmo2", scale_embeddings=gemma,
            activation="gelu_tanh" if gemma else "silu", query_pre_attn_scalar=scalar, layer_types=layer_types,
            rope_local_theta=rope_local_theta)
    except ValueError as e:
        raise ConvertError(f"{path}: {e}") from e


def ffn_params(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """Meta's schema has no FFN width, only a rule (ModelArgs.hidden_dim). Find the rule's inputs that give
    `intermediate_size`: Meta's own values where they fit, else multiple_of = the width itself."""
    for multiple_of, mult in ((256, None), (1024, 1.3), (256, 1.3), (256, 1.5), (1024, None)):
        if ModelArgs(dim=dim, n_heads=1, vocab_size=1, multiple_of=multiple_of,
                     ffn_dim_multiplier=mult).hidden_dim == intermediate_size:
            return multiple_of, mult
    # Rounding any width in (0, intermediate_size] up to a multiple of intermediate_size gives it exactly.
    base = int(2 * 4 * dim / 3)
    return intermediate_size, (None if base <= intermediate_size else intermediate_size / base)


def hf_config_from_args(args: ModelArgs, base: dict | None, dtype: torch.dtype) -> dict:
    """config.json for transformers. Starts from the source model's config.json when the native dir kept
    one (architecture, token ids, generation fields survive the round trip), else from scratch."""
    config = dict(base or {})
    if "model_type" not in config:  # the family that has what this model needs
        config["model_type"] = ("olmo2" if args.qk_norm == "full" else "gemma3_text" if args.scale_embeddings
                                else "qwen3" if args.qk_norm == "head" else "qwen2" if args.qkv_bias
                                else "mistral" if args.sliding_window else "llama")
    model_type = config["model_type"]
    config.setdefault("architectures", [ARCHITECTURES.get(model_type, "LlamaForCausalLM")])
    gemma = model_type == "gemma3_text"
    config.update(
        hidden_size=args.dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, vocab_size=args.vocab_size, intermediate_size=args.hidden_dim,
        head_dim=args.head_dim, rms_norm_eps=args.norm_eps, tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=config.get("max_position_embeddings", args.max_seq_len),
        **({"hidden_activation": "gelu_pytorch_tanh"} if gemma else {"hidden_act": "silu"}))
    if model_type == "mistral":
        config["sliding_window"] = args.sliding_window
    # Rotary settings in the source's style: transformers 5's rope_parameters, or 4's keys (which 5 also reads).
    if gemma:
        config.update(layer_types=args.layer_types, sliding_window=args.sliding_window,
                      query_pre_attn_scalar=args.query_pre_attn_scalar)
        config.pop("sliding_window_pattern", None)  # layer_types says it
        full = {"rope_type": "default", **(args.rope_scaling or {}), "rope_theta": args.rope_theta}
        local = {"rope_type": "default", "rope_theta": args.rope_local_theta or args.rope_theta}
        if "rope_parameters" in config or "rope_theta" not in config:
            config["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        else:
            config.update(rope_theta=args.rope_theta, rope_local_base_freq=local["rope_theta"],
                          rope_scaling=args.rope_scaling)
    else:
        rope = {"rope_type": "default"}
        if args.use_scaled_rope or args.rope_scaling:
            rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192, **(args.rope_scaling or {})}
        if "rope_parameters" in config:
            config["rope_parameters"] = {**rope, "rope_theta": args.rope_theta}
        else:
            config["rope_theta"] = args.rope_theta
            config["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    config["dtype" if "dtype" in config else "torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


# -- reading HF weights, one tensor at a time ------------------------------------------------------------------
def hf_shards(ckpt_dir: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = ckpt_dir / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConvertError(f"{index}: not a valid shard index (no weight_map object)")
            shards = sorted({ckpt_dir / f for f in weight_map.values()})
            if missing := [s for s in shards if not s.is_file()]:
                raise ConvertError(f"{missing[0]}: shard listed in the index is missing")
            return shards
        if (ckpt_dir / single).is_file():
            return [ckpt_dir / single]
    raise ConvertError(f"{ckpt_dir}: no weights found (looked for model.safetensors[.index.json] and "
                       f"pytorch_model.bin[.index.json])")


def open_shard(shard: Path):
    """({name: shape}, get) for one HF shard, where get(name) reads that tensor alone: a safetensors file is read
    from its header, a .bin is memory-mapped. Dropping both closes the shard (and frees its pages)."""
    if shard.suffix != ".safetensors":
        state = load_state_dict(shard)
        return {name: tuple(t.shape) for name, t in state.items()}, state.__getitem__
    from safetensors import safe_open
    try:
        f = safe_open(shard, framework="pt")
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:
        raise ConvertError(f"{shard}: cannot read safetensors file (truncated or corrupt?): {e}") from e

    def get(name: str) -> torch.Tensor:
        try:
            return f.get_tensor(name)
        except Exception as e:
            raise ConvertError(f"{shard}: cannot read tensor {name} (truncated file?): {e}") from e
    return shapes, get


# -- writing, one tensor at a time ---------------------------------------------------------------------------
def save_pth_streaming(path: Path, specs: dict, tensors):
    """Write a `torch.save` file of {name: tensor} without holding the state dict in memory.

    torch's `skip_data` writes the zip with every storage record in place but empty; uninitialised
    tensors stand in for the real ones (their pages are never touched, so they cost no memory). Each real
    tensor is then written into its record as it arrives from `tensors` (an iterable of (name, tensor)).
    Storage records are numbered in the order the dict is pickled, i.e. insertion order.
    """
    placeholders = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in specs.items()}
    # Through a Python file object, a failed write (disk full) is an OSError, not torch's "iostream error".
    with torch.serialization.skip_data(), open(path, "wb") as f:
        torch.save(placeholders, f)
    del placeholders
    with zipfile.ZipFile(path) as zf:
        records = {info.filename.split("/data/")[-1]: info for info in zf.infolist() if "/data/" in info.filename}
    assert len(records) == len(specs), (path, len(records), len(specs))
    slot = {name: records[str(i)] for i, name in enumerate(specs)}
    with open(path, "r+b") as f:
        for name, tensor in tensors:
            info = slot[name]
            f.seek(info.header_offset + 26)  # the local file header: the data follows its name and extra field
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
            assert (tuple(tensor.shape), tensor.dtype) == specs[name] and data.nbytes == info.file_size, name
            f.seek(info.header_offset + 30 + name_len + extra_len)
            f.write(memoryview(data))


def save_safetensors_streaming(path: Path, specs: dict, tensors):
    """A safetensors file is an 8-byte header length, a JSON header of offsets, then raw bytes: write the
    header from the shapes alone, then each tensor as it arrives, in header order."""
    header, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for expected, (name, tensor) in zip(specs, tensors, strict=True):
            assert name == expected, (name, expected)
            f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))


def copy_tokenizer_files(src: Path, dst: Path, names=TOKENIZER_FILES):
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    # Meta's tiktoken file sits in original/ in HF's Llama 3 dirs; the native dir wants it at the top.
    if not (dst / "tokenizer.model").exists() and (src / "original" / "tokenizer.model").is_file():
        shutil.copy2(src / "original" / "tokenizer.model", dst / "tokenizer.model")


@contextlib.contextmanager
def staging_dir(output_dir: Path, replaces=()):
    """Files are written to a hidden temp dir inside the output dir and moved into place only on success,
    so a failure leaves the output dir (which may be the input dir) exactly as it was, and removes the dirs
    it created. On success, files matching `replaces` that this conversion did not write are deleted (a
    previous conversion's); other files in the dir are left alone. A write error (disk full) becomes a
    ConvertError naming the output dir."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConvertError(f"{output_dir}: exists and is not a directory (--output_dir names a dir)")
    # The output dir and any missing parents: what a failure removes again.
    created = [d for d in (output_dir, *output_dir.parents) if not d.exists()]
    prefix, tmp = f".convert-{socket.gethostname()}-", None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob(prefix + "*"):  # left by a conversion killed with SIGKILL
            if not pid_alive(stale.name[len(prefix):].split("-")[0]):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=output_dir))
        yield tmp
        # The file that makes a dir a checkpoint to its loader (params.json, config.json) moves last, after
        # the previous output's leftovers are gone: a kill midway leaves no dir that looks whole.
        written = {f.name for f in tmp.iterdir()}
        last = [n for n in ("config.json", "params.json") if n in written]
        for name in sorted(written - set(last)):
            os.replace(tmp / name, output_dir / name)
        for f in [f for pattern in replaces for f in output_dir.glob(pattern)]:
            if f.name not in written and not f.is_dir():
                f.unlink()
        for name in last:
            os.replace(tmp / name, output_dir / name)
    except BaseException as e:
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        for d in created[1:]:  # parents, innermost first; one that is no longer empty stays
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            raise ConvertError(f"could not write {output_dir}: {e} (disk full or not writable?)") from e
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        pass  # not ours to judge: leave it
    return True


# -- the family's chat template ----------------------------------------------------------------------------------
def family_template(config: dict, tokenizer_dir: Path) -> str | None:
    """The shipped template (templates/NAME.yaml) of a model's family, from config.json's model_type and, where a
    family has several formats, its tokenizer: Llama 3's header tokens, Llama 2's sentencepiece, SmolLM2's ChatML;
    Mistral's v3 control tokens ([INST]) or v1's plain text; a default system prompt (SmolLM2's, Qwen2.5's) when
    the model's own chat template writes one. None without a tokenizer that has the template's tokens: the
    trainers then ask for --template_config."""
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except Exception:  # no tokenizer, or one we cannot read: the conversion itself does not need it
        return None

    def has(token):
        try:
            tokenizer.token_id(token)
            return True
        except (TokenizerError, KeyError):
            return False

    jinja = "".join((tokenizer_dir / f).read_text(errors="replace") for f in ("tokenizer_config.json",
                                                                              "chat_template.jinja")
                    if (tokenizer_dir / f).is_file())
    chatml = "qwen2_5" if "You are Qwen" in jinja else "smollm2_chat" if "SmolLM" in jinja else "chatml"
    model_type = config.get("model_type")
    name = {"qwen3": "qwen3", "olmo2": "olmo2", "gemma3_text": "gemma3", "gemma3": "gemma3",
            "qwen2": chatml,
            "mistral": "mistral_instruct" if has("[INST]") else "mistral_instruct_v1",
            "llama": "llama3_instruct" if has("<|start_header_id|>") else chatml if has("<|im_start|>")
            else "llama2_chat"}.get(model_type)
    try:
        load_template(name, tokenizer)  # its special tokens exist in this tokenizer
    except (TemplateError, TokenizerError, TypeError):
        return None
    return name


# -- the two directions --------------------------------------------------------------------------------------
def hf_to_native(ckpt_dir: Path, output_dir: Path, dtype: torch.dtype = torch.bfloat16,
                 language_model_only: bool = False) -> tuple[ModelArgs, torch.dtype]:
    config_path = ckpt_dir / "config.json"
    if not ckpt_dir.is_dir():
        raise ConvertError(f"{ckpt_dir}: no such directory")
    if not config_path.is_file():
        raise ConvertError(f"{ckpt_dir}: no config.json (is this a Hugging Face checkpoint dir?)")
    source_config = read_json(config_path)
    config = text_config(source_config, config_path, language_model_only)
    multimodal = config is not source_config
    args = args_from_hf_config(config, config_path)
    to_native = {hf: native for native, hf in name_map(args).items()}
    if multimodal:  # the language model's tensors sit under a prefix; the vision tower stays behind
        to_native = {prefixed + hf[len(plain):]: native for hf, native in to_native.items()
                     for prefixed, plain in LANGUAGE_MODEL_PREFIXES.items() if hf.startswith(plain)}
    shards = hf_shards(ckpt_dir)

    # Check names and shapes against the model that config.json describes before writing anything.
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("output.weight")
    plan = {}  # HF name -> native name
    for shard in shards:
        for hf_name, shape in open_shard(shard)[0].items():
            native = rename(hf_name, to_native)
            if hf_name.endswith("rotary_emb.inv_freq") or (multimodal and hf_name.startswith(VISION_PREFIXES)) \
                    or (native == "output.weight" and args.tie_word_embeddings):
                continue  # recomputed buffers, the vision tower, a tied lm_head (the embedding again)
            if native not in expected:
                raise ConvertError(f"{shard}: unexpected tensor {hf_name} for a {config['model_type']} model "
                                   f"with this config.json")
            if shape != expected[native]:
                raise ConvertError(f"{shard}: tensor {hf_name} has shape {shape}, config.json implies "
                                   f"{expected[native]}")
            plan[hf_name] = native
    if missing := [k for k in expected if k not in plan.values()]:
        raise ConvertError(f"{ckpt_dir}: missing tensors {[rename(k, name_map(args)) for k in missing][:8]}")

    def converted():
        for shard in shards:
            names, get = open_shard(shard)
            for hf_name in names:
                if native := plan.get(hf_name):
                    t = get(hf_name)
                    if heads := rotary_heads(native, args):
                        t = permute_to_native(t, heads)
                    yield native, t.to(dtype)

    with staging_dir(output_dir, replaces=NATIVE_FILES) as tmp:
        save_pth_streaming(tmp / "consolidated.00.pth", {k: (shape, dtype) for k, shape in expected.items()},
                           converted())
        (tmp / "params.json").write_text(json.dumps(args.to_json(), indent=2) + "\n")
        copy_tokenizer_files(ckpt_dir, tmp)
        if template := family_template(config, tmp):
            shutil.copy2(TEMPLATES_DIR / f"{template}.yaml", tmp / f"{template}.yaml")
        if multimodal:  # the language model's own config: --to_hf then writes a Gemma3ForCausalLM
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return args, dtype


def native_to_hf(ckpt_path: Path, output_dir: Path, dtype: torch.dtype | None = None) -> tuple[ModelArgs, torch.dtype]:
    """dtype None: the native weights' own, so exporting an fp32 run rounds nothing."""
    weights = resolve_weights(ckpt_path)
    state = load_state_dict(weights)
    params = weights.parent / "params.json"
    if not params.is_file():
        raise ConvertError(f"{weights.parent}: no params.json beside {weights.name}")
    read_json(params)  # this module's message for bad JSON; from_json parses it again
    try:
        args = ModelArgs.from_json(params)
    except ValueError as e:  # ModelArgs' own checks (heads, vocab_size)
        raise ConvertError(f"{params}: {e}") from e
    with torch.device("meta"):
        check_state_dict(Transformer(args), state, source=str(weights))
    if args.tie_word_embeddings:
        state.pop("output.weight")
    if dtype is None:  # one dtype is kept; a mix (or one the safetensors writer has no name for, fp64): fp32
        found = {t.dtype for t in state.values()}
        dtype = found.pop() if len(found) == 1 and found <= set(SAFETENSORS_DTYPES) else torch.float32
    names = {native: rename(native, name_map(args)) for native in state}

    def converted(keys):
        for native in keys:
            t = state[native]
            if heads := rotary_heads(native, args):
                t = permute_to_hf(t, heads)
            yield names[native], t.to(dtype)

    # Shards of at most 5 GB, as transformers' save_pretrained does.
    shards, size = [[]], 0
    for native, t in state.items():
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(native)
        size += nbytes
    base_config = read_json(weights.parent / "config.json") if (weights.parent / "config.json").is_file() else None
    with staging_dir(output_dir, replaces=HF_FILES) as tmp:
        copy_tokenizer_files(weights.parent, tmp, [n for n in TOKENIZER_FILES if n != "config.json"])
        weight_map = {}
        for i, keys in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            specs = {names[k]: (tuple(state[k].shape), dtype) for k in keys}
            save_safetensors_streaming(tmp / fname, specs, converted(keys))
            weight_map.update({names[k]: fname for k in keys})
        if len(shards) > 1:
            total = sum(t.numel() for t in state.values()) * dtype.itemsize
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = hf_config_from_args(args, base_config, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return args, dtype


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--ckpt_paths", required=True, type=Path,
                        help="HF checkpoint dir (or, with --to_hf, a native dir or its consolidated.00.pth)")
    parser.add_argument("--output_dir", "--output", required=True, type=Path,
                        help="where to write; may be the input dir itself")
    parser.add_argument("--precision", choices=DTYPES,
                        help="dtype of the written weights (default: bf16 into the native format; with --to_hf "
                             "the native weights' own dtype, so an fp32 run exports unrounded)")
    parser.add_argument("--to_hf", action="store_true", help="native -> HF safetensors + config.json")
    parser.add_argument("--language_model_only", action="store_true",
                        help="multimodal Gemma 3 dir (model_type gemma3): convert its language model alone, "
                             "leaving the vision tower out")
    args = parser.parse_args(argv)
    dtype = DTYPES.get(args.precision)
    try:
        if args.to_hf:
            model_args, dtype = native_to_hf(args.ckpt_paths, args.output_dir, dtype)
        else:
            model_args, dtype = hf_to_native(args.ckpt_paths, args.output_dir, dtype or torch.bfloat16,
                                             args.language_model_only)
    except (ValueError, OSError) as e:  # bad input (OSError: one we could not read), named in the message
        print(f"convert.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {args.output_dir} ({model_args.n_layers} layers, dim {model_args.dim}, "
          f"{str(dtype).removeprefix('torch.')})")
    if not args.to_hf:
        found = [f"{t}.yaml" for t in shipped_templates() if (args.output_dir / f"{t}.yaml").is_file()]
        print(f"chat template: {found[0]} (the trainers and generate.py find it there)" if found else
              "chat template: none found for this tokenizer; pass --template_config NAME to the trainers "
              f"({', '.join(shipped_templates())}, or a YAML path)")


if __name__ == "__main__":
    main()
