"""The torchllms training README's commands, flag for flag (paths and file names ours), on a tiny Llama 3
model with Meta's real tokenizer and the llama3_instruct template: SFT, its LoRA variant, then DPO and
SimPO on the SFT output, each through torchrun."""

import json
import shutil

import pytest

from dev.assets import LLAMA3_TOKENIZER, asset
from sft_fixtures import free_port, metrics, torchrun


@pytest.fixture(scope="module")
def torchllms_dir(tmp_path_factory):
    """checkpoints/llama3.1_8b_instruct as the torchllms README has it, but tiny, plus examples.jsonl files."""
    import convert
    from tiny import hf_model, save_hf

    root = tmp_path_factory.mktemp("torchllms")
    hf_dir = save_hf(hf_model("llama3.1", vocab_size=128256), root / "hf")
    (hf_dir / "original").mkdir()
    shutil.copy(asset(*LLAMA3_TOKENIZER), hf_dir / "original" / "tokenizer.model")
    ckpt = root / "checkpoints" / "llama3.1_8b_instruct"
    convert.main(["--ckpt_paths", str(hf_dir), "--output", str(ckpt), "--precision", "fp32"])
    sft, pref = root / "examples.jsonl", root / "pref_examples.jsonl"
    with open(sft, "w") as f, open(pref, "w") as g:
        for i in range(8):
            user = {"role": "user", "content": f"Name a number above {i}."}
            f.write(json.dumps({"messages": [{"role": "system", "content": "Be brief."}, user,
                                             {"role": "assistant", "content": f"{i + 1}, for example."}]}) + "\n")
            g.write(json.dumps({"chosen": [user, {"role": "assistant", "content": f"{i + 1}."}],
                                "rejected": [user, {"role": "assistant", "content": f"{i - 1}."}]}) + "\n")
    return {"ckpt": ckpt, "sft": sft, "pref": pref, "root": root}


LORA = ["--lora", "--lora_rank", "16", "--lora_alpha", "16", "--lora_dropout", "0.0"]


@pytest.mark.parametrize("lora", [False, True])
def test_torchllms_readme_sft_then_dpo_and_simpo(torchllms_dir, lora):
    root, extra = torchllms_dir["root"], LORA if lora else []
    tag = "_lora" if lora else ""
    cache = ["--data_cache_dir", str(root / "cache")]
    sft_out = root / "outputs" / f"sft_example{tag}"
    torchrun("train_sft.py", [
        "--ckpt_paths", torchllms_dir["ckpt"] / "consolidated.00.pth", "--template_config", "llama3_instruct.yaml",
        "--lr", "1e-6", "--lr_scheduler", "cosine", "--warmup_steps", "5", "--wd", "0",
        "--train_data_paths", f"jsonl:{torchllms_dir['sft']}", "--train_epochs", "1", "--max_seq_len", "1024",
        "--micro_batch_size_per_gpu", "2", "--gradient_accum_steps", "2", "--output_dir", sft_out,
        *extra, *cache], port=free_port())
    assert [m["step"] for m in metrics(sft_out)] == [1, 2]  # 8 conversations / (2 x 2)
    dpo_out = root / "outputs" / f"dpo_example{tag}"
    torchrun("train_dpo.py", [
        "--ckpt_paths", sft_out / "consolidated.00.pth", "--template_config", "llama3_instruct.yaml",
        "--lr", "5e-7", "--lr_scheduler", "cosine", "--dpo_beta", "0.01",
        "--train_data_paths", f"jsonl:{torchllms_dir['pref']}", "--train_epochs", "1", "--max_seq_len", "1024",
        "--micro_batch_size_per_gpu", "1", "--gradient_accum_steps", "8", "--output_dir", dpo_out,
        "--loss_reduction", "tokens",  # the torchllms README lists it for every trainer
        *extra, *cache], port=free_port())
    first = metrics(dpo_out)[0]
    assert abs(first["loss"] - 0.6931471805599453) <= 1e-6 and first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    simpo_out = root / "outputs" / f"simpo_example{tag}"
    torchrun("train_simpo.py", [
        "--ckpt_paths", dpo_out / "consolidated.00.pth", "--template_config", "llama3_instruct.yaml",
        "--lr", "5e-7", "--lr_scheduler", "cosine", "--simpo_beta", "1.0", "--simpo_gamma", "1.0",
        "--train_data_paths", f"jsonl:{torchllms_dir['pref']}", "--train_epochs", "1", "--max_seq_len", "1024",
        "--micro_batch_size_per_gpu", "1", "--gradient_accum_steps", "8", "--output_dir", simpo_out,
        "--loss_reduction", "tokens", *extra, *cache], port=free_port())
    assert len(metrics(simpo_out)) == 1
    assert (simpo_out / "consolidated.00.pth").exists() and (simpo_out / "llama3_instruct.yaml").exists()
    if lora:
        assert (simpo_out / "adapter" / "adapter.pth").exists()
