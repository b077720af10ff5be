"""Packing with per-document attention (model.segment_attention), packed preference pairs and prompt sharing.

References: the dense [T, T] mask through SDPA (tests/tiny.dense_mask), transformers' forward of each document
alone, transformers' log-probs of the unshared chosen and rejected sequences, and the padded runs of the same
trainers (a packed or shared run must reproduce their per-step losses and metrics)."""

import contextlib
import json
import math
import shutil
from collections import Counter

import pytest
import torch

import train_dpo
import train_sft
import train_simpo
from data import Loader, prepare_dataset, shared_prefix_length
from model import Transformer
from pref_fixtures import PAIR_KEYS, hf_response_logps, make_setup, pref_args
from sft_fixtures import free_port, metrics, to_argv, torchrun, write_chat_data
from tiny import dense_mask, native_model
from tokenize_chat import load_template, load_tokenizer

TOL = 1e-5


def rel_close(a, b, tol=TOL):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


# -- attention -----------------------------------------------------------------------------------------------
def layout(lengths_per_row, width, shared_rows=()):
    """segments [S, 5] and position_ids [R, T] for rows of documents of the given lengths, right padded to
    `width`. A row in `shared_rows` holds (prompt + chosen, rejected) pairs: lengths (L_c, L_r, S), the
    rejected piece being L_r - S tokens that continue after the first S tokens of the piece before it."""
    segments, positions = [], torch.zeros(len(lengths_per_row), width, dtype=torch.long)
    for r, docs in enumerate(lengths_per_row):
        p = 0
        for doc in docs:
            if r in shared_rows:
                lc, lr, s = doc
                segments += [(r, p, p + lc, p, p), (r, p + lc, p + lc + lr - s, p, p + s)]
                positions[r, p:p + lc] = torch.arange(lc)
                positions[r, p + lc:p + lc + lr - s] = torch.arange(s, lr)
                p += lc + lr - s
            else:
                segments.append((r, p, p + doc, p, p))
                positions[r, p:p + doc] = torch.arange(doc)
                p += doc
        assert p <= width
    return torch.tensor(segments), positions


@pytest.mark.parametrize("family", ["llama3", "qwen2-untied", "mistral-window"])
def test_segment_attention_equals_dense_mask_and_each_document_alone(tmp_path, family):
    """Rows with one document, several, many (with documents of length 1), shared-prompt pairs, and rows that end
    in padding: logits and every parameter's gradient equal the dense-mask reference; each document's logits
    equal transformers' forward of that document alone (a shared pair's rejected response: of prompt + rejected)."""
    overrides = {"sliding_window": 6} if family == "mistral-window" else {}
    hf, native = native_model(tmp_path, family.replace("-window", ""), **overrides)
    model = Transformer.from_pretrained(native)
    window = model.args.sliding_window
    rows = [[40], [7, 1, 12, 1, 3, 9], [1] * 10 + [5, 2, 8], [(9, 11, 6), (5, 4, 3)], [20, 13]]
    T = 40
    segments, positions = layout(rows, T, shared_rows={3})
    tokens = torch.randint(0, 512, (len(rows), T), generator=torch.Generator().manual_seed(1))
    real = torch.zeros(len(rows), T, dtype=torch.bool)
    for r, a, b, _, _ in segments.tolist():
        real[r, a:b] = True
    assert not real[4].all() and not real[2].all()  # rows ending in padding

    def run(**kw):
        model.zero_grad()
        logits = model(tokens, positions, **kw)
        (logits[real] * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed, grads = run(segments=segments)
    dense, dense_grads = run(mask=dense_mask(segments, len(rows), T, window))
    assert (packed[real] - dense[real]).abs().max() <= TOL
    for n in grads:
        assert (grads[n] - dense_grads[n]).abs().max() <= TOL * max(1.0, dense_grads[n].abs().max()), n
    with torch.no_grad():
        worst = 0.0
        for r, a, b, pa, pb in segments.tolist():
            ids = torch.cat([tokens[r, pa:pb], tokens[r, a:b]])[None]
            alone = hf(ids).logits[0, pb - pa:]
            worst = max(worst, (packed[r, a:b] - alone).abs().max().item())
    assert worst <= 1e-4, worst  # fp32 through two implementations
    # causal attention over the whole row lets documents see their neighbours: the test can tell
    leaky = model(tokens, positions).detach()
    assert (leaky[real] - packed[real]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_flex_attention_path_equals_segment_attention(tmp_path, family, monkeypatch):
    """The CUDA path (FlexAttention with block masks built once per batch), forced on the CPU
    (model.PACKED_KERNEL) and run eagerly, FlexAttention through its own compiled function: its mask_mod allows
    exactly the dense reference's keys for every real query and none for padding, and the model's logits equal
    segment_attention's at every position, padding included. Gemma 3 has global and sliding-window layers, so
    both block masks are exercised. (Gradients: the compiled-blocks test below, and the dense mask above.)"""
    from torch.nn.attention.flex_attention import create_mask

    import model as model_module
    model = Transformer.from_pretrained(native_model(tmp_path, family)[1])
    rows = [[40], [7, 1, 12, 1, 3, 9], [(9, 11, 6), (5, 4, 3)], [20, 13]]
    T = 40
    segments, positions = layout(rows, T, shared_rows={2})
    real = torch.zeros(len(rows), T, dtype=torch.bool)
    for r, a, b, _, _ in segments.tolist():
        real[r, a:b] = True
    for window in (None, model.args.sliding_window):
        mask = create_mask(model_module.segment_mask_mod(segments, len(rows), T, window), len(rows), 1, T, T)
        dense = dense_mask(segments, len(rows), T, window)
        assert torch.equal(mask[:, 0][real], dense[:, 0][real]) and not mask[:, 0][~real].any()
    tokens = torch.randint(0, 512, (len(rows), T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(tokens, positions, segments=segments)
        monkeypatch.setattr(model_module, "PACKED_KERNEL", "flex")
        flex = model(tokens, positions, segments=segments)
    assert (flex - reference).abs().max() <= TOL


@contextlib.contextmanager
def compiled_path(monkeypatch, kernel="flex"):
    """--compile's CUDA path, on the CPU: FlexAttention forced (model.PACKED_KERNEL; or "sdpa", the CPU's own)
    and blocks compiled by aot_eager (the graphs inductor would turn into kernels), counted per compiled function
    (frame). Torch's recompile limit is 4 and hitting it an error: by default it is 8, after which torch runs the
    code uncompiled and FlexAttention materialises every score. Yields (backend for apply_compile, the counts)."""
    import torch.nn.attention.flex_attention as fa

    import model as model_module

    # torch 2.13 refuses FlexAttention's backward on CPU in this front-end check alone; the math implementation
    # aot_eager runs (the dense forward and backward of the flex_attention op) has one. The check runs on.
    validate = fa._validate_device
    monkeypatch.setattr(fa, "_validate_device", lambda q, k, v: validate(q.detach(), k.detach(), v.detach()))
    monkeypatch.setattr(model_module, "PACKED_KERNEL", kernel)
    graphs, aot_eager = Counter(), torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs[torch._guards.CompileContext.current_compile_id().frame_id] += 1
        return aot_eager(gm, example_inputs)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
            yield backend, graphs
    finally:
        torch._dynamo.reset()


def small_native_model(tmp_path, family):
    """Two layers (Gemma 3: a sliding-window one, then a global one) of two query heads sharing a key-value head:
    off CUDA, each FlexAttention call evaluates mask_mod on [rows, heads, T, T]."""
    small = dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    if family == "gemma3":
        small["layer_types"] = ["sliding_attention", "full_attention"]
    return native_model(tmp_path, family, **small)[1]


def varied_batches(tmp_path):
    """Loaders of the same documents with and without fixed_shape (rows of capacity 130: one 128-token block and
    two more tokens), and twelve steps' rows: at their own shape, T = 130, 120, 1, 129, 25, 1 (a filler row),
    130, 130, 45, 64, 70, 105, on two rows or one."""
    import numpy as np

    from data import TokenizedDataset

    lengths = [70, 60, 100, 30, 120, 1, 129, 64, 64, 10, 10, 5, 20, 130, 90, 40, 2, 3, 45]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(0)
    ds = TokenizedDataset(tmp_path, {"max_seq_len": 130, "kind": "sft"}, rng.integers(0, 512, offsets[-1]).astype(
        np.uint32), (rng.random(offsets[-1]) < 0.8).astype(np.uint8), offsets.astype(np.int64))
    fixed, natural = (Loader(ds, 2, pack=True, shuffle=False, fixed_shape=f) for f in (True, False))
    steps = [[[0, 1], [2, 3]], [[4]], [[5]], [[6], [7, 8]], [[9, 10, 11], [12]], [[]], [[13]], [[14, 15], [16, 17]],
             [[18]], [[7], [8]], [[0], [5]], [[2, 17, 16], [3]]]
    return fixed, natural, steps


def packed_forward(model, batch, kernel=None):
    import model as model_module

    if kernel:  # the eager reference: segment_attention
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model_module, "PACKED_KERNEL", kernel)
            return model(batch["input_ids"], batch["position_ids"], segments=batch["segments"])
    return model(batch["input_ids"], batch["position_ids"], segments=batch["segments"])


def same(a, b):  # a gradient no pass reached (a filler batch's attention, eager) is None: zero
    a, b = (torch.zeros(1) if x is None or not x.numel() else x for x in (a, b))
    return (a - b).abs().max() <= TOL * max(1.0, b.abs().max())


@pytest.mark.parametrize("family,kernel", [("llama3", "flex"), ("gemma3", "flex"), ("llama3", "sdpa")])
def test_compiled_packed_path_keeps_few_graphs_and_equals_segment_attention(tmp_path, monkeypatch, family, kernel):
    """--compile on the CUDA path (FlexAttention, see compiled_path) and on the CPU's (segment_attention, whose
    segment tuples the compiled blocks pass along unread: model.Segments): each block compiled (apply_compile), packed
    batches of one shape (data.Loader's fixed_shape), a model without and one with activation checkpointing.
    Twelve training batches of every kind (varied_batches: one token, under a block, a block and one, the row
    capacity, fewer rows, a filler row), validation passes (eval, no_grad) and reference passes (a frozen
    compiled copy, no_grad) compile at most 4 graphs per compiled function; Gemma 3's global and sliding-window
    layers share theirs. Logits and every gradient equal segment_attention's, eager, on the same batch at its
    own shape."""
    import parallel

    native = small_native_model(tmp_path, family)
    plain, checkpointed, eager = (Transformer.from_pretrained(native) for _ in range(3))
    frozen = Transformer.from_pretrained(native).requires_grad_(False).eval()
    parallel.apply_activation_checkpointing(checkpointed)
    fixed, natural, steps = varied_batches(tmp_path)
    weights = torch.linspace(-1, 1, 512)
    with compiled_path(monkeypatch, kernel) as (backend, graphs):
        for model in (plain, checkpointed, frozen):
            parallel.apply_compile(model, backend=backend)
        for i, rows in enumerate(steps):
            want, batch = natural.collate(rows), fixed.collate(rows)
            R, T = want["input_ids"].shape
            assert batch["input_ids"].shape == (2, 130)
            real = want["document_ids"] >= 0
            outputs = []
            for model in (eager, plain, checkpointed):
                model.zero_grad()
                logits = (packed_forward(eager, want, "sdpa") if model is eager else packed_forward(model, batch))
                (logits[:R, :T][real] * weights).sum().backward()
                outputs.append((logits[:R, :T][real].detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad
                                                                for n, p in model.named_parameters()}))
            (ref, ref_grads), *compiled = outputs
            for got, got_grads in compiled:
                assert same(got, ref), (i, rows)
                assert all(same(got_grads[n], g) for n, g in ref_grads.items()), (i, rows)
            if i % 6 == 5:  # validation (eval), the reference: no grad
                with torch.no_grad():
                    ref = packed_forward(eager, want, "sdpa")[real]
                    for model in (plain, checkpointed, frozen):
                        model.eval()
                        assert same(packed_forward(model, batch)[:R, :T][real], ref), i
                    plain.train(), checkpointed.train()
        assert graphs and max(graphs.values()) <= 4, graphs


def test_compiled_lora_policy_and_its_adapters_off_reference_keep_few_graphs(tmp_path, monkeypatch):
    """DPO's usual reference with LoRA is the policy with its adapters off, in train and eval mode (train and
    validation steps): with --compile that is one more graph, not one per mode (no dropout, no module reading
    `training`). Training graphs (the first layer's input needs no gradient under LoRA, the others' do), the
    no-grad graph and the adapters-off graph: 4 per compiled function, the limit. Adapters off, the compiled
    policy's logits are the base model's."""
    import lora
    import parallel

    native = small_native_model(tmp_path, "llama3")
    policy, base = Transformer.from_pretrained(native), Transformer.from_pretrained(native)
    lora.apply_lora(policy, 2, 4)
    lora.mark_trainable(policy)
    fixed, natural, steps = varied_batches(tmp_path)
    with compiled_path(monkeypatch) as (backend, graphs):
        parallel.apply_compile(policy, backend=backend)
        for i, rows in enumerate(steps[:6]):
            want, batch = natural.collate(rows), fixed.collate(rows)
            R, T = want["input_ids"].shape
            real = want["document_ids"] >= 0
            policy.zero_grad()
            packed_forward(policy, batch)[:R, :T][real].square().mean().backward()
            with torch.no_grad():
                for p in policy.parameters():  # an update, so that the adapters change the logits
                    if p.grad is not None:
                        p -= 0.1 * p.grad
                ref = packed_forward(base, want, "sdpa")[real]
                for mode in (True, False):
                    policy.train(mode)
                    lora.set_adapters(policy, False)
                    assert same(packed_forward(policy, batch)[:R, :T][real], ref), i
                    lora.set_adapters(policy, True)
                    if i and real.any():
                        assert not same(packed_forward(policy, batch)[:R, :T][real], ref), i
                policy.train()
        assert graphs and max(graphs.values()) <= 4, graphs


# -- prompt sharing ------------------------------------------------------------------------------------------
def pref_records():
    """Multi-turn prompts, responses that share their first words (the common prefix runs past the prompt into
    the response, which must not be shared), a prompt-completion record, and lengths that vary."""
    recs = []
    for i in range(9):
        prompt = [{"role": "user", "content": f"What is {i} plus {i + 3}?"}]
        if i % 3 == 1:
            prompt = [{"role": "system", "content": "You add numbers."}, *prompt,
                      {"role": "assistant", "content": f"{2 * i + 3}."}, {"role": "user", "content": "And doubled?"}]
        same_start = "The answer is" if i % 2 else ""
        recs.append({"chosen": prompt + [{"role": "assistant", "content": f"{same_start} {2 * i + 3}. Indeed." * (1 + i % 3)}],
                     "rejected": prompt + [{"role": "assistant", "content": f"{same_start} {2 * i + 4}."}]})
    recs.append({"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "5. You add numbers."})
    return recs


@pytest.fixture(scope="module")
def pref(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    setup = make_setup(root)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pref_records()))
    tok = load_tokenizer(setup["native"])
    ds = prepare_dataset([f"jsonl:{data}"], tok, load_template("chatml.yaml", tok), 96, kind="preference",
                         cache_dir=root / "cache", progress=False)
    return {**setup, "pairs": data, "ds": ds, "tok": tok}


def test_shared_prompt_logps_equal_transformers_unshared(pref):
    """Every pair's s and n from one packed, shared-prompt forward equal transformers' log-probs of the full
    chosen and rejected sequences, each alone."""
    import train_common as tc

    ds, tok = pref["ds"], pref["tok"]
    shared = [shared_prefix_length(ds, i) for i in range(len(ds))]
    assert all(s > 0 for s in shared)
    for i, s in enumerate(shared):  # the shared part is identical and untrained, and predicts no trained token
        (c, cm), (r, rm) = ds[i]
        assert (c[:s] == r[:s]).all() and not cm[:s + 1].any() and not rm[:s + 1].any()
    starts_alike = [i for i in range(len(ds)) if ds[i][0][0][shared[i] + 1] == ds[i][1][0][shared[i] + 1]]
    assert starts_alike  # responses sharing their first tokens: the common prefix is longer than what is shared
    model = Transformer.from_pretrained(pref["native"])
    loader = Loader(ds, 2, pack=True, share_prompt=True, shuffle=False, pad_id=tok.eos_id)
    seen = []
    for batch in loader:
        with torch.no_grad():
            s, n = tc.response_logps(model, batch, "cpu")
        ids = batch["sample_ids"].tolist()
        want_s, want_n = hf_response_logps(pref["hf"], ds, ids)
        assert n.tolist() == want_n.tolist()
        assert (s.double() - want_s).abs().max() <= TOL * max(1.0, want_s.abs().max()), (s, want_s)
        lengths = ds.doc_lengths
        assert int(batch["tokens"]) == sum(int(lengths[2 * i] + lengths[2 * i + 1]) for i in ids)  # unshared count
        assert int((batch["document_ids"] >= 0).sum()) == int(batch["tokens"]) - sum(shared[i] for i in ids)
        seen += ids
    assert sorted(seen) == list(range(len(ds)))


# -- trainers: packed and shared runs reproduce the padded ones ----------------------------------------------
PREF_STEPS = dict(micro_batch_size_per_gpu=2, gradient_accum_steps=8, train_epochs=3, lr=5e-3, warmup_steps=0)


def pref_run(module, pref, out, **kw):
    module.main(pref_args(pref, out, train_data_paths=f"jsonl:{pref['pairs']}", train_steps=None,
                          **{**PREF_STEPS, **kw}))
    return metrics(out)


def assert_same_steps(a, b, keys):
    assert len(a) == len(b) >= 3
    for x, y in zip(a, b):
        for k in keys:
            if k == "rewards/accuracies" and max(abs(x["rewards/margins"]), abs(y["rewards/margins"])) < 1e-5:
                continue  # reference = policy: 1[r_w > r_l] compares two rounding errors of 0 (margins are checked)
            assert rel_close(x[k], y[k]), (x["step"], k, x[k], y[k])
        assert x["tokens"] == y["tokens"]


@pytest.mark.parametrize("module", [train_dpo, train_simpo])
def test_packed_and_shared_preference_runs_equal_the_padded_run(pref, tmp_path, module):
    """Each optimizer step sees every pair (one epoch, accumulated), three epochs: padded, packed without and
    with a shared prompt give the same losses and metrics at every step, and DPO's first loss is ln 2."""
    padded = pref_run(module, pref, tmp_path / "padded")
    packed = pref_run(module, pref, tmp_path / "packed", pack_samples=True, **{"no-share_prompt": True})
    shared = pref_run(module, pref, tmp_path / "shared", pack_samples=True)  # sharing is on with packing
    assert json.loads((tmp_path / "shared" / "train_args.json").read_text())["share_prompt"] is True
    keys = ("loss", "grad_norm", *PAIR_KEYS)
    assert_same_steps(packed, padded, keys)
    assert_same_steps(shared, padded, keys)
    if module is train_dpo:
        assert abs(padded[0]["loss"] - math.log(2)) <= 1e-6 and abs(shared[0]["loss"] - math.log(2)) <= 1e-6
    assert padded[-1]["loss"] < padded[0]["loss"] - 1e-3  # it trained


def test_packed_preference_runs_with_lora_compile_checkpointing_and_resume(pref, tmp_path):
    """Shared-prompt DPO with LoRA, --reference model (the adapters-off policy), activation checkpointing and
    torch.compile equals the padded run; a run resumed from its step-1 checkpoint continues it exactly."""
    lora = dict(lora=True, lora_rank=4, lora_alpha=8, lr=2e-2, reference="model")
    padded = pref_run(train_dpo, pref, tmp_path / "padded", **lora)
    shared = pref_run(train_dpo, pref, tmp_path / "shared", pack_samples=True, activation_checkpointing=True,
                      compile=True, save_freq=1, **lora)
    assert_same_steps(shared, padded, ("loss", "grad_norm", *PAIR_KEYS))
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "shared", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000002")
    (resumed / "consolidated.00.pth").unlink()  # else --resume finds the run finished and leaves it
    again = pref_run(train_dpo, pref, resumed, pack_samples=True, save_freq=1, resume=True, **lora)
    assert [m["step"] for m in again] == [1, 2, 3]  # step 1 kept from the checkpointed run, 2 and 3 trained again
    assert_same_steps(again, shared, ("loss", "grad_norm", *PAIR_KEYS))


@pytest.mark.parametrize("script,dp", [("train_dpo.py", "fsdp"), ("train_simpo.py", "ddp")])
def test_two_process_shared_runs_equal_one_process_padded(pref, tmp_path, script, dp):
    module = {"train_dpo.py": train_dpo, "train_simpo.py": train_simpo}[script]
    padded = pref_run(module, pref, tmp_path / "padded")
    out = tmp_path / "two"
    torchrun(script, pref_args(pref, out, train_data_paths=f"jsonl:{pref['pairs']}", train_steps=None,
                               pack_samples=True, dp=dp, **{**PREF_STEPS, "micro_batch_size_per_gpu": 1}),
             nproc=2, port=free_port())
    assert_same_steps(metrics(out), padded, ("loss", "grad_norm", *PAIR_KEYS))


def test_packed_sft_equals_padded_over_steps_with_two_processes(pref, tmp_path):
    """SFT: each step one epoch of chat data, accumulated; packed on 2 processes (FSDP) = padded on 1."""
    data = write_chat_data(tmp_path / "chat.jsonl", n=12)
    flags = {"ckpt_paths": pref["native"], "template_config": "chatml.yaml", "train_data_paths": f"jsonl:{data}",
             "max_seq_len": 96, "lr": 2e-3, "micro_batch_size_per_gpu": 2, "gradient_accum_steps": 8,
             "train_epochs": 3, "data_cache_dir": tmp_path / "cache", "seed": 42}
    train_sft.main(to_argv({**flags, "output_dir": tmp_path / "padded"}))
    torchrun("train_sft.py", to_argv({**flags, "output_dir": tmp_path / "packed", "pack_samples": True,
                                      "micro_batch_size_per_gpu": 1}), nproc=2, port=free_port())
    assert_same_steps(metrics(tmp_path / "packed"), metrics(tmp_path / "padded"), ("loss", "grad_norm"))


def test_long_pairs_follow_the_length_policy_and_always_fit_a_row(pref, tmp_path):
    """Sides longer than --max_seq_len are cut by the length policy (and counted as truncated), so a pair is at
    most 2 x max_seq_len unshared: every pair fits a packed row whole, shared or not, and none is lost."""
    recs = [{"prompt": "What is 2 plus 2?", "chosen": "4. Indeed." * (3 + i), "rejected": "5." * (2 + 4 * i)}
            for i in range(6)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = pref["tok"]
    ds = prepare_dataset([f"jsonl:{data}"], tok, load_template("chatml.yaml", tok), 40, kind="preference",
                         cache_dir=tmp_path / "cache", progress=False)
    stats = ds.stats  # what the policy did is counted: truncated sides, dropped pairs (no trained token left)
    assert stats["truncated"] > 0 and len(ds) + sum(stats["dropped"].values()) == len(recs) and len(ds) >= 3
    for share in (False, True):
        loader = Loader(ds, 1, pack=True, share_prompt=share, shuffle=False)
        seen = [i for b in loader for i in b["sample_ids"].tolist()]
        assert sorted(seen) == list(range(len(ds)))
        assert all(len(row) >= 1 for row in loader.rows(0)) and loader.lengths.max() <= loader.capacity == 80
