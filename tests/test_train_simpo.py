"""train_simpo.py on a tiny model: the loss (with and without the SFT term) and TRL's metrics against the
SimPO paper's formula on transformers' log-probs, per-row length normalisation (not the padded length, not a
B x B broadcast), 2-process FSDP2 against 1 process, exact resume, learning a separable preference, and the
SFT -> DPO -> SimPO chain, full and LoRA."""

import math

import pytest
import torch
import torch.nn.functional as F

import train_dpo
import train_simpo
import train_sft
from pref_fixtures import PAIR_KEYS, close, first_batch_pairs, hf_response_logps, make_setup, pref_args
from sft_fixtures import free_port, metrics, torchrun, write_chat_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("simpo"))


def run(setup, out, **overrides):
    train_simpo.main(pref_args(setup, out, **overrides))
    return metrics(out)


def published_simpo(s, n, beta, gamma, sft_weight) -> dict:
    """SimPO (Meng et al. 2024, eq. 6): a = s / |y|, loss = -log sig(b (a_w - a_l) - g); the official code's
    SFT term: sft_weight x the token-mean NLL of the chosen responses; metrics as TRL's CPOTrainer."""
    (s_w, s_l), (n_w, n_l) = s.chunk(2), n.chunk(2)
    a_w, a_l = s_w / n_w, s_l / n_l
    loss = -F.logsigmoid(beta * (a_w - a_l) - gamma).mean() + sft_weight * (-s_w.sum() / n_w.sum())
    return {"loss": loss, "rewards/chosen": (beta * a_w).mean(), "rewards/rejected": (beta * a_l).mean(),
            "rewards/accuracies": (a_w > a_l).double().mean(), "rewards/margins": (beta * (a_w - a_l)).mean(),
            "logps/chosen": a_w.mean(), "logps/rejected": a_l.mean()}


def test_each_row_is_normalised_by_its_own_length():
    """The original SimPO code divided by the padded length and let [B] meet [B, 1] in a B x B broadcast;
    here each pair's loss uses its own two response lengths."""
    s = torch.tensor([-10.0, -30.0, -5.0, -12.0, -40.0, -6.0])  # 3 chosen, then 3 rejected
    n = torch.tensor([5, 20, 2, 4, 10, 3])
    losses, r_w, r_l, a_w, a_l = train_simpo.simpo_loss(s, n, beta=2.0, gamma=0.5)
    assert losses.shape == (3,) and r_w.shape == (3,)
    expected = [-F.logsigmoid(2.0 * (s[i] / n[i] - s[i + 3] / n[i + 3]) - 0.5) for i in range(3)]
    assert torch.allclose(losses, torch.stack(expected))
    assert torch.allclose(a_w, torch.tensor([-2.0, -1.5, -2.5]))
    assert torch.allclose(r_l, 2 * torch.tensor([-3.0, -4.0, -2.0]))
    padded = (s / 20).chunk(2)  # the bug: padded length and a [3, 3] broadcast
    buggy = -F.logsigmoid(2.0 * (padded[0][:, None] - padded[1][None, :]) - 0.5).mean()
    assert abs(losses.mean() - buggy) > 0.1


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_loss_and_metrics_match_the_published_formula(setup, tmp_path, sft_weight):
    ds, pairs = first_batch_pairs(setup["native"], setup["data"], setup["cache"], 3)
    s, n = hf_response_logps(setup["hf"], ds, pairs)
    assert len(set(n.tolist())) >= 4
    expected = {k: float(v) for k, v in published_simpo(s, n, 2.0, 0.5, sft_weight).items()}
    for micro, accum in ((3, 1), (1, 3)):
        m = run(setup, tmp_path / f"m{micro}", micro_batch_size_per_gpu=micro, gradient_accum_steps=accum,
                train_steps=1, simpo_beta=2.0, simpo_gamma=0.5, sft_weight=sft_weight)[0]
        for k, v in expected.items():
            assert close(m[k], v), (micro, k, m[k], v)


def test_two_process_fsdp_matches_one_and_resume_reproduces(setup, tmp_path, capsys):
    one = run(setup, tmp_path / "one", micro_batch_size_per_gpu=2, gradient_accum_steps=2, train_steps=4,
              save_freq=2, sft_weight=0.3)
    out = tmp_path / "fsdp"
    torchrun("train_simpo.py", pref_args(setup, out, micro_batch_size_per_gpu=1, gradient_accum_steps=2,
                                         train_steps=4, sft_weight=0.3), nproc=2, port=free_port())
    for a, b in zip(one, metrics(out), strict=True):
        assert a["tokens"] == b["tokens"] and all(close(a[k], b[k]) for k in ("loss", *PAIR_KEYS)), (a, b)
    (tmp_path / "one" / "consolidated.00.pth").unlink()  # as a kill in the final save leaves it: not finished
    resumed = run(setup, tmp_path / "one", micro_batch_size_per_gpu=2, gradient_accum_steps=2, train_steps=4,
                  save_freq=2, sft_weight=0.3, resume=True)
    assert "resumed from" in capsys.readouterr().out
    for a, b in zip(one, resumed, strict=True):
        assert all(close(a[k], b[k]) for k in ("loss", "grad_norm", *PAIR_KEYS)), (a, b)


def test_learns_a_separable_preference_and_validates(setup, tmp_path):
    m = run(setup, tmp_path / "learn", train_steps=16, lr=3e-3, lr_scheduler="constant", micro_batch_size_per_gpu=4,
            simpo_beta=2.0, simpo_gamma=0.5, val_data_paths=f"jsonl:{setup['data']}", val_freq=8, print_freq=8)
    assert m[-1]["loss"] < 0.5 * m[0]["loss"], [x["loss"] for x in m]
    assert m[0]["rewards/accuracies"] < 0.75 and m[-1]["rewards/accuracies"] == 1
    assert m[-1]["val/rewards/accuracies"] == 1 and m[-1]["val/loss"] < m[0]["loss"]


@pytest.mark.parametrize("use_lora", [False, True])
def test_sft_then_dpo_then_simpo(setup, tmp_path, use_lora):
    """Each stage's output dir is the next stage's --ckpt_paths (with --lora: merged weights out, fresh
    adapters in); the DPO stage starts at ln 2 since its reference is its own starting point."""
    lora = {"lora": True, "lora_rank": 4, "lora_alpha": 8} if use_lora else {}
    sft, dpo, simpo = tmp_path / "sft", tmp_path / "dpo", tmp_path / "simpo"
    chat = write_chat_data(tmp_path / "chat.jsonl", n=8)
    sft_argv = pref_args(setup, sft, train_data_paths=f"jsonl:{chat}", train_steps=2, **lora)
    train_sft.main(sft_argv)
    train_dpo.main(pref_args(setup, dpo, ckpt_paths=sft, train_steps=2, dpo_beta=0.01, **lora))
    assert abs(metrics(dpo)[0]["loss"] - math.log(2)) <= 1e-6
    m = run(setup, simpo, ckpt_paths=dpo, train_steps=2, simpo_beta=1.0, simpo_gamma=1.0, **lora)
    assert all(math.isfinite(x["loss"]) for x in m)
    assert (simpo / "consolidated.00.pth").exists() and (simpo / "adapter").exists() == use_lora
