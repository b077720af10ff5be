"""A short SFT, then DPO and SimPO run on tiny Qwen3, OLMo 2 and Gemma 3 models with their own chat templates: each trains
(finite loss, DPO at ln 2 on step 0), saves a native dir that reloads, and exports to HF safetensors that
transformers loads as the same family with the trained model's logits. SFT packs rows (per-document attention,
through Gemma 3's local windows); DPO trains LoRA adapters; SimPO packs pairs with a shared prompt."""

import json
import math
import shutil

import pytest
import torch

import convert
import train_dpo
import train_sft
import train_simpo
from model import Transformer
from pref_fixtures import write_preference_data
from sft_fixtures import metrics, to_argv, train_bpe_tokenizer, write_chat_data
from tiny import hf_model, save_hf

# family -> (template, special tokens of its tokenizer, eos, bos)
FAMILIES = {
    "qwen3": ("qwen3", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", None),
    "olmo2": ("olmo2", ["<|endoftext|>", "<|pad|>"], "<|endoftext|>", "<|endoftext|>"),
    "gemma3": ("gemma3", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<eos>", "<bos>"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_dpo_simpo_train_save_reload_export(tmp_path, family):
    from transformers import AutoModelForCausalLM

    template, specials, eos, bos = FAMILIES[family]
    tok_dir = train_bpe_tokenizer(tmp_path / "bpe", specials=specials, eos=eos, bos=bos)
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    hf = hf_model(family, vocab_size=vocab)
    hf_dir = save_hf(hf, tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, hf_dir / name)
    native = tmp_path / "native"
    convert.main(["--ckpt_paths", str(hf_dir), "--output_dir", str(native), "--precision", "fp32"])
    common = {"template_config": template, "max_seq_len": 96, "lr_scheduler": "constant", "warmup_steps": 0,
              "gradient_accum_steps": 1, "train_steps": 3, "data_cache_dir": tmp_path / "cache", "seed": 42}

    sft = tmp_path / "sft"
    train_sft.main(to_argv({**common, "ckpt_paths": native, "output_dir": sft, "lr": 2e-3, "pack_samples": True,
                            "micro_batch_size_per_gpu": 2,
                            "train_data_paths": f"jsonl:{write_chat_data(tmp_path / 'chat.jsonl')}"}))
    losses = [m["loss"] for m in metrics(sft)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]

    dpo = tmp_path / "dpo"
    train_dpo.main(to_argv({**common, "ckpt_paths": sft, "output_dir": dpo, "lr": 1e-3, "lora": True,
                            "micro_batch_size_per_gpu": 3,
                            "train_data_paths": f"jsonl:{write_preference_data(tmp_path / 'pref.jsonl')}"}))
    steps = metrics(dpo)
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-4 and all(math.isfinite(m["loss"]) for m in steps)

    simpo = tmp_path / "simpo"
    train_simpo.main(to_argv({**common, "ckpt_paths": sft, "output_dir": simpo, "lr": 1e-3, "pack_samples": True,
                              "micro_batch_size_per_gpu": 2, "train_steps": 2,
                              "train_data_paths": f"jsonl:{tmp_path / 'pref.jsonl'}"}))
    assert all(math.isfinite(m["loss"]) for m in metrics(simpo))

    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    for out in (sft, dpo, simpo):
        assert (out / f"{template}.yaml").exists()
        trained = Transformer.from_pretrained(out)
        convert.main(["--to_hf", "--ckpt_paths", str(out), "--output_dir", str(tmp_path / f"{out.name}-hf"),
                      "--precision", "fp32"])
        back = AutoModelForCausalLM.from_pretrained(tmp_path / f"{out.name}-hf", dtype=torch.float32).eval()
        assert type(back) is type(hf)
        with torch.no_grad():
            assert (back(tokens).logits - trained(tokens)).abs().max() <= 1e-4
