"""memory_plan.py against measurements: what a block keeps for backward (saved_tensors_hooks, exact), the live
bytes of whole training steps (a dispatch mode that follows every tensor's storage, within 5%), and the peak RSS
of real trainer processes (metrics.jsonl's memory_gb, within 15%); the --plan command line; the docs' table.

The long sweep (every combination, DPO and SimPO, two processes): pytest -m slow tests/test_memory_plan.py
"""

import json
import random
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import memory_plan as mp
from model import ModelArgs, Transformer
from sft_fixtures import REPO, env, free_port, metrics, to_argv, train_bpe_tokenizer

# Small shapes with every structural feature the formula has a term for: GQA (3 query heads per kv head),
# head_dim != dim / n_heads, QK-norm per head (Qwen3) and over the projection (OLMo 2), norms after the sublayers
# only (OLMo 2) or as well (Gemma 3).
SHAPES = {
    "llama": dict(dim=96, n_heads=6, n_kv_heads=2, multiple_of=32),
    "qwen3": dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=24, qk_norm="head", multiple_of=32),
    "olmo2": dict(dim=64, n_heads=4, n_kv_heads=4, qk_norm="full", pre_norm=False, post_norm=True, multiple_of=32),
    "gemma3": dict(dim=64, n_heads=4, n_kv_heads=1, head_dim=32, qk_norm="head", post_norm=True,
                   norm_unit_offset=True, activation="gelu_tanh", multiple_of=32),
}
TARGET_SETS = [None, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), ("wq", "wv"), ("w1", "w3"), ("w2",), ("wo",)]


def model_for(args: ModelArgs, mode: str, targets, rank: int = 4):
    """A model as the trainers hold it: fp32; FSDP2's bf16 compute copies ("cast"); or under autocast, a full
    fine-tune fp32 and a LoRA run's base bf16 with fp32 adapters (train_common.load_model)."""
    import lora

    torch.manual_seed(0)
    model = Transformer(args)
    if mode == "cast" or (mode == "autocast" and targets):
        model.to(torch.bfloat16)
    if targets:
        lora.apply_lora(model, rank, 2 * rank, 0.0, targets)
        lora.mark_trainable(model)
        if mode == "cast":
            model.to(torch.bfloat16)
    return model


def saved_per_token(args: ModelArgs, mode: str, targets, rank: int = 4) -> float:
    """Bytes one block keeps for backward per token: the distinct storages autograd's saved-tensor hooks see
    (parameters and the shared rotary tables left out), at two lengths, differenced."""
    model = model_for(args, mode, targets, rank)
    skip = {p.untyped_storage()._cdata for p in model.parameters()}
    sizes = []
    for T in (16, 48):
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage._cdata not in skip:
                seen[storage._cdata] = storage.nbytes()
            return t
        dtype = torch.float32 if mode == "fp32" or (mode == "autocast" and not targets) else torch.bfloat16
        # not a leaf, as the embeddings' output is not: autocast caches its casts of leaves (a weight's)
        x = torch.randn(2, T, args.dim, dtype=dtype, requires_grad=True) * 1
        angles = torch.arange(T)[None, None, :, None].float() * model.inv_freq
        cos, sin = angles.cos(), angles.sin()
        skip |= {cos.untyped_storage()._cdata, sin.untyped_storage()._cdata}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.layers[0](x, cos, sin, None, 0, None)
        sizes.append(sum(seen.values()))
    return (sizes[1] - sizes[0]) / (2 * (48 - 16))


@pytest.mark.parametrize("family", SHAPES)
@pytest.mark.parametrize("mode", ["fp32", "cast", "autocast"])
def test_block_activations_match_saved_tensors(family, mode):
    args = ModelArgs(n_layers=1, vocab_size=64, **SHAPES[family])
    for targets in TARGET_SETS:
        predicted = mp.block_bytes_per_token(args, 4 if mode == "fp32" else 2, targets, lora_rank=4,
                                             autocast=mode == "autocast")
        assert predicted == saved_per_token(args, mode, targets), (family, mode, targets)


# -- whole steps, in this process: the live bytes of every storage --------------------------------------------
class LiveBytes(TorchDispatchMode):
    """The bytes of the CPU storages alive, and their peak: every op's outputs are followed until their storage
    is freed (a weak reference to it), plus the tensors given at the start (the parameters). What the
    allocator holds, before glibc's own retention.

    One difference from a plain run: under any dispatch mode autograd treats tensors as subclasses and adds
    gradients that meet out of place (InputBuffer, AccumulateGrad), where it would add them in place; a sum of
    two large gradients then shows one tensor more. The cases below avoid that (tied embeddings accumulating
    across micro-batches would show one [V, dim] more than a real run: the RSS tests cover them)."""

    def __init__(self, *tensors):
        super().__init__()
        self.sizes, self.refs, self.current, self.peak = {}, {}, 0, 0
        for t in tensors:
            self.track(t)

    def track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.sizes:
            self.sizes[key] = storage.nbytes()
            self.refs[key] = weakref.ref(storage, lambda _, key=key: self.free(key))
            self.current += self.sizes[key]
            self.peak = max(self.peak, self.current)

    def free(self, key):
        self.current -= self.sizes.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def live_peak(args: ModelArgs, batch: int, seq: int, lora_on: bool, ac: bool, accum: int, bf16: bool) -> int:
    """Peak live bytes of two optimizer steps as the trainers take them (train_common.load_model's dtypes,
    parallel's activation checkpointing, build_optimizer, clipping, set_to_none), one process."""
    import lora
    import parallel
    import train_common as tc

    torch.manual_seed(0)
    model = Transformer(args)
    if lora_on:
        model.to(torch.bfloat16 if bf16 else torch.float32)
        lora.apply_lora(model, 16, 16.0)
        lora.mark_trainable(model)
    if ac:
        parallel.apply_activation_checkpointing(model)
    optimizer = tc.build_optimizer(model, 1e-4, 0.0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq))
    with LiveBytes(*model.parameters()) as live:
        for _ in range(2):
            for _ in range(accum):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = -model(tokens, labels=tokens).sum() / tokens.numel()
                loss.backward()
                del loss
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return live.peak


# Each moment of the plan at the peak: a small vocabulary, where the blocks' activations and backward's workspace
# set it; a large one in several logits chunks, where the output projection's gradient does; and few tokens with
# tied embeddings, where the gradients at the end of backward and AdamW's temporaries do.
STEP_SHAPES = {"blocks": (dict(dim=128, n_layers=3, n_heads=4, n_kv_heads=1, vocab_size=512, multiple_of=128), 2, 128),
               "logits": (dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=65536, multiple_of=64), 2, 160),
               "gradients": (dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=65536, multiple_of=64,
                                  tie_word_embeddings=True), 1, 64)}


@pytest.mark.parametrize("shape,lora_on,ac,accum,bf16", [
    ("blocks", False, False, 1, False), ("blocks", True, False, 2, False), ("blocks", False, True, 2, True),
    ("blocks", True, True, 1, True), ("logits", False, False, 2, False), ("logits", True, True, 1, False),
    ("gradients", False, True, 1, False),
])
def test_step_live_bytes_match_the_plan(shape, lora_on, ac, accum, bf16):
    """fp32 as CPU runs train, and bf16 through autocast as one GPU process does (dp none)."""
    shape, batch, seq = STEP_SHAPES[shape]
    args = ModelArgs(**shape)
    measured = live_peak(args, batch, seq, lora_on, ac, accum, bf16)
    plan = mp.plan_memory(args, micro_batch_size=batch, max_seq_len=seq, gradient_accum_steps=accum,
                          activation_checkpointing=ac, lora=lora_on, dp="none",
                          param_dtype="bf16" if bf16 else "auto", gpus="cpu")
    predicted = plan.peak - plan.process
    assert abs(predicted / measured - 1) < 0.05, (measured, predicted, plan.at)


# -- the plan's arithmetic -----------------------------------------------------------------------------------
def test_sharding_and_flags_move_the_parts_they_name():
    import lora

    assert mp.LORA_TARGETS == lora.DEFAULT_TARGETS  # a copy: memory_plan imports model.py only
    args = mp.MODELS["Llama-3.1-8B"]
    P = mp.parameter_counts(args)["total"]
    assert P == 8_030_261_248  # Llama-3.1-8B's published count
    assert mp.parameter_counts(mp.MODELS["Llama-3.1-70B"])["total"] == 70_553_706_496
    one, two = (mp.plan_memory(args, gpus="8x80GB", nnodes=k, max_seq_len=4096) for k in (1, 2))
    assert (one.weights, one.optimizer) == (P * 4 // 8, P * 8 // 8)
    assert two.weights == P * 4 // 16 and two.activations == one.activations
    accum = dict(gpus="8x80GB", max_seq_len=4096, gradient_accum_steps=4)
    every, last = mp.plan_memory(args, **accum), mp.plan_memory(args, **accum, fsdp_grad_sync="last")
    assert last.gradients - every.gradients == P * 4  # unsharded fp32 between micro-batches
    ddp = mp.plan_memory(args, gpus="2x80GB", dp="ddp", max_seq_len=4096)
    assert ddp.weights == P * 4 and ddp.gradients == 2 * P * 4  # replicated, and DDP's buckets
    sft = mp.plan_memory(args, max_seq_len=4096, micro_batch_size=2)
    pairs = mp.plan_memory(args, max_seq_len=4096, preference=True)
    assert pairs.tokens == sft.tokens == 8192 and pairs.activations == sft.activations
    ref = mp.plan_memory(args, max_seq_len=4096, preference=True, reference="model")
    assert ref.reference == P * 2 // 8  # a bf16 copy, sharded
    lora_ref = mp.plan_memory(args, max_seq_len=4096, preference=True, reference="model", lora=True)
    assert lora_ref.reference == 0  # the adapters-off policy
    ac = mp.plan_memory(args, max_seq_len=4096, activation_checkpointing=True)
    assert ac.activations < one.activations / 10
    mb = mp.largest_micro_batch(args, max_seq_len=4096, gpus="8x80GB")
    assert mp.fits_with_margin(mp.plan_memory(args, max_seq_len=4096, micro_batch_size=mb))
    assert not mp.fits_with_margin(mp.plan_memory(args, max_seq_len=4096, micro_batch_size=mb + 1))


def test_gpus_spec():
    assert mp.parse_gpus("8x80GB") == (8, 80 * mp.GiB, "cuda")
    assert mp.parse_gpus("141GB") == (1, 141 * mp.GiB, "cuda")
    assert mp.parse_gpus("2xcpu") == (2, 0, "cpu")
    with pytest.raises(ValueError, match="8x80GB"):
        mp.parse_gpus("eight")


def test_plan_flag_reads_params_json_only(tmp_path):
    """--plan with a dir holding params.json and nothing else (no weights, no tokenizer, no data): the plan on
    stdout, exit 0, no output dir."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "params.json").write_text(json.dumps(mp.MODELS["Llama-3.1-8B"].to_json()))
    argv = ["--ckpt_paths", tmp_path / "m", "--template_config", "llama3_instruct.yaml", "--train_data_paths",
            f"jsonl:{tmp_path / 'missing.jsonl'}", "--output_dir", tmp_path / "out", "--max_seq_len", "4096",
            "--reference", "model", "--plan", "--plan_gpus", "8x80GB", "--plan_nnodes", "2"]
    result = subprocess.run([sys.executable, str(REPO / "train_dpo.py"), *map(str, argv)], env=env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for part in ("weights", "gradients", "optimizer state", "activations", "logits", "gathered params",
                 "reference model", "peak"):
        assert f"  {part} " in result.stdout
    assert "16 ranks" in result.stdout and "of 80.00 GiB per GPU" in result.stdout
    assert not (tmp_path / "out").exists()


def test_docs_table_is_the_generated_one():
    """docs/memory.md holds `python memory_plan.py --table` as printed: regenerate it when the planner changes."""
    text = (REPO / "docs" / "memory.md").read_text()
    assert mp.table() in text


# -- real trainer processes: peak RSS ---------------------------------------------------------------------------
# A random Llama big enough that the parts show above the process: 40M parameters (most in a 131,072-row
# vocabulary, which costs little compute when few positions are trained), 8 blocks of dim 256, and
# conversations of ~480 tokens of which ~10 are trained. Tied embeddings: the tokenizer uses 512 rows, and a
# frozen untied embedding table (LoRA) would stay mostly unread in the memory-mapped checkpoint, never resident.
RSS_MODEL = dict(dim=256, n_layers=8, n_heads=4, n_kv_heads=1, vocab_size=131072, multiple_of=256,
                 tie_word_embeddings=True)
# glibc raises its mmap threshold as large blocks are freed, after which freed memory stays in its heap: the
# resident set then sits up to ~0.25 GiB (about 25% here) above what is live, depending on the order of frees.
# Pinned at its default (128 KiB), freed tensors go back to the system and peak RSS measures the peak of live
# memory, which is what the plan predicts.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def fresh_process(cmd: list) -> list:
    """cmd started from a shell that forks it. Linux keeps ru_maxrss across exec, and a child that Python's
    subprocess starts (vfork) begins with its parent's high-water mark: this pytest process's, after the tests
    above. A fork from the small shell starts the count afresh."""
    import shlex

    return ["/bin/sh", "-c", shlex.join(map(str, cmd)) + "; exit $?"]  # a second command: no exec shortcut


def write_conversations(path: Path, n: int, questions: int, seed: int = 0, preference: bool = False) -> Path:
    """A long user turn (untrained) and a short answer (trained): rows fill up without the output projection's
    compute growing."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            user = " ".join(f"What is {rng.randint(1, 99)} plus {rng.randint(1, 99)}?" for _ in range(questions))
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            answer = lambda c: [{"role": "user", "content": user},  # noqa: E731
                                {"role": "assistant", "content": f"{a} plus {b} is {c}. Indeed."}]
            record = {"chosen": answer(a + b), "rejected": answer(a + b + 1)} if preference else \
                {"messages": answer(a + b)}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def rss_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rss")
    native = train_bpe_tokenizer(root / "native")
    args = ModelArgs(**RSS_MODEL)
    torch.manual_seed(0)
    state = Transformer(args).state_dict()
    state.pop("output.weight")  # tied: the checkpoint holds the embeddings only, as Meta's tied files do
    torch.save(state, native / "consolidated.00.pth")
    (native / "params.json").write_text(json.dumps(args.to_json()))
    return {"native": native, "args": args, "cache": root / "cache", "root": root,
            "long": write_conversations(root / "long.jsonl", 16, 63),  # ~480 tokens: one per padded row
            "half": write_conversations(root / "half.jsonl", 32, 30),  # ~235: two per packed row of 512
            "pairs": write_conversations(root / "pairs.jsonl", 8, 63, preference=True)}


def batch_shape(setup, data: Path, kind: str, micro: int, pack: bool, share_prompt: bool = False):
    """(width, rows, trained positions) of the fullest micro-batch the run's loader makes."""
    from data import Loader, prepare_dataset
    from tokenize_chat import load_template, load_tokenizer

    tok = load_tokenizer(setup["native"])
    ds = prepare_dataset([f"jsonl:{data}"], tok, load_template("chatml.yaml", tok), 512, kind=kind,
                         cache_dir=setup["cache"], seed=42, progress=False)
    batches = list(Loader(ds, micro, pack=pack, share_prompt=share_prompt, seed=42, pad_id=tok.eos_id))
    return (max(b["input_ids"].shape[1] for b in batches), max(b["input_ids"].shape[0] for b in batches),
            max(int((b["labels"] != -100).sum()) for b in batches))


def start_run(setup, out: Path, script: str, data: Path, nproc: int = 1, **flags):
    argv = to_argv({"ckpt_paths": setup["native"], "template_config": "chatml.yaml",
                    "train_data_paths": f"jsonl:{data}", "output_dir": out, "max_seq_len": 512, "lr": 1e-4,
                    "train_steps": 2, "data_cache_dir": setup["cache"], "seed": 42, **flags})
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
         "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.Popen(fresh_process([*launcher, str(REPO / script), *argv]), env={**env(), **MALLOC},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# (name, script, data, flags): each dimension of the plan at least once, four processes at a time.
RSS_CASES = [
    ("full padded", "train_sft.py", "long", dict(micro_batch_size_per_gpu=4)),
    ("full packed, AC, accum 4", "train_sft.py", "half", dict(micro_batch_size_per_gpu=1, pack_samples=True,
                                                              activation_checkpointing=True, gradient_accum_steps=4)),
    ("LoRA packed", "train_sft.py", "half", dict(micro_batch_size_per_gpu=4, pack_samples=True, lora=True)),
    ("LoRA padded, AC, accum 4", "train_sft.py", "long", dict(micro_batch_size_per_gpu=1, lora=True,
                                                              activation_checkpointing=True, gradient_accum_steps=4)),
]
SWEEP = [(f"{'LoRA' if lora else 'full'} {'packed' if pack else 'padded'}{', AC' if ac else ''}, accum {accum}",
          "train_sft.py", "half" if pack else "long",
          dict(micro_batch_size_per_gpu=4, pack_samples=pack, lora=lora, activation_checkpointing=ac,
               gradient_accum_steps=accum))
         for lora in (False, True) for pack in (False, True) for ac in (False, True) for accum in (1, 4)] + [
    ("DPO padded", "train_dpo.py", "pairs", dict(micro_batch_size_per_gpu=2)),
    ("DPO packed, reference model", "train_dpo.py", "pairs", dict(micro_batch_size_per_gpu=2, pack_samples=True,
                                                                  reference="model")),
    ("DPO LoRA packed, AC", "train_dpo.py", "pairs", dict(micro_batch_size_per_gpu=2, pack_samples=True,
                                                          lora=True, activation_checkpointing=True)),
    ("SimPO padded, accum 4", "train_simpo.py", "pairs", dict(micro_batch_size_per_gpu=2, gradient_accum_steps=4)),
    ("SimPO LoRA packed", "train_simpo.py", "pairs", dict(micro_batch_size_per_gpu=2, pack_samples=True, lora=True)),
]


def measure_and_plan(setup, tmp_path, cases, nproc: int = 1, tolerance: float = 0.15) -> list:
    """Run the cases (a few processes at a time), then each one's peak RSS (the max of metrics.jsonl's
    memory_gb, rank 0) against the plan of its fullest micro-batch."""
    rows = []
    for start in range(0, len(cases), 4):
        group = cases[start:start + 4]
        procs = [start_run(setup, tmp_path / f"run{start + i}", script, setup[data], nproc, **flags)
                 for i, (_, script, data, flags) in enumerate(group)]
        for (name, *_), proc in zip(group, procs):
            output = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, f"{name}:\n{output[-3000:]}"
        for i, (name, script, data, flags) in enumerate(group):
            measured = max(m["memory_gb"] for m in metrics(tmp_path / f"run{start + i}")) * mp.GiB
            preference = script != "train_sft.py"
            pack = flags.get("pack_samples", False)
            width, micro_rows, trained = batch_shape(setup, setup[data], "preference" if preference else "sft",
                                                     flags["micro_batch_size_per_gpu"], pack, preference and pack)
            if preference:  # the plan's P pairs: 2P padded rows of width T, or P packed rows of 2 x max_seq_len
                micro, seq = (micro_rows, width / 2) if pack else (micro_rows // 2, width)
            else:
                micro, seq = micro_rows, width
            plan = mp.plan_memory(setup["args"], micro_batch_size=micro, max_seq_len=int(seq), preference=preference,
                                  gradient_accum_steps=flags.get("gradient_accum_steps", 1),
                                  activation_checkpointing=flags.get("activation_checkpointing", False),
                                  lora=flags.get("lora", False), reference=flags.get("reference", "precompute"),
                                  dp="fsdp" if nproc > 1 else "none", gpus=f"{nproc}xcpu", trained_tokens=trained)
            rows.append((name, measured, plan))
    report = "\n".join(f"{name:<36} measured {m / mp.GiB:.3f} GiB, planned {p.peak / mp.GiB:.3f} GiB "
                       f"({p.peak / m - 1:+.1%}) at {p.at}" for name, m, p in rows)
    print(report)
    for name, measured, plan in rows:
        assert abs(plan.peak / measured - 1) < tolerance, report
    return rows


def test_peak_rss_matches_the_plan(rss_setup, tmp_path):
    measure_and_plan(rss_setup, tmp_path, RSS_CASES)


def test_peak_rss_grpo_matches_the_plan(rss_setup, tmp_path):
    """GRPO, 2 prompts x 4 completions of up to 64 tokens per micro-batch, with a reference copy (--beta): the
    plan of rows that hold the longest prompt once and its completions, against the measured peak (15%)."""
    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(f"What is {rng.randint(1, 99)} plus "
                                                               f"{rng.randint(1, 99)}?" for _ in range(30))}) + "\n"
                               for _ in range(8)))
    rewards = tmp_path / "r.py"
    rewards.write_text("def mod3(completion_ids, **kw):\n    return [float(sum(c) % 3) for c in completion_ids]\n")
    out, G, L = tmp_path / "grpo", 4, 64
    proc = start_run(rss_setup, out, "train_grpo.py", prompts, micro_batch_size_per_gpu=2, num_generations=G,
                     max_completion_length=L, beta=0.04, reward_funcs=f"{rewards}:mod3")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    measured = max(m["memory_gb"] for m in metrics(out)) * mp.GiB
    lines = [json.loads(x) for x in (out / "rollouts.jsonl").open()]
    longest = max(len(x["prompt_ids"]) for x in lines)
    trained = max(sum(len(x["completion_ids"]) for x in lines[k:k + 2 * G]) for k in range(0, len(lines), 2 * G))
    plan = mp.plan_memory(rss_setup["args"], micro_batch_size=2, max_seq_len=longest + L, dp="none", gpus="cpu",
                          trained_tokens=trained, grpo=(G, L, 0.04))
    print(f"GRPO measured {measured / mp.GiB:.3f} GiB, planned {plan.peak / mp.GiB:.3f} GiB "
          f"({plan.peak / measured - 1:+.1%}) at {plan.at}; rollouts {plan.rollouts / mp.GiB:.3f} GiB")
    assert plan.reference > 0 and plan.rollouts > 0
    assert abs(plan.peak / measured - 1) < 0.15


def test_process_baseline_is_the_constant():
    """CPU_PROCESS_BYTES: a trainer process after its imports, torch._dynamo included (AdamW's first step
    imports it), before any model or data."""
    code = ("import resource, train_sft, train_dpo, train_simpo, data, tokenize_chat, torch._dynamo; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    rss = int(subprocess.run(fresh_process([sys.executable, "-c", code]), env={**env(), **MALLOC}, cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=120).stdout)
    assert abs(rss - mp.CPU_PROCESS_BYTES) < 0.05 * mp.GiB, rss / mp.GiB


@pytest.mark.slow
def test_peak_rss_sweep(rss_setup, tmp_path):
    """Every combination of LoRA, packing, activation checkpointing and accumulation for SFT, and DPO / SimPO
    cases: pytest -m slow tests/test_memory_plan.py -k sweep -s (prints the table)."""
    measure_and_plan(rss_setup, tmp_path, SWEEP)


def test_peak_rss_two_processes_fsdp(rss_setup, tmp_path):
    """Two processes under torchrun, FSDP2 on gloo (fp32 on CPU): rank 0's peak against the plan's 1/2 shares,
    the root gathered through backward and each block's reduce-scatter input. Today's load maps and reads the
    whole checkpoint on every rank before fully_shard (the sharded load is in progress on main); that peak stays
    below the training step's here, so the check does not wait for it."""
    measure_and_plan(rss_setup, tmp_path, [
        ("FSDP2 x2 full padded", "train_sft.py", "long", dict(micro_batch_size_per_gpu=4))], nproc=2)


@pytest.mark.slow
def test_peak_rss_two_processes_fsdp_lora(rss_setup, tmp_path):
    """LoRA under FSDP2 on two processes: -14.5% of measured when written, the thinnest margin of the checks
    (LoRA runs hold 50-70 MB per process beyond the live tensors the plan counts, see docs/memory.md)."""
    measure_and_plan(rss_setup, tmp_path, [
        ("FSDP2 x2 LoRA packed, AC", "train_sft.py", "half", dict(micro_batch_size_per_gpu=4, pack_samples=True,
                                                                  lora=True, activation_checkpointing=True)),
    ], nproc=2)
