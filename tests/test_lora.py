"""lora.py: identity at initialisation, only adapters train, merging is exact, adapters load as overlays."""

import pytest
import torch

import lora
from model import Transformer
from tiny import native_model


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    _, native_dir = native_model(tmp_path_factory.mktemp("lora"), "qwen2")  # q/k/v biases too
    return native_dir


TOKENS = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))


def trained_adapters(model):
    """Give every B a non-zero value, as training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora.lora_modules(model):
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.05)
    return model


def test_identity_at_init_and_targets(native):
    base = Transformer.from_pretrained(native)
    with torch.no_grad():
        ref = base(TOKENS)
    model = lora.apply_lora(Transformer.from_pretrained(native), rank=4, alpha=8, dropout=0.1)
    assert len(lora.lora_modules(model)) == 2 * 7  # 2 layers x (wq wk wv wo w1 w2 w3)
    assert not isinstance(model.output, lora.LoRALinear)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(TOKENS), ref)


def test_only_adapters_change(native):
    model = lora.apply_lora(Transformer.from_pretrained(native), rank=4, alpha=8)
    lora.mark_trainable(model, unfrozen_patterns=[r"^norm\."])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(TOKENS).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {k for k in before if ".lora_" in k or k == "norm.weight"}
    assert changed == trainable


def test_merge_equals_unmerged_and_adapter_overlay(native, tmp_path):
    model = trained_adapters(lora.apply_lora(Transformer.from_pretrained(native), rank=4, alpha=16))
    with torch.no_grad():
        unmerged = model(TOKENS)
        lora.set_adapters(model, False)
        base_out = model(TOKENS)
        lora.set_adapters(model, True)
    assert (unmerged - base_out).abs().max() > 1e-3  # the adapters do something
    state = model.state_dict()
    lora.save_adapter(tmp_path / "adapter", lora.adapter_state_dict(state), rank=4, alpha=16,
                      targets=lora.DEFAULT_TARGETS)
    merged_sd = lora.merged_state_dict(state, rank=4, alpha=16)
    merged = lora.merge_lora(model)
    assert not lora.lora_modules(merged)
    with torch.no_grad():
        assert (merged(TOKENS) - unmerged).abs().max() <= 1e-5
        assert all(torch.equal(merged_sd[k], v) for k, v in merged.state_dict().items())
        overlay = lora.load_model([native, tmp_path / "adapter" / lora.ADAPTER_WEIGHTS])
        assert (overlay(TOKENS) - unmerged).abs().max() <= 1e-5


def test_adapter_without_config_is_an_error(native, tmp_path):
    model = lora.apply_lora(Transformer.from_pretrained(native), rank=2, alpha=2)
    torch.save(lora.adapter_state_dict(model.state_dict()), tmp_path / "adapter.pth")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_model([native, tmp_path / "adapter.pth"])


def test_bad_targets(native):
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.apply_lora(Transformer.from_pretrained(native), rank=2, alpha=2, targets=["q_proj"])


def test_adapters_stack_in_order(native, tmp_path):
    """base + adapter A + adapter B = W + (alpha_A / r_A) B_A A_A + (alpha_B / r_B) B_B A_B, computed here from the
    saved tensors; B trained on top of A (as a DPO adapter on an SFT one) needs both."""
    torch.manual_seed(0)
    for name, rank, alpha in (("a", 4, 16), ("b", 2, 2)):
        model = trained_adapters(lora.apply_lora(Transformer.from_pretrained(native), rank=rank, alpha=alpha))
        lora.save_adapter(tmp_path / name, lora.adapter_state_dict(model.state_dict()), rank, alpha,
                          lora.DEFAULT_TARGETS)
    base = torch.load(native / "consolidated.00.pth")
    a, b = (torch.load(tmp_path / n / lora.ADAPTER_WEIGHTS) for n in "ab")
    stacked = lora.load_model([native, tmp_path / "a", tmp_path / "b"]).state_dict()
    key = "layers.1.feed_forward.w2."
    expected = base[key + "weight"] + 4 * a[key + "lora_b"] @ a[key + "lora_a"] + b[key + "lora_b"] @ b[key + "lora_a"]
    assert (stacked[key + "weight"] - expected).abs().max() <= 1e-6
    only_b = lora.load_model([native, tmp_path / "b"]).state_dict()
    assert (only_b[key + "weight"] - stacked[key + "weight"]).abs().max() > 1e-3


def test_adapter_of_another_model_is_an_error(native, tmp_path):
    model = lora.apply_lora(Transformer.from_pretrained(native), rank=2, alpha=2)
    state = lora.adapter_state_dict(model.state_dict())
    state["layers.0.attention.wq.lora_a"] = torch.zeros(2, 7)
    lora.save_adapter(tmp_path / "bad", state, 2, 2, lora.DEFAULT_TARGETS)
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.lora_a \(2, 7\) / lora_b \(\d+, 2\) do not fit"):
        lora.load_model([native, tmp_path / "bad"])


def test_dropout_gradients_equal_with_activation_checkpointing(native):
    """LoRA dropout draws a mask in forward; activation checkpointing runs each block's forward again in
    backward, which must draw the same mask (the RNG state restored), or the adapters' gradients are those of
    another mask than the loss's. Same seed, with and without checkpointing: the same gradients."""
    import parallel

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same A
        model = trained_adapters(lora.apply_lora(Transformer.from_pretrained(native), rank=4, alpha=8, dropout=0.2))
        if checkpointing:
            parallel.apply_activation_checkpointing(model)
        torch.manual_seed(3)
        model(TOKENS).logsumexp(-1).mean().backward()
        grads.append({k.replace("_checkpoint_wrapped_module.", ""): p.grad for k, p in model.named_parameters()
                      if ".lora_" in k})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 7 * 2
    worst = max((plain[k] - checkpointed[k]).abs().max() / plain[k].abs().max() for k in plain)
    assert worst <= 1e-6, worst
