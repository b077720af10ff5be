"""train_dpo.py on a tiny model: the loss and TRL's metrics against the published formulas evaluated on
transformers' log-probs, ln 2 at step 0, the three references agreeing, world size and DP mode invariance,
exact resume, learning a separable preference, and bad input (identical pairs, empty responses, mismatched
prompts, a stale reference cache)."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import train_dpo
from pref_fixtures import PAIR_KEYS, close, first_batch_pairs, hf_response_logps, make_setup, pref_args
from sft_fixtures import free_port, metrics, torchrun


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("dpo"))


def run(setup, out, **overrides):
    train_dpo.main(pref_args(setup, out, **overrides))
    return metrics(out)


def published_dpo(s, ref, n, beta, eps, loss_type) -> dict:
    """DPO (Rafailov et al. eq. 7; cDPO label smoothing) and IPO (Azar et al. eq. 17 on per-token log-ratios,
    as TRL), with TRL's metric definitions, in float64."""
    (s_w, s_l), (r_w, r_l), (n_w, n_l) = s.chunk(2), ref.chunk(2), n.chunk(2)
    if loss_type == "ipo":
        h = (s_w - r_w) / n_w - (s_l - r_l) / n_l
        loss = ((h - 1 / (2 * beta)) ** 2).mean()
    else:
        h = (s_w - r_w) - (s_l - r_l)
        loss = (-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).mean()
    rew_w, rew_l = beta * (s_w - r_w), beta * (s_l - r_l)
    return {"loss": loss, "rewards/chosen": rew_w.mean(), "rewards/rejected": rew_l.mean(),
            "rewards/accuracies": (rew_w > rew_l).double().mean(), "rewards/margins": (rew_w - rew_l).mean(),
            "logps/chosen": s_w.mean(), "logps/rejected": s_l.mean()}


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_loss_and_metrics_match_the_published_formulas(setup, tmp_path, loss_type, eps):
    """Policy and reference are different models, so h != 0. Step 1 (before any update) of micro-batch 3 and of
    micro-batch 1 x 3 accumulation equals the formula on transformers' log-probs of the same 3 pairs."""
    ds, pairs = first_batch_pairs(setup["native"], setup["data"], setup["cache"], 3)
    s, n = hf_response_logps(setup["hf"], ds, pairs)
    ref, _ = hf_response_logps(setup["ref_hf"], ds, pairs)
    assert len(set(n.tolist())) >= 4  # responses of different lengths, so padding is exercised
    expected = {k: float(v) for k, v in published_dpo(s, ref, n, 0.1, eps, loss_type).items()}
    assert 0 < expected["rewards/accuracies"] < 1 or abs(expected["rewards/margins"]) > 1e-3
    for micro, accum in ((3, 1), (1, 3)):
        m = run(setup, tmp_path / f"m{micro}", micro_batch_size_per_gpu=micro, gradient_accum_steps=accum,
                train_steps=1, dpo_beta=0.1, dpo_label_smoothing=eps, dpo_loss=loss_type,
                ref_ckpt_paths=setup["ref_native"])[0]
        for k, v in expected.items():
            assert close(m[k], v), (micro, k, m[k], v)


def test_references_agree_and_step0_is_ln2(setup, tmp_path):
    """--reference precompute (the policy's own pass) and model (a frozen copy) give the same losses over
    several steps; with LoRA, precompute and the adapters-off policy do too. Step 1 has reference = policy:
    loss ln 2, rewards and margins 0, accuracy 0."""
    runs = {}
    for name, extra in {"precompute": {}, "model": {"reference": "model"},
                        "lora_precompute": {"lora": True, "lora_rank": 4, "lora_alpha": 8, "lr": 1e-2},
                        "lora_adapters_off": {"lora": True, "lora_rank": 4, "lora_alpha": 8, "lr": 1e-2,
                                              "reference": "model"}}.items():
        runs[name] = run(setup, tmp_path / name, train_steps=4, **extra)
        first = runs[name][0]
        assert abs(first["loss"] - math.log(2)) <= 1e-6, (name, first)
        assert all(abs(first[k]) <= 1e-6 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
        assert first["rewards/accuracies"] == 0
    for a, b in (("precompute", "model"), ("lora_precompute", "lora_adapters_off")):
        la, lb = [m["loss"] for m in runs[a]], [m["loss"] for m in runs[b]]
        assert all(close(x, y) for x, y in zip(la, lb, strict=True)), (a, la, lb)
        assert la[-1] < la[0] - 1e-3  # it trained
        assert all(close(x[k], y[k]) for x, y in zip(runs[a], runs[b]) for k in PAIR_KEYS)


def test_two_processes_fsdp_and_ddp_match_one(setup, tmp_path):
    """Same global batch (2 pairs x 2 accumulation) as 1 process: FSDP2 precomputing the reference afresh
    with the sharded policy (each rank its share of the pass), FSDP2 with a sharded frozen copy, DDP with a
    plain frozen copy; and with LoRA, FSDP2 with the adapters-off policy as the reference."""
    lora = {"lora": True, "lora_rank": 4, "lora_alpha": 8, "lr": 1e-2}
    one = run(setup, tmp_path / "one", micro_batch_size_per_gpu=2, gradient_accum_steps=2, train_steps=3)
    one_lora = run(setup, tmp_path / "one_lora", micro_batch_size_per_gpu=2, gradient_accum_steps=2, train_steps=3,
                   **lora)
    for name, extra in {"fsdp_precompute": {"dp": "fsdp", "data_cache_dir": tmp_path / "fresh_cache"},
                        "fsdp_model": {"dp": "fsdp", "reference": "model"},
                        "ddp_model": {"dp": "ddp", "reference": "model"},
                        "fsdp_lora_adapters_off": {"dp": "fsdp", "reference": "model", **lora}}.items():
        out = tmp_path / name
        result = torchrun("train_dpo.py", pref_args(setup, out, micro_batch_size_per_gpu=1, gradient_accum_steps=2,
                                                    train_steps=3, **extra), nproc=2, port=free_port())
        assert ("one pass over" in result.stdout) == (name == "fsdp_precompute")
        assert ("adapters off" in result.stdout) == ("lora" in name)
        for a, b in zip(one_lora if "lora" in name else one, metrics(out), strict=True):
            assert a["tokens"] == b["tokens"]
            assert all(close(a[k], b[k]) for k in ("loss", *PAIR_KEYS)), (name, a, b)


@pytest.mark.parametrize("use_lora", [False, True])
def test_resume_reproduces_and_reuses_the_reference_cache(setup, tmp_path, capsys, use_lora):
    """With LoRA the step checkpoint holds the adapters alone; the base, and so the adapters-off reference, come
    from --ckpt_paths again."""
    out = tmp_path / "run"
    lora = {"lora": True, "lora_rank": 4, "lora_alpha": 8, "lr": 1e-2} if use_lora else {}
    full = run(setup, out, train_steps=6, save_freq=3, micro_batch_size_per_gpu=2,
               val_data_paths=f"jsonl:{setup['data']}", val_freq=3, **lora)
    assert "val/rewards/accuracies" in full[2] and "val/loss" in full[5]
    capsys.readouterr()
    (out / "consolidated.00.pth").unlink()  # as a kill in the final save leaves it: not finished, resumed
    resumed = run(setup, out, train_steps=6, save_freq=3, micro_batch_size_per_gpu=2, resume=True,
                  val_data_paths=f"jsonl:{setup['data']}", val_freq=3, **lora)
    log = capsys.readouterr().out
    assert "resumed from" in log and "(cached)" in log and "one pass over" not in log
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        assert all(close(a[k], b[k]) for k in ("loss", "grad_norm", *PAIR_KEYS)), (a, b)


def test_learns_a_separable_preference(setup, tmp_path):
    m = run(setup, tmp_path / "learn", train_steps=16, lr=3e-3, lr_scheduler="constant", micro_batch_size_per_gpu=4,
            dpo_beta=0.1, print_freq=8)
    assert m[-1]["loss"] < 0.5 * m[0]["loss"], [x["loss"] for x in m]
    assert m[0]["rewards/accuracies"] == 0 and m[-1]["rewards/accuracies"] == 1
    assert m[-1]["rewards/margins"] > 0.5


# -- bad input ---------------------------------------------------------------------------------------------------
def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pair(prompt, chosen, rejected, rejected_prompt=None):
    return {"chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
            "rejected": [{"role": "user", "content": rejected_prompt or prompt},
                         {"role": "assistant", "content": rejected}]}


def test_identical_responses_are_reported(setup, tmp_path, capsys):
    data = write(tmp_path / "same.jsonl", [pair("What is 1 plus 2?", "3.", "4."), pair("What is 2 plus 2?", "4.", "4."),
                                           pair("What is 3 plus 2?", "5.", "6.")])
    m = run(setup, tmp_path / "o", train_data_paths=f"jsonl:{data}", train_steps=1)
    assert "warning: 1 pairs have identical chosen and rejected responses" in capsys.readouterr().out
    assert m[0]["rewards/margins"] == 0


@pytest.mark.parametrize("bad,message", [
    (pair("What is 2 plus 2?", "4.", "5.", rejected_prompt="What is 2 plus 3?"),
     "line 2: 'chosen' and 'rejected' have different prompts"),
])
def test_bad_pairs_are_errors_naming_the_record(setup, tmp_path, capsys, bad, message):
    data = write(tmp_path / "bad.jsonl", [pair("What is 1 plus 2?", "3.", "4."), bad])
    with pytest.raises(SystemExit) as exc:
        run(setup, tmp_path / "o", train_data_paths=f"jsonl:{data}", train_steps=1)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and message in err, err


def test_empty_side_in_a_batch_is_an_error_not_nan():
    import train_common as tc
    from train_simpo import simpo_loss

    labels = torch.full((4, 5), -100)
    labels[0, 2:] = 7  # pair 0: chosen has tokens, rejected (row 2) none; pair 1: filler (no tokens at all)
    response_ids = torch.tensor([0, -1, 1, -1])[:, None].expand(4, 5)
    batch = {"labels": labels, "response_ids": response_ids, "sample_ids": torch.tensor([11])}
    with pytest.raises(ValueError, match="pair 11 .* empty rejected response"):
        tc.response_lengths(batch)
    labels[2, 3:] = 5
    assert tc.response_lengths(batch).tolist() == [3, 2]
    with pytest.raises(ValueError, match="at least one token"):
        simpo_loss(torch.tensor([-1.0, 0.0]), torch.tensor([3, 0]), 2.0, 1.0)


def test_stale_reference_cache_is_rebuilt(setup, tmp_path, capsys):
    """Change the reference weights in place: the cached s_ref of the old weights must not be used (if it
    were, step 1 would not be ln 2 with reference = policy)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup["native"], ckpt)
    run(setup, tmp_path / "a", ckpt_paths=ckpt, train_steps=1)
    assert "one pass over" in capsys.readouterr().out
    run(setup, tmp_path / "b", ckpt_paths=ckpt, train_steps=1)
    assert "(cached)" in capsys.readouterr().out
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    torch.save({k: v * 1.5 if k.endswith("norm.weight") else v for k, v in state.items()}, ckpt / "consolidated.00.pth")
    m = run(setup, tmp_path / "c", ckpt_paths=ckpt, train_steps=1)
    assert "one pass over" in capsys.readouterr().out
    # Reference = policy again. Precomputed and training log-probs come from differently padded batches, so
    # they agree to float rounding only (~1e-7); stale values would be off by whole nats.
    assert abs(m[0]["loss"] - math.log(2)) <= 1e-6 and abs(m[0]["rewards/margins"]) <= 1e-5


def test_share_prompt_without_packing_is_refused(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(setup, tmp_path / "o", share_prompt=True, train_steps=1)
    assert exc.value.code == 2 and "--share_prompt" in capsys.readouterr().err and not (tmp_path / "o").exists()
