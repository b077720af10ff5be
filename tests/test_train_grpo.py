"""train_grpo.py: the loss family against a per-sample reference written here with plain loops (float64)."""

import json
import math
import random

import pytest
import torch

import train_common as tc
import train_grpo as grpo


# -- the loss --------------------------------------------------------------------------------------------------
def reference_advantages(rewards: list, G: int, scale: str) -> tuple[list, int]:
    """TRL 1.x's advantages, one group at a time: (r - mean) / (std + 1e-4), the unbiased std of the group (or
    of the batch), over the rewards that are not None; a None reward's advantage is 0. Also the number of
    completions whose std is 0."""
    def stats(values):
        values = [v for v in values if v is not None]
        mean = sum(values) / len(values) if values else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
        return mean, std

    batch_std = stats(rewards)[1]
    out, zero = [], 0
    for k in range(0, len(rewards), G):
        group = rewards[k:k + G]
        mean, std = stats(group)
        if scale == "batch":
            std = batch_std
        zero += G * (std == 0)
        for r in group:
            a = 0.0 if r is None else r - mean
            if scale != "none":
                a = a / (std + 1e-4) if not math.isnan(std) else 0.0
            out.append(a)
    return out, zero


def reference_step_loss(completions, advantages, loss_type, eps, eps_high, beta, L):
    """completions: per completion (logps, old, ref), each a list of float64 scalar tensors. One optimizer
    step's loss, sample by sample."""
    per_completion = []
    for (logps, old, ref), a in zip(completions, advantages):
        losses = []
        for lp, lo, lr in zip(logps, old, ref):
            rho = torch.exp(lp - lo)
            clipped = min(max(rho, torch.tensor(1 - eps, dtype=torch.float64)),
                          torch.tensor(1 + eps_high, dtype=torch.float64))
            loss = -torch.minimum(rho * a, clipped * a)
            if beta:
                loss = loss + beta * (torch.exp(lr - lp) - (lr - lp) - 1)
            losses.append(loss)
        per_completion.append(losses)
    if loss_type == "dapo":
        return sum(sum(ls) for ls in per_completion) / sum(len(ls) for ls in per_completion)
    if loss_type == "grpo":
        return sum(sum(ls) / len(ls) for ls in per_completion) / len(per_completion)
    return sum(sum(ls) for ls in per_completion) / (len(per_completion) * L)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps,eps_high,beta,drift", [(0.2, 0.2, 0.0, 0.0), (0.2, 0.28, 0.0, 0.3),
                                                     (0.1, 0.3, 0.04, 0.3), (0.2, 0.2, 0.1, 0.0)])
def test_loss_equals_a_per_sample_reference(loss_type, scale, eps, eps_high, beta, drift):
    """Two prompts per micro-batch x 3 micro-batches, G = 4: a group whose rewards are all equal (no
    advantage), one with a completion no function scored (None), completions truncated at L and of one token.
    drift > 0 is a later iteration of --num_iterations (logp != logp_old, some ratios clipped); drift 0 the
    first (rho = 1). Loss and gradient with respect to every logp equal the reference to 1e-10."""
    G, L, rng = 4, 6, random.Random(0)
    rewards = [1.0, 0.0, 2.0, 0.5, 3.0, 3.0, 3.0, 3.0, 1.0, None, 0.0, 1.0,
               0.2, 0.9, 0.9, 0.1, 0.0, 1.0, 1.0, 1.0, 2.0, 2.5, 0.0, 1.5]
    lengths = [L, 1, 3, L, 2, 1, L, 4, 5, 1, 1, L, 3, 3, 2, L, 1, 2, 3, 4, 5, L, L, 1]
    ours_rewards = torch.tensor([math.nan if r is None else r for r in rewards], dtype=torch.float64)
    adv, zero = grpo.group_advantages(ours_rewards, G, scale, grpo.nan_std(ours_rewards))
    ref_adv, ref_zero = reference_advantages(rewards, G, scale)
    assert adv.tolist() == pytest.approx(ref_adv, abs=1e-12) and int(zero.sum()) == ref_zero
    assert ref_zero == (G if scale != "batch" else 0) and all(a == 0 for a in ref_adv[4:8])

    logps = [torch.tensor([-rng.uniform(0.1, 3) for _ in range(n)], dtype=torch.float64) for n in lengths]
    old = [lp - torch.tensor([rng.uniform(-drift, drift) for _ in lp], dtype=torch.float64) for lp in logps]
    ref = [lp + torch.tensor([rng.uniform(-0.5, 0.5) for _ in lp], dtype=torch.float64) for lp in logps]
    leaves = [lp.clone().requires_grad_() for lp in logps]

    # Ours: micro-batches of 2 prompts (8 completions), numerators summed, one global denominator.
    C = 2 * G
    denominator = grpo.loss_denominator(loss_type, sum(lengths), len(lengths), L)
    total = 0
    for m in range(0, len(lengths), C):
        idx = range(m, m + C)
        completion = torch.cat([torch.full((lengths[i],), i - m) for i in idx])
        numerator, *_ = grpo.grpo_loss_sum(torch.cat([leaves[i] for i in idx]), torch.cat([old[i] for i in idx]),
                                           torch.cat([ref[i] for i in idx]) if beta else None, adv[m:m + C],
                                           completion, loss_type, eps, eps_high, beta)
        total = total + numerator / denominator
    total.backward()

    ref_leaves = [[x.clone().requires_grad_() for x in lp] for lp in logps]
    expected = reference_step_loss([(rl, list(o), list(r)) for rl, o, r in zip(ref_leaves, old, ref)],
                                   ref_adv, loss_type, eps, eps_high, beta, L)
    expected.backward()
    assert abs(total.item() - expected.item()) <= 1e-10
    for ours, theirs in zip(leaves, ref_leaves):
        assert torch.allclose(ours.grad, torch.stack([x.grad for x in theirs]), rtol=0, atol=1e-10)
    if drift == 0 and beta == 0:  # rho = 1: the policy gradient -A / denominator per token
        assert total.item() == pytest.approx(-sum(a * n for a, n in zip(ref_adv, lengths)) / denominator
                                             if loss_type != "grpo" else -sum(ref_adv) / len(lengths), abs=1e-12)


# -- rewards ---------------------------------------------------------------------------------------------------
REWARDS_PY = '''
def length(prompts, completions, completion_ids, **kw):
    return [float(len(ids)) for ids in completion_ids]

def says_yes(prompts, completions, completion_ids, answer, **kw):
    text = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [None if a is None else float(a in t) for t, a in zip(text, answer)]

def raises(prompts, completions, **kw):
    return [1 / 0 for _ in completions]

def short_list(prompts, completions, **kw):
    return [1.0]

def text_reward(prompts, completions, **kw):
    return ["1.0" for _ in completions]

def nan_reward(prompts, completions, **kw):
    return [float("nan") for _ in completions]
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS_PY)
    return path


def test_rewards_weighted_with_none_skipping_a_function(reward_file):
    """TRL's convention: None skips that function for that sample (nansum over the functions); a sample no
    function scored has no reward (NaN, then advantage 0); extra columns reach the functions by name; chat
    completions arrive as [{"role": "assistant", "content": ...}]."""
    funcs = grpo.load_reward_funcs([f"{reward_file}:length", f"{reward_file}:says_yes"])
    assert [n for n, _ in funcs] == ["length", "says_yes"]
    completions = [[{"role": "assistant", "content": t}] for t in ("yes sir", "no", "yes")]
    values, reward = grpo.compute_rewards(funcs, [0.5, 2.0], ["p"] * 3, completions, [[1, 2], [3], [4, 5, 6]],
                                          {"answer": ["yes", None, "yes"]})
    assert values[:, 0].tolist() == [2.0, 1.0, 3.0] and values[0, 1] == 1.0 and values[1, 1].isnan()
    assert reward.tolist() == [0.5 * 2 + 2.0, 0.5 * 1, 0.5 * 3 + 2.0]
    only_yes = grpo.load_reward_funcs([f"{reward_file}:says_yes"])
    _, reward = grpo.compute_rewards(only_yes, [1.0], ["p"] * 2, ["yes", "x"], [[1], [2]], {"answer": [None, "x"]})
    assert reward[0].isnan() and reward[1] == 1.0


@pytest.mark.parametrize("name,message", [
    ("raises", "reward function 'raises' raised ZeroDivisionError: division by zero (at {file}:"),
    ("short_list", "reward function 'short_list' returned 1 values for 2 completions"),
    ("text_reward", "reward function 'text_reward' returned '1.0' (str) for completion 0 (prompt 'p0'"),
    ("nan_reward", "reward function 'nan_reward' returned nan for completion 0 (prompt 'p0'"),
])
def test_bad_reward_functions_name_the_function_and_the_sample(reward_file, name, message):
    funcs = grpo.load_reward_funcs([f"{reward_file}:{name}"])
    with pytest.raises(ValueError) as e:
        grpo.compute_rewards(funcs, [1.0], ["p0", "p1"], ["a", "b"], [[1], [2]], {})
    assert message.format(file=reward_file) in str(e.value), str(e.value)


def test_missing_reward_file_or_function(reward_file, tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        grpo.load_reward_funcs([f"{tmp_path}/nope.py:length"])
    with pytest.raises(ValueError, match=r"has no function 'lenght' \(it has: length, nan_reward"):
        grpo.load_reward_funcs([f"{reward_file}:lenght"])
    with pytest.raises(ValueError, match="expected path/to/file.py:function_name"):
        grpo.load_reward_funcs([str(reward_file)])
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\nimport no_such_module_here\n")
    with pytest.raises(ValueError, match=f"ModuleNotFoundError.*{broken}:2"):
        grpo.load_reward_funcs([f"{broken}:f"])


# -- rollouts --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(hf model, native dir, tokenizer, template): a tiny random Llama with a ChatML BPE tokenizer."""
    from sft_fixtures import tiny_chat_model
    from tokenize_chat import load_template, load_tokenizer

    hf, native = tiny_chat_model(tmp_path_factory.mktemp("grpo_chat"))
    tok = load_tokenizer(native)
    return hf, native, tok, load_template("chatml", tok)


def chat_prompts(tok, tpl, texts):
    from tokenize_chat import tokenize_conversation

    return [tokenize_conversation([{"role": "user", "content": t}], tok, tpl, add_generation_prompt=True)[0]
            for t in texts]


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 20)])
def test_shared_prefill_samples_what_separate_prefills_would(chat, temperature, top_p, top_k):
    """G completions per prompt from one prefill per prompt (its KV cache copied to the G rows) equal the
    completions of the prompts repeated G times, each row prefilled (same seed, same tokens), stop tokens
    included and ending their row; prompts of different lengths (left padding)."""
    from generate import generate_batch
    from model import Transformer

    _, native, tok, tpl = chat
    model = Transformer.from_pretrained(native).eval()
    prompts = chat_prompts(tok, tpl, ["What is 2 plus 3?", "Hi", "What is 12 plus 30? And doubled, please."])
    assert len({len(p) for p in prompts}) == 3
    G, N = 4, 12
    free = generate_batch(model, prompts, N, temperature, top_p, top_k, (),
                          torch.Generator().manual_seed(3), num_generations=G)
    stop = next(t for c in free for t in c[2:-2])  # a token some completion emits mid-way: make it a stop
    shared = generate_batch(model, prompts, N, temperature, top_p, top_k, {stop},
                            torch.Generator().manual_seed(3), num_generations=G)
    separate = generate_batch(model, [p for p in prompts for _ in range(G)], N, temperature, top_p, top_k, {stop},
                              torch.Generator().manual_seed(3))
    assert shared == separate
    assert any(c[-1] == stop and len(c) < N for c in shared) and any(len(c) == N for c in shared)
    assert all(stop not in c[:-1] for c in shared)
    assert len({tuple(c) for c in shared[:G]}) > 1  # the group's completions differ


# -- training on rollouts --------------------------------------------------------------------------------------
def test_shared_prompt_logprobs_equal_transformers_alone(chat):
    """Each of G completions of a prompt, laid out with the prompt once per group (group_batch), gets the
    log-probs transformers gives prompt + completion run alone (<= 1e-5): prompts of different lengths, one of a
    single token, completions of one token and longer."""
    from model import Transformer

    hf, native, tok, tpl = chat
    model = Transformer.from_pretrained(native).eval()
    prompts = chat_prompts(tok, tpl, ["What is 2 plus 3?", "Hi there, you add numbers."]) + [[7]]
    G, rng = 3, random.Random(1)
    completions = [[rng.randrange(tok.vocab_size) for _ in range(n)] for n in (5, 1, 9, 2, 7, 1, 1, 4, 3)]
    batch = grpo.group_batch(prompts, completions, G, pad_id=0)
    assert batch["input_ids"].shape[0] == len(prompts)
    with torch.no_grad():
        logps, owner = grpo.completion_logprobs(model, batch, torch.device("cpu"))
        expected = []
        for k, c in enumerate(completions):
            ids = torch.tensor([prompts[k // G] + c])
            lp = hf(ids).logits[0].double().log_softmax(-1)
            start = len(prompts[k // G])
            expected += [lp[start - 1 + t, c[t]] for t in range(len(c))]
    assert owner.tolist() == [k for k, c in enumerate(completions) for _ in c]
    print("max |diff|", float((logps.double() - torch.stack(expected)).abs().max()))
    assert torch.allclose(logps.double(), torch.stack(expected), rtol=0, atol=1e-5), \
        (logps.double() - torch.stack(expected)).abs().max()


# -- the run ---------------------------------------------------------------------------------------------------
RUN_REWARDS_PY = '''
import re

def variety(prompts, completions, completion_ids, **kw):
    return [len(set(ids)) / len(ids) for ids in completion_ids]

def has_answer(prompts, completions, completion_ids, answer, **kw):
    text = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [None if a is None else float(bool(re.search(a, t))) for t, a in zip(text, answer)]
'''


def write_prompts(path, n=8):
    import json

    with open(path, "w") as f:
        for i in range(n):
            a, b = 3 * i + 1, 7 * i + 2
            record = {"prompt": f"What is {a} plus {b}?"} if i % 2 else \
                {"prompt": [{"role": "system", "content": "You add numbers."},
                            {"role": "user", "content": f"What is {a} plus {b}?"}]}
            f.write(json.dumps({**record, "answer": None if i == 3 else "[0-9]"}) + "\n")
    return path


@pytest.mark.parametrize("flags", [dict(), dict(loss_type="grpo", beta=0.04, num_iterations=2, epsilon_high=0.28,
                                                scale_rewards="batch")])
def test_grpo_runs_end_to_end(chat, tmp_path, flags):
    """A tiny model, 3 steps of 2 prompts x 2 micro-batches x G 4: metrics.jsonl with TRL's names,
    rollouts.jsonl with what was trained; the first step's loss is -sum(A n) / tokens (rho = 1, dapo) from the
    logged advantages, the advantages TRL's from the logged rewards; the output dir generates."""
    import json

    import generate as gen
    from sft_fixtures import metrics, to_argv

    _, native, tok, _ = chat
    rewards = tmp_path / "rewards.py"
    rewards.write_text(RUN_REWARDS_PY)
    out, G = tmp_path / "out", 4
    grpo.main(to_argv({"ckpt_paths": native, "template_config": "chatml",
                       "train_data_paths": f"jsonl:{write_prompts(tmp_path / 'prompts.jsonl')}",
                       "reward_funcs": [f"{rewards}:variety", f"{rewards}:has_answer"], "reward_weights": [1.0, 2.0],
                       "num_generations": G, "max_completion_length": 8, "micro_batch_size_per_gpu": 2,
                       "gradient_accum_steps": 2, "train_steps": 3, "lr": 1e-3, "output_dir": out, **flags}))
    m = metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3]
    for key in ("reward", "reward_std", "rewards/variety/mean", "rewards/has_answer/mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_max",
                "clip_ratio/region_mean", "loss", "grad_norm", "lr"):
        assert all(key in x and math.isfinite(x[key]) for x in m), key
    assert ("kl" in m[0]) == bool(flags.get("beta"))
    lines = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    mu = flags.get("num_iterations", 1)
    assert len(lines) == len(range(0, 3, mu)) * 2 * 2 * G and {x["step"] for x in lines} == set(range(1, 4, mu))
    first = [x for x in lines if x["step"] == 1]
    for x in first:
        assert 1 <= len(x["completion_ids"]) <= 8
        assert x["rewards"]["variety"] == len(set(x["completion_ids"])) / len(x["completion_ids"])
    expected_adv, _ = reference_advantages([x["reward"] for x in first], G, flags.get("scale_rewards", "group"))
    assert [x["advantage"] for x in first] == pytest.approx(expected_adv, abs=1e-6)
    assert 0 < m[0]["reward_std"] and m[0]["grad_norm"] > 0
    assert m[0]["completions/mean_length"] == pytest.approx(sum(len(x["completion_ids"]) for x in first) / len(first))
    tokens = sum(len(x["completion_ids"]) for x in first)
    if not flags:  # dapo, rho = 1, no KL: -sum(A n) / tokens
        assert m[0]["loss"] == pytest.approx(-sum(x["advantage"] * len(x["completion_ids"]) for x in first) / tokens,
                                             abs=1e-6)
    else:  # grpo: -mean(A) per completion at rho = 1, plus beta x KL = 0 (the reference is the policy)
        assert m[0]["kl"] == pytest.approx(0, abs=1e-6)
        assert m[0]["loss"] == pytest.approx(-sum(x["advantage"] for x in first) / len(first), abs=1e-6)
        assert m[1]["kl"] > 0  # the second iteration moved away from the reference
    assert {x["prompt"] if isinstance(x["prompt"], str) else "chat" for x in first} >= {"chat"}
    gen.main(["--ckpt_paths", str(out), "--prompt", "What is 1 plus 2?", "--max_new_tokens", "4"])


def test_two_processes_fsdp_and_ddp_agree(chat, tmp_path):
    """torchrun, 2 processes (gloo): rollouts gathered from FSDP2 shards for sampling sample what DDP's whole
    copies sample (same rewards), and the two train alike: losses, KL and gradient norms of both --num_iterations
    steps equal (1e-5 relative)."""
    from sft_fixtures import free_port, metrics, to_argv, torchrun

    _, native, _, _ = chat
    rewards = tmp_path / "r.py"
    rewards.write_text("def mod3(completion_ids, **kw):\n    return [float(sum(ids) % 3) for ids in completion_ids]\n")
    runs = {}
    for dp in ("fsdp", "ddp"):
        out = tmp_path / dp
        torchrun("train_grpo.py", to_argv({
            "ckpt_paths": native, "template_config": "chatml", "reward_funcs": f"{rewards}:mod3",
            "train_data_paths": f"jsonl:{write_prompts(tmp_path / 'prompts.jsonl')}", "num_generations": 4,
            "max_completion_length": 8, "micro_batch_size_per_gpu": 1, "gradient_accum_steps": 2, "train_steps": 2,
            "beta": 0.04, "num_iterations": 2, "dp": dp, "output_dir": out}), nproc=2, port=free_port())
        runs[dp] = metrics(out)
        assert (out / "rollouts.jsonl").read_text().count("\n") == 2 * 2 * 4
    for a, b in zip(runs["fsdp"], runs["ddp"]):
        assert a["reward"] == b["reward"] and a["reward_std"] > 0
        for k in ("loss", "kl", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-8), k


# -- gradients across micro-batches, accumulation and processes ----------------------------------------------
_optimizer_step = tc.optimizer_step


def fixed_rollouts(model, prompts, max_new_tokens, temperature, top_p, top_k, stop_ids, generator, pad_id, G):
    """generate_batch's stand-in: completions that depend on the prompt alone (not on the rank, the micro-batch
    or the weights), of lengths 1..max_new_tokens, some ended by a stop token."""
    out = []
    for p in prompts:
        for g in range(G):
            rng = random.Random(f"{p}/{g}")
            c = [rng.randrange(3, 200) for _ in range(rng.randint(1, max_new_tokens))]
            if rng.random() < 0.3:
                c[-1] = min(stop_ids)
            out.append(c)
    return out


def dumping_optimizer_step(run, loss, tokens):
    """tc.optimizer_step that first saves the step's whole gradients (gathered from FSDP2's shards) to
    $GRAD_DUMP, rank 0 writing."""
    import os

    grads = {}
    for name, p in run.model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name.removeprefix("module.")] = g.detach().clone()
    if run.d.main:
        torch.save(grads, os.environ["GRAD_DUMP"])
    return _optimizer_step(run, loss, tokens)


MOD5_PY = "def mod5(completion_ids, **kw):\n    return [float(sum(ids) % 5) for ids in completion_ids]\n"


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_gradients_equal_across_micro_batches_accumulation_and_processes(chat, tmp_path, monkeypatch, loss_type):
    """On the same rollouts (fixed completions, so sampling plays no part), the first step's gradients are the same
    for micro 1 x accum 8, micro 8 x accum 1 and (dapo) 2 FSDP processes x micro 1 x accum 4, to 1e-6 relative:
    the loss is normalised once over the whole step (TRL #5619's bug class)."""
    import generate

    from sft_fixtures import to_argv, torchrun_patched

    _, native, _, _ = chat
    rewards = tmp_path / "r.py"
    rewards.write_text(MOD5_PY)
    monkeypatch.setattr(generate, "generate_batch", fixed_rollouts)
    monkeypatch.setattr(tc, "optimizer_step", dumping_optimizer_step)

    def flags(out, micro, accum):
        return to_argv({"ckpt_paths": native, "template_config": "chatml", "reward_funcs": f"{rewards}:mod5",
                        "train_data_paths": f"jsonl:{write_prompts(tmp_path / 'prompts.jsonl')}",
                        "num_generations": 4, "max_completion_length": 8, "micro_batch_size_per_gpu": micro,
                        "gradient_accum_steps": accum, "train_steps": 1, "loss_type": loss_type, "output_dir": out})

    grads = {}
    for micro, accum in ((1, 8), (8, 1)):
        monkeypatch.setenv("GRAD_DUMP", str(tmp_path / f"g{micro}.pt"))
        grpo.main(flags(tmp_path / f"m{micro}", micro, accum))
        grads[micro] = torch.load(tmp_path / f"g{micro}.pt")
    if loss_type == "dapo":
        prelude = f"""
            import os, generate, train_common
            from test_train_grpo import fixed_rollouts, dumping_optimizer_step
            os.environ["GRAD_DUMP"] = {str(tmp_path / "g2.pt")!r}
            train_common.optimizer_step = dumping_optimizer_step
            generate.generate_batch = fixed_rollouts
        """
        torchrun_patched(tmp_path, prelude, "train_grpo.py", [*flags(tmp_path / "two", 1, 4), "--dp", "fsdp"])
        grads[2] = torch.load(tmp_path / "g2.pt")
    for other in [k for k in grads if k != 1]:
        assert grads[other].keys() == grads[1].keys()
        for name, g in grads[1].items():
            rel = float((grads[other][name] - g).norm() / g.norm().clamp(min=1e-30))
            assert rel <= 1e-6, (other, name, rel)
    assert sum(float(g.norm()) for g in grads[1].values()) > 0


def test_fsdp_ranks_decode_their_own_number_of_steps(chat, tmp_path):
    """Two FSDP2 processes whose rollouts stop at different lengths (rank 1 decodes 3 tokens, rank 0 up to 8):
    each decodes on its own gathered weights, nothing waits on the other."""
    from sft_fixtures import to_argv, torchrun_patched

    _, native, _, _ = chat
    rewards = tmp_path / "r.py"
    rewards.write_text(MOD5_PY)
    prelude = """
        import os, generate
        _generate_batch = generate.generate_batch
        def generate_batch(model, prompts, max_new_tokens, *args, **kwargs):
            n = max_new_tokens if os.environ["RANK"] == "0" else 3
            return _generate_batch(model, prompts, n, *args, **kwargs)
        generate.generate_batch = generate_batch
    """
    out = tmp_path / "out"
    torchrun_patched(tmp_path, prelude, "train_grpo.py", to_argv({
        "ckpt_paths": native, "template_config": "chatml", "reward_funcs": f"{rewards}:mod5",
        "train_data_paths": f"jsonl:{write_prompts(tmp_path / 'prompts.jsonl')}", "num_generations": 2,
        "max_completion_length": 8, "micro_batch_size_per_gpu": 1, "gradient_accum_steps": 1, "train_steps": 2,
        "dp": "fsdp", "dist_timeout": 0.5, "output_dir": out}))
    lengths = sorted(len(json.loads(x)["completion_ids"]) for x in (out / "rollouts.jsonl").open())
    assert lengths[0] <= 3 < lengths[-1], lengths


# -- resume, LoRA, validation, sources ------------------------------------------------------------------------
def stopping_rewards(path, signal_name: str, at_call: int, marker):
    """A reward file whose function sends its own process `signal_name` at its `at_call`-th call, once (a marker
    file remembers), then scores as mod5."""
    path.write_text(f"""
import os, signal
from pathlib import Path
calls = 0

def mod5(completion_ids, **kw):
    global calls
    calls += 1
    if calls == {at_call} and not Path({str(marker)!r}).exists():
        Path({str(marker)!r}).touch()
        os.kill(os.getpid(), signal.{signal_name})
    return [float(sum(ids) % 5) for ids in completion_ids]
""")
    return path


def test_resume_after_sigterm_and_kill9_reproduces_the_run(chat, tmp_path):
    """--num_iterations 2, 8 steps (rollout batches at steps 1, 3, 5, 7). SIGTERM during step 3's rollouts stops
    after step 3 with a checkpoint that holds the rollout batch in use (mid-batch); kill -9 during step 7's
    rollouts leaves the step 4 checkpoint and step 5's rollouts.jsonl lines after it. Each resumed run's
    rollouts.jsonl and losses equal the uninterrupted run's."""
    import subprocess
    import sys

    import parallel
    from sft_fixtures import REPO, env, metrics, to_argv

    _, native, _, _ = chat
    prompts = write_prompts(tmp_path / "prompts.jsonl")

    def flags(out, rewards, **more):
        return to_argv({"ckpt_paths": native, "template_config": "chatml", "reward_funcs": f"{rewards}:mod5",
                        "train_data_paths": f"jsonl:{prompts}", "num_generations": 4, "max_completion_length": 6,
                        "micro_batch_size_per_gpu": 2, "gradient_accum_steps": 1, "num_iterations": 2,
                        "train_steps": 8, "beta": 0.04, "lr": 1e-3, "output_dir": out, **more})

    full = tmp_path / "full"
    grpo.main(flags(full, stopping_rewards(tmp_path / "never.py", "SIGTERM", 0, tmp_path / "m0")))

    def same_as_full(out):
        assert (out / "rollouts.jsonl").read_text() == (full / "rollouts.jsonl").read_text()
        assert [m["step"] for m in metrics(out)] == list(range(1, 9))
        for a, b in zip(metrics(out), metrics(full), strict=True):
            for k in ("loss", "kl", "reward", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)

    out = tmp_path / "term"
    rewards = stopping_rewards(tmp_path / "term.py", "SIGTERM", 2, tmp_path / "m1")
    with pytest.raises(SystemExit) as e:
        grpo.main(flags(out, rewards))
    assert e.value.code == 143
    [latest] = parallel.checkpoint_dirs(out)
    assert latest.name == "step_00000003"
    assert torch.load(latest / "extra_rank0.pt", weights_only=False)["state"]["rollouts"]["iteration"] == 1
    grpo.main(flags(out, rewards, resume=True))
    same_as_full(out)

    out = tmp_path / "kill"
    rewards = stopping_rewards(tmp_path / "kill.py", "SIGKILL", 4, tmp_path / "m2")
    proc = subprocess.run([sys.executable, str(REPO / "train_grpo.py"), *flags(out, rewards, save_freq=4)],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in parallel.checkpoint_dirs(out)] == ["step_00000004"]
    assert {json.loads(x)["step"] for x in (out / "rollouts.jsonl").open()} == {1, 3, 5}
    grpo.main(flags(out, rewards, save_freq=4, resume=True))
    same_as_full(out)


def test_lora_with_its_adapters_off_as_the_reference(chat, tmp_path):
    """--lora --beta: the reference is the policy with its adapters off (B = 0 at the start, so the first step's
    KL is exactly 0; the second, after an update, is not); step checkpoints hold the adapters alone; the output
    dir generates."""
    import generate as gen
    import parallel
    from sft_fixtures import metrics, to_argv

    _, native, _, _ = chat
    rewards = tmp_path / "r.py"
    rewards.write_text(MOD5_PY)
    out = tmp_path / "out"
    grpo.main(to_argv({"ckpt_paths": native, "template_config": "chatml", "reward_funcs": f"{rewards}:mod5",
                       "train_data_paths": f"jsonl:{write_prompts(tmp_path / 'prompts.jsonl')}", "num_generations": 4,
                       "max_completion_length": 6, "micro_batch_size_per_gpu": 2, "num_iterations": 2, "train_steps": 3,
                       "beta": 0.1, "lora": True, "lora_rank": 4, "lora_alpha": 8, "lr": 1e-2, "save_freq": 1,
                       "max_checkpoints": 1, "output_dir": out}))
    m = metrics(out)
    assert m[0]["kl"] == 0 and m[1]["kl"] > 0
    from torch.distributed.checkpoint import FileSystemReader
    held = [k for k in FileSystemReader(str(parallel.checkpoint_dirs(out)[-1])).read_metadata().state_dict_metadata
            if k.startswith("model.")]
    assert held and all(".lora_" in k for k in held), held
    gen.main(["--ckpt_paths", str(out), "--prompt", "What is 1 plus 2?", "--max_new_tokens", "4"])


def test_validation_is_the_mean_reward_of_greedy_completions(chat, tmp_path):
    """--val_data_paths with --val_freq 2 over 3 steps: val/reward at steps 2 and 3; at step 3 it equals the mean
    reward of the saved model's greedy completions of the validation prompts, computed here."""
    from generate import generate_batch
    from model import Transformer
    from sft_fixtures import metrics, to_argv
    from tokenize_chat import stop_token_ids

    _, native, tok, tpl = chat
    rewards = tmp_path / "r.py"
    rewards.write_text(MOD5_PY)
    val = write_prompts(tmp_path / "val.jsonl", n=5)
    out = tmp_path / "out"
    grpo.main(to_argv({"ckpt_paths": native, "template_config": "chatml", "reward_funcs": f"{rewards}:mod5",
                       "train_data_paths": f"jsonl:{write_prompts(tmp_path / 'prompts.jsonl')}", "num_generations": 2,
                       "max_completion_length": 6, "micro_batch_size_per_gpu": 2, "train_steps": 3, "lr": 1e-2,
                       "val_data_paths": f"jsonl:{val}", "val_freq": 2, "output_dir": out}))
    m = metrics(out)
    assert ["val/reward" in x for x in m] == [False, True, True]
    model = Transformer.from_pretrained(out).eval()
    records, ids = __import__("generate").read_prompts_file(val, None, tok, tpl)
    completions = generate_batch(model, ids, 6, 0.0, stop_ids=stop_token_ids(tok, tpl), pad_id=tok.eos_id)
    expected = sum(sum(c) % 5 for c in completions) / len(completions)
    assert m[2]["val/reward"] == pytest.approx(expected, abs=1e-9)
    assert m[2]["val/rewards/mod5/mean"] == m[2]["val/reward"]
    assert m[2]["val/completions/mean_length"] == pytest.approx(sum(map(len, completions)) / len(completions))


def test_prompts_from_a_saved_dataset_with_its_columns_and_a_subset(chat, tmp_path, capsys):
    """A local: (save_to_disk) prompt source: its other columns reach the reward function by name,
    --train_num_samples draws a subset; a record that is not a prompt names its row."""
    import datasets

    from sft_fixtures import to_argv

    _, native, _, _ = chat
    rewards = tmp_path / "r.py"
    rewards.write_text("def uses_answer(completion_ids, answer, **kw):\n"
                       "    return [float(a) + len(c) for c, a in zip(completion_ids, answer)]\n")
    rows = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(10)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    base = {"ckpt_paths": native, "template_config": "chatml", "reward_funcs": f"{rewards}:uses_answer",
            "num_generations": 2, "max_completion_length": 4, "micro_batch_size_per_gpu": 2, "train_steps": 2,
            "output_dir": out}
    grpo.main(to_argv({**base, "train_data_paths": f"local:{tmp_path / 'ds'}", "train_num_samples": 4}))
    lines = [json.loads(x) for x in (out / "rollouts.jsonl").open()]
    answers = {r["prompt"]: r["answer"] for r in rows}
    for x in lines:
        assert x["reward"] == float(answers[x["prompt"]]) + len(x["completion_ids"])
    assert len({x["prompt"] for x in lines}) == 4  # 4 of the 10 prompts, each in one of 2 steps x 2 prompts
    datasets.Dataset.from_list([{"prompt": [{"role": "assistant", "content": "Hi"}], "answer": "1"}] * 4) \
        .save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(SystemExit) as e:
        grpo.main(to_argv({**base, "train_data_paths": f"local:{tmp_path / 'bad'}", "overwrite": True}))
    assert e.value.code == 1
    assert f"local:{tmp_path / 'bad'} [train] row 0: the last message is 'assistant'" in capsys.readouterr().err
