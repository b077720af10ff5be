"""Qwen3, OLMo 2 and Gemma 3 (text) against transformers' own Qwen3ForCausalLM, Olmo2ForCausalLM and
Gemma3ForCausalLM: configs in both transformers styles, bit-exact round trips, greedy KV-cache generation
against transformers' generate (past Gemma 3's sliding window: transformers keeps a sliding-window cache for
those layers), packed rows against each document alone, and the variants that are refused.
The logits of the tiny models in tests/tiny.py are compared in test_model.test_logits_equal_transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file

import convert
from model import Transformer, generate
from tiny import hf_model, native_model, save_hf

NEW_FAMILIES = ["qwen3", "olmo2", "gemma3"]


def run(*argv):
    convert.main([str(a) for a in argv])


def logits(model, tokens, **kw):
    with torch.no_grad():
        out = model(tokens, **kw)
    return out.logits if hasattr(out, "logits") else out


def to_transformers4(hf_dir, family):
    """Rewrite config.json as transformers 4 wrote these families (Gemma 3: rope_theta, rope_local_base_freq,
    rope_scaling of the global layers, sliding_window_pattern instead of layer_types)."""
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    if family == "gemma3":
        cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": rope["full_attention"]["factor"]}
        cfg.pop("layer_types")
        cfg["sliding_window_pattern"] = 3  # layers 0, 1, 3, 4 local, 2 global
    else:
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype")
    path.write_text(json.dumps(cfg, indent=2))


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_transformers4_config_round_trip_and_export(tmp_path, family):
    """transformers 4 style config -> native -> HF: the same tensors bit for bit, a model of the same class,
    logits equal to transformers' from the 4-style dir. Then the 5-style dir round trips too."""
    from transformers import AutoModelForCausalLM

    hf_dir = save_hf(hf_model(family), tmp_path / "hf")
    to_transformers4(hf_dir, family)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    run("--ckpt_paths", hf_dir, "--output_dir", tmp_path / "native", "--precision", "fp32")
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = Transformer.from_pretrained(tmp_path / "native")
    assert (logits(ours, tokens) - logits(ref, tokens)).abs().max() <= 1e-4

    run("--to_hf", "--ckpt_paths", tmp_path / "native", "--output_dir", tmp_path / "back", "--precision", "fp32")
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    assert "rope_theta" in json.loads((tmp_path / "back" / "config.json").read_text())  # kept the source's style
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(reloaded) is type(ref)
    assert torch.equal(logits(reloaded, tokens), logits(ref, tokens))


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_round_trip_bit_exact_and_from_scratch_config(tmp_path, family):
    from transformers import AutoModelForCausalLM

    hf, native_dir = native_model(tmp_path, family)
    original = load_file(tmp_path / f"{family}-hf" / "model.safetensors")
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    for name, drop_config in (("back", False), ("scratch", True)):
        if drop_config:  # no source config.json beside the weights: --to_hf builds one from params.json
            (native_dir / "config.json").unlink()
        run("--to_hf", "--ckpt_paths", native_dir, "--output_dir", tmp_path / name, "--precision", "fp32")
        exported = load_file(tmp_path / name / "model.safetensors")
        assert exported.keys() == original.keys()
        assert all(torch.equal(exported[k], original[k]) for k in original)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
        assert type(reloaded) is type(hf)
        assert torch.equal(logits(reloaded, tokens), logits(hf, tokens))


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_greedy_kv_cache_generation_equals_transformers(tmp_path, family):
    """Gemma 3's window is 8: a 5-token prompt grows past it, a 13-token prompt starts past it."""
    hf, native_dir = native_model(tmp_path, family)
    ours = Transformer.from_pretrained(native_dir)
    for prompt in ([5, 17, 99, 3, 250], [7, 1, 300, 42, 42, 8, 9, 100, 2, 61, 77, 5, 400]):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert list(generate(ours, prompt, max_new_tokens=24)) == ref


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_packed_rows_equal_each_document_alone(tmp_path, family):
    """Per-document attention from segments, per-document positions: each document's logits equal
    transformers' forward of that document alone (Gemma 3: documents shorter and longer than the window)."""
    hf, native_dir = native_model(tmp_path, family)
    ours = Transformer.from_pretrained(native_dir)
    rows = [[20, 3, 9], [1, 30], [5]]
    width = 33
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (len(rows), width), generator=g)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segments = []
    for r, docs in enumerate(rows):
        p = 0
        for n in docs:
            segments.append((r, p, p + n, p, p))
            positions[r, p:p + n] = torch.arange(n)
            p += n
    packed = logits(ours, tokens, position_ids=positions, segments=torch.tensor(segments))
    for r, a, b, _, _ in segments:
        alone = logits(hf, tokens[r:r + 1, a:b])[0]
        assert (packed[r, a:b] - alone).abs().max() <= 1e-4


def write_config(tmp_path, family, **changes):
    hf_dir = save_hf(hf_model(family), tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    return hf_dir


@pytest.mark.parametrize("family, changes, message", [
    ("qwen3", {"model_type": "qwen3_moe"}, "model_type 'qwen3_moe': Qwen3-MoE"),
    ("olmo2", {"model_type": "olmo3"}, "model_type 'olmo3': OLMo 3 (sliding-window layers"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("olmo2", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16}, "layer_types"),
    ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "rope type 'yarn'"),
])
def test_unsupported_variants_are_refused_naming_the_key(tmp_path, capsys, family, changes, message):
    hf_dir = write_config(tmp_path, family, **changes)
    with pytest.raises(SystemExit):
        run("--ckpt_paths", hf_dir, "--output_dir", tmp_path / "out")
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def tiny_gemma3_multimodal():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from tiny import hf_config
    text = hf_config("gemma3").to_dict()
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          boi_token_index=500, eoi_token_index=501, image_token_index=502)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def test_gemma3_multimodal_dir_language_model_only(tmp_path, capsys):
    """A Gemma 3 checkpoint with its vision tower: refused as a language model unless asked for the language
    model alone; then the text model converts (vision weights left out), its logits equal the multimodal
    model's on text, and --to_hf writes a Gemma3ForCausalLM."""
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

    mm = tiny_gemma3_multimodal()
    mm.save_pretrained(tmp_path / "mm")
    with pytest.raises(SystemExit):
        run("--ckpt_paths", tmp_path / "mm", "--output_dir", tmp_path / "native")
    err = capsys.readouterr().err
    assert "model_type 'gemma3'" in err and "vision_config" in err and "--language_model_only" in err
    run("--ckpt_paths", tmp_path / "mm", "--output_dir", tmp_path / "native", "--precision", "fp32",
        "--language_model_only")
    tokens = torch.randint(0, 500, (2, 30), generator=torch.Generator().manual_seed(0))
    ref = logits(mm, tokens)
    ours = Transformer.from_pretrained(tmp_path / "native")
    assert (logits(ours, tokens) - ref).abs().max() <= 1e-4
    run("--to_hf", "--ckpt_paths", tmp_path / "native", "--output_dir", tmp_path / "text", "--precision", "fp32")
    text = AutoModelForCausalLM.from_pretrained(tmp_path / "text", dtype=torch.float32).eval()
    assert type(text) is Gemma3ForCausalLM
    assert (logits(text, tokens) - ref).abs().max() <= 1e-5

    # The key names transformers 4 wrote (and the google/gemma-3-* repos still ship): language_model.model.*,
    # vision_tower.*, multi_modal_projector.*.
    from safetensors.torch import save_file
    v4 = {}
    for k, t in load_file(tmp_path / "mm" / "model.safetensors").items():
        k = k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.")
        v4[k.replace("model.multi_modal_projector.", "multi_modal_projector.")] = t
    assert any(k.startswith("language_model.model.layers.") for k in v4)
    save_file(v4, tmp_path / "mm" / "model.safetensors")
    run("--ckpt_paths", tmp_path / "mm", "--output_dir", tmp_path / "native4", "--precision", "fp32",
        "--language_model_only")
    assert torch.equal(logits(Transformer.from_pretrained(tmp_path / "native4"), tokens), logits(ours, tokens))


def test_batched_generation_past_the_window_equals_one_at_a_time(tmp_path):
    """generate.py's batched path (left padding, a caller's mask) keeps Gemma 3's local layers in their window."""
    from generate import generate_batch

    _, native_dir = native_model(tmp_path, "gemma3")
    ours = Transformer.from_pretrained(native_dir)
    prompts = [[5, 17, 99], list(range(1, 14)), [7, 7, 300, 8, 9, 10]]
    assert generate_batch(ours, prompts, 20) == [list(generate(ours, p, 20)) for p in prompts]


def test_rmsnorm_rounds_as_each_family_in_bf16():
    """In bf16 the order of rounding is the family's: Llama/Qwen3 round then scale; OLMo 2 scales in fp32 then
    rounds; Gemma scales by (1 + w) in fp32 then rounds. Bit-exact against transformers' own norms."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from model import RMSNorm
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 96, generator=g).to(torch.bfloat16)
    w = (torch.randn(96, generator=g) * 0.5).to(torch.bfloat16)
    for ref, ours in ((Qwen3RMSNorm(96, 1e-6), RMSNorm(96, 1e-6)),
                      (Olmo2RMSNorm(96, 1e-6), RMSNorm(96, 1e-6, fp32_weight=True)),
                      (Gemma3RMSNorm(96, 1e-6), RMSNorm(96, 1e-6, unit_offset=True))):
        ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
        with torch.no_grad():
            ref.weight.copy_(w)
            ours.weight.copy_(w)
            assert torch.equal(ours(x), ref(x)), type(ref).__name__
