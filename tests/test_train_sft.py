"""train_sft.py end to end on a tiny model: loss against transformers, world-size and accumulation invariance,
exact resume, LoRA under FSDP2, over-fitting, multi-node rendezvous, and bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import lora
import parallel
import train_sft
from sft_fixtures import (REPO, env, free_port, metrics, tiny_chat_model, to_argv, torchrun, torchrun_patched,
                          write_chat_data)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    hf, native = tiny_chat_model(root)
    data = write_chat_data(root / "chat.jsonl")
    return {"hf": hf, "native": native, "data": data, "cache": root / "cache", "root": root}


def base_args(setup, out, **overrides):
    args = {"ckpt_paths": setup["native"], "template_config": "chatml.yaml", "train_data_paths": f"jsonl:{setup['data']}",
            "output_dir": out, "max_seq_len": 96, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 1,
            "micro_batch_size_per_gpu": 4, "gradient_accum_steps": 1, "train_steps": 3,
            "data_cache_dir": setup["cache"], "seed": 42}
    args.update(overrides)
    return to_argv(args)


def run_inprocess(argv):
    train_sft.main(argv)


def rel_close(a: list, b: list, tol=1e-5):
    return all(abs(x - y) <= tol * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))


def losses(out):
    return [m["loss"] for m in metrics(out)]


def reference_first_step_loss(setup, micro, reduction):
    """The loss of the first optimizer step computed independently: transformers' logits on the same samples
    (the loader's first `micro` samples), log-softmax, and the definition of each reduction in docs/training.md."""
    from data import Loader, prepare_dataset
    from tokenize_chat import load_template, load_tokenizer

    tok = load_tokenizer(setup["native"])
    ds = prepare_dataset([f"jsonl:{setup['data']}"], tok, load_template("chatml.yaml", tok), 96,
                         cache_dir=setup["cache"], seed=42, progress=False)
    batch = next(iter(Loader(ds, micro, seed=42, pad_id=tok.eos_id)))
    per_seq = []
    for r, sid in enumerate(batch["sample_ids"].tolist()):
        a, b = ds.offsets[sid], ds.offsets[sid + 1]
        ids = torch.tensor(ds.ids[a:b].astype("int64"))
        trained = torch.tensor(ds.mask[a + 1:b].astype(bool))  # target t+1 predicted at t
        with torch.no_grad():
            logp = setup["hf"](ids[None]).logits[0, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, ids[1:, None])[:, 0]
        per_seq.append(nll[trained])
    if reduction == "tokens":
        return float(torch.cat(per_seq).mean())
    return float(torch.stack([s.mean() for s in per_seq]).mean())


def test_world_sizes_and_dp_modes_agree_with_transformers(setup, tmp_path):
    """1 process, 2-process FSDP2 and 2-process DDP on the same global batch: the same losses; step 1
    equals the loss computed from transformers' logits."""
    one = tmp_path / "one"
    run_inprocess(base_args(setup, one, micro_batch_size_per_gpu=4, gradient_accum_steps=2))
    ref = reference_first_step_loss(setup, micro=8, reduction="tokens")
    assert abs(losses(one)[0] - ref) <= 1e-5 * ref
    for dp in ("fsdp", "ddp"):
        out = tmp_path / dp
        torchrun("train_sft.py", base_args(setup, out, micro_batch_size_per_gpu=2, gradient_accum_steps=2, dp=dp),
                 nproc=2, port=free_port())
        assert rel_close(losses(out), losses(one)), (dp, losses(out), losses(one))
        assert [m["tokens"] for m in metrics(out)] == [m["tokens"] for m in metrics(one)]


@pytest.mark.parametrize("reduction", ["tokens", "sequences"])
def test_gradient_accumulation_invariance(setup, tmp_path, reduction):
    a, b = tmp_path / "a", tmp_path / "b"
    run_inprocess(base_args(setup, a, micro_batch_size_per_gpu=4, gradient_accum_steps=1, loss_reduction=reduction))
    run_inprocess(base_args(setup, b, micro_batch_size_per_gpu=1, gradient_accum_steps=4, loss_reduction=reduction))
    assert rel_close(losses(a), losses(b)), (losses(a), losses(b))
    ref = reference_first_step_loss(setup, micro=4, reduction=reduction)
    assert abs(losses(a)[0] - ref) <= 1e-5 * ref
    if reduction == "sequences":  # and it is a different number from the token mean
        assert abs(ref - reference_first_step_loss(setup, micro=4, reduction="tokens")) > 1e-4


@pytest.mark.parametrize("flags", [{}, {"lora": True, "lora_rank": 4, "lora_dropout": 0.2, "lr": 1e-2}],
                         ids=["full", "lora_dropout"])
def test_activation_checkpointing_changes_nothing(setup, tmp_path, flags):
    """The same losses and gradient norms with blocks recomputed in backward; with LoRA dropout the
    recomputation draws the forward's masks (it kept the RNG state), so the gradients are the loss's."""
    a, b = tmp_path / "plain", tmp_path / "ac"
    run_inprocess(base_args(setup, a, **flags))
    run_inprocess(base_args(setup, b, activation_checkpointing=True, **flags))
    assert rel_close(losses(a), losses(b), tol=1e-6)
    norms = [[m["grad_norm"] for m in metrics(out)] for out in (a, b)]
    assert rel_close(*norms, tol=1e-6), norms


ROTARY_PROBE = """
    import json, os
    import train_common
    from model import Attention

    parallelize = train_common.parallelize

    def probe(model, *args, **kwargs):  # records the dtypes attention receives: x, cos, sin
        def record(module, inputs):
            path = os.environ["PROBE"] + f".rank{os.environ['RANK']}"
            if not os.path.exists(path):
                open(path, "w").write(json.dumps([str(t.dtype) for t in inputs[:3]]))
        for m in model.modules():
            if isinstance(m, Attention):
                m.register_forward_pre_hook(record)
        return parallelize(model, *args, **kwargs)

    train_common.parallelize = probe
"""


def test_fsdp_and_ddp_agree_in_bf16_with_fp32_rotary(setup, tmp_path, monkeypatch):
    """--param_dtype bf16: FSDP2 casts parameters (and would cast every floating block input, the rotary cos
    and sin too), DDP runs under autocast. Attention receives fp32 cos and sin either way (Meta's reference
    rotates in fp32), the hidden state in the compute dtype under FSDP2, and the first losses agree to bf16's
    precision. Seen on CPU: step-1/2 losses within 3e-4 (relative) of each other, before and after the rotary
    fix alike (a bf16 residual stream under FSDP2, fp32 under autocast, is most of that); the probe pins the fix."""
    runs = {}
    for dp in ("fsdp", "ddp"):
        out = tmp_path / dp
        monkeypatch.setenv("PROBE", str(tmp_path / f"probe_{dp}"))
        torchrun_patched(tmp_path, ROTARY_PROBE, "train_sft.py",
                         base_args(setup, out, param_dtype="bf16", dp=dp, micro_batch_size_per_gpu=2, train_steps=2))
        runs[dp] = losses(out)
        for rank in (0, 1):
            x, cos, sin = json.loads((tmp_path / f"probe_{dp}.rank{rank}").read_text())
            assert (cos, sin) == ("torch.float32", "torch.float32"), (dp, cos, sin)
            assert x == ("torch.bfloat16" if dp == "fsdp" else "torch.float32"), (dp, x)  # autocast: fp32 stream
    assert rel_close(runs["fsdp"], runs["ddp"], tol=1e-3), runs


def test_packed_loss_equals_each_document_alone_in_transformers(setup, tmp_path):
    """Packed rows with per-document attention and restarted positions: the step-1 loss equals the token
    mean over the same documents, each run through transformers on its own."""
    from data import Loader, prepare_dataset
    from tokenize_chat import load_template, load_tokenizer

    out = tmp_path / "packed"
    run_inprocess(base_args(setup, out, pack_samples=True, micro_batch_size_per_gpu=2, train_steps=1))
    tok = load_tokenizer(setup["native"])
    ds = prepare_dataset([f"jsonl:{setup['data']}"], tok, load_template("chatml.yaml", tok), 96,
                         cache_dir=setup["cache"], seed=42, progress=False)
    batch = next(iter(Loader(ds, 2, pack=True, seed=42, pad_id=tok.eos_id)))
    nll, docs = [], 0
    for row in range(batch["input_ids"].shape[0]):
        for doc in batch["document_ids"][row].unique().tolist():
            if doc < 0:
                continue
            where = batch["document_ids"][row] == doc
            ids, labels = batch["input_ids"][row][where], batch["labels"][row][where]
            with torch.no_grad():
                logp = setup["hf"](ids[None]).logits[0].float().log_softmax(-1)
            keep = labels != -100
            nll.append(-logp[keep].gather(-1, labels[keep][:, None])[:, 0])
            docs += 1
    assert docs > 2  # several documents share a row
    ref = float(torch.cat(nll).mean())
    assert abs(losses(out)[0] - ref) <= 1e-5 * ref


def _read_until(proc, needle, timeout=120):
    start = time.time()
    for line in proc.stdout:
        if needle in line:
            return line
        if time.time() - start > timeout:
            break
    raise AssertionError(f"never saw {needle!r}")


@pytest.mark.parametrize("use_lora", [False, True])
def test_resume_after_sigterm_reproduces_the_run(setup, tmp_path, use_lora):
    """Two processes under FSDP2, SIGTERMed and resumed, equal one uninterrupted process. With LoRA (and
    activation checkpointing: its wrapper renames the blocks' parameters) the checkpoint holds the adapters'
    shards alone, and the frozen base comes back from --ckpt_paths."""
    full = tmp_path / "full"
    args = dict(train_steps=16, micro_batch_size_per_gpu=2, gradient_accum_steps=2)
    if use_lora:
        args.update(lora=True, lora_rank=4, lr=1e-2, activation_checkpointing=True)
    run_inprocess(base_args(setup, full, **args))
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "train_sft.py"), *base_args(setup, out, dp="fsdp", **{**args, "micro_batch_size_per_gpu": 1})]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _read_until(proc, "step 2/")
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers; 14 steps of slack remain
    rest = proc.communicate(timeout=120)[0]
    assert "SIGTERM: saved" in rest, rest[-2000:]
    saved = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 2 <= saved < 16
    held = checkpoint_model_keys(parallel.checkpoint_dirs(out)[-1])
    if use_lora:
        assert held and all(".lora_" in k for k in held)
    else:
        assert held == full_model_keys(setup)
    torchrun("train_sft.py", base_args(setup, out, dp="fsdp", resume=True, **{**args, "micro_batch_size_per_gpu": 1}),
             nproc=2, port=free_port())
    assert [m["step"] for m in metrics(out)] == list(range(1, 17))
    assert rel_close(losses(out), losses(full)), (losses(out), losses(full))


@pytest.mark.parametrize("use_lora", [False, True])
def test_resume_after_kill9_uses_the_last_complete_checkpoint(setup, tmp_path, use_lora):
    full = tmp_path / "full"
    args = dict(train_steps=10, save_freq=2, max_checkpoints=2, lora=use_lora, lora_rank=4, lora_dropout=0.1)
    run_inprocess(base_args(setup, full, **args))
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "train_sft.py"), *base_args(setup, out, **args)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _read_until(proc, "step 5/")
    proc.kill()
    proc.wait()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert checkpoints and len(checkpoints) <= 2
    run_inprocess(base_args(setup, out, resume=True, **args))
    assert [m["step"] for m in metrics(out)] == list(range(1, 11))
    assert rel_close(losses(out), losses(full))


def checkpoint_model_keys(step_dir) -> list:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    return sorted(k.removeprefix("model.") for k in keys if k.startswith("model."))


def full_model_keys(setup) -> list:
    from model import Transformer

    return sorted(Transformer.from_pretrained(setup["native"]).state_dict())  # output.weight tied, still a key


def test_lora_step_checkpoint_holds_only_what_trains(setup, tmp_path):
    """A LoRA step checkpoint is its trained tensors and their AdamW state (the tensor, exp_avg, exp_avg_sq: 3 x
    fp32) plus a constant: the frozen base (the tied embedding too) is rebuilt from --ckpt_paths at resume. A full
    fine-tune's holds every tensor."""
    from model import Transformer

    out = tmp_path / "lora"
    run_inprocess(base_args(setup, out, lora=True, lora_rank=4, lora_targets=["wq", "wv"], save_freq=1,
                            train_steps=2))
    model = lora.apply_lora(Transformer.from_pretrained(setup["native"]), rank=4, alpha=16, targets=["wq", "wv"])
    lora.mark_trainable(model)
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # 8,192
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)  # 409,856
    step = out / "checkpoints" / "step_00000001"
    size = sum(p.stat().st_size for p in step.iterdir())
    # Measured (torch 2.13): 132,393 bytes = 3 x 8,192 + 107,817. The constant: DCP frames each of its 56
    # entries (8 tensors, their exp_avg, exp_avg_sq and step, 24 AdamW settings) in ~1.3 KB of zip, .metadata
    # 12 KB, extra_rank0.pt 15 KB (RNG states, loader position). Holding the base too, it was 698,279 bytes.
    assert size <= 3 * trained + 128 * 1024 < frozen, size
    assert checkpoint_model_keys(step) == sorted(k for k, p in model.named_parameters() if p.requires_grad)
    full = tmp_path / "full"
    run_inprocess(base_args(setup, full, save_freq=1, train_steps=2))
    assert checkpoint_model_keys(full / "checkpoints" / "step_00000001") == full_model_keys(setup)


def test_lora_resume_is_refused_when_the_base_changed(setup, tmp_path, capsys):
    """The base a LoRA resume rebuilds must be the one the run started from: rewritten since, the resume stops
    with one line naming the file, and writes nothing. The same bytes elsewhere (copied with their mtime) resume."""
    base = tmp_path / "base"
    shutil.copytree(setup["native"], base)  # copy2: sizes and modification times kept
    out = tmp_path / "lora"
    args = dict(lora=True, lora_rank=4, save_freq=1, train_steps=2)
    run_inprocess(base_args(setup, out, ckpt_paths=base, **args))
    weights = base / "consolidated.00.pth"
    state = torch.load(weights, weights_only=True)
    torch.save({k: v * 1.5 if k.endswith("norm.weight") else v for k, v in state.items()}, weights)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_inprocess(base_args(setup, out, ckpt_paths=base, resume=True, **{**args, "train_steps": 3}))
    assert exc.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"resume: {weights.resolve()} changed since the run started (its size, modification time" in line, line
    assert line.endswith("resume with the weights the run started from")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    run_inprocess(base_args(setup, out, ckpt_paths=setup["native"], resume=True, **{**args, "train_steps": 3}))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_lora_fsdp_two_processes(setup, tmp_path):
    from model import Transformer

    out = tmp_path / "lora"
    torchrun("train_sft.py", base_args(setup, out, lora=True, lora_rank=4, lora_alpha=8, lr=1e-2,
                                       micro_batch_size_per_gpu=2), nproc=2, port=free_port())
    assert (out / "adapter" / "adapter.pth").exists()
    adapter = torch.load(out / "adapter" / "adapter.pth", weights_only=True)
    assert adapter and all(".lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if k.endswith("lora_b"))
    merged = Transformer.from_pretrained(out)
    overlay = lora.load_model([setup["native"], out / "adapter" / "adapter.pth"])
    base = Transformer.from_pretrained(setup["native"])
    tokens = torch.randint(0, setup["hf"].config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(tokens) - overlay(tokens)).abs().max() <= 1e-5
        assert (merged(tokens) - base(tokens)).abs().max() > 1e-4
        assert torch.equal(merged.tok_embeddings.weight, base.tok_embeddings.weight)  # frozen


SLOW_RANK0 = """
    import os, time
    import data, train_common

    def slowly(f, when=lambda *args: True):  # rank 0 takes $SLOW seconds longer: beyond --dist_timeout
        def slow(*args, **kwargs):
            if os.environ["RANK"] == "0" and when(*args):
                time.sleep(float(os.environ["SLOW"]))
            return f(*args, **kwargs)
        return slow
"""


def test_rank0_work_outlasts_dist_timeout(setup, tmp_path, monkeypatch):
    """--dist_timeout 0.05 (3 s): rank 0 takes 4 s more to build the data cache and 4 s more to write the merged
    LoRA model; the other rank waits outside the collectives, so the run completes (it gave up in the cache's
    all_gather_object before). A collective left waiting that long, inside a step, ends the run with the
    one-line message (and the flag is seen to reach the process group)."""
    monkeypatch.setenv("SLOW", "4")
    flags = dict(dist_timeout=0.05, lora=True, lora_rank=4, micro_batch_size_per_gpu=2, train_steps=2)
    own_work = SLOW_RANK0 + """
    data._find_or_build = slowly(data._find_or_build)  # the cache build
    train_common.atomic_write = slowly(train_common.atomic_write,  # the merged model's write
                                       when=lambda path, write: path.name == "consolidated.00.pth")
"""
    out = tmp_path / "slow"
    torchrun_patched(tmp_path, own_work, "train_sft.py", base_args(setup, out, **flags))
    assert len(metrics(out)) == 2 and (out / "consolidated.00.pth").is_file()
    in_step = SLOW_RANK0 + """
    train_common.optimizer_step = slowly(train_common.optimizer_step)
"""
    result = torchrun_patched(tmp_path, in_step, "train_sft.py", base_args(setup, tmp_path / "stuck", **flags),
                              check=False)
    assert result.returncode != 0
    assert "train_sft.py: error (rank 1): lost another process of this run" in result.stderr, result.stderr[-3000:]
    assert "raise --dist_timeout 0.05 min" in result.stderr and "[rank1]: Traceback" not in result.stderr


def test_overfits_and_output_dir_is_a_native_checkpoint(setup, tmp_path):
    import convert
    from model import Transformer

    out = tmp_path / "overfit"
    run_inprocess(base_args(setup, out, train_steps=40, lr=3e-3, lr_scheduler="constant", warmup_steps=0,
                            micro_batch_size_per_gpu=4, train_num_samples=4, print_freq=10))
    first, last = losses(out)[0], losses(out)[-1]
    assert last < 0.1 * first, (first, last)
    names = {p.name for p in out.iterdir()}
    assert {"consolidated.00.pth", "params.json", "tokenizer.json", "chatml.yaml", "train_args.json",
            "metrics.jsonl"} <= names
    assert json.loads((out / "train_args.json").read_text())["lr"] == 3e-3
    Transformer.from_pretrained(out)
    convert.main(["--to_hf", "--ckpt_paths", str(out), "--output_dir", str(tmp_path / "hf_out")])
    assert (tmp_path / "hf_out" / "model.safetensors").exists()
    # The next stage takes the output dir as --ckpt_paths.
    run_inprocess(base_args(setup, tmp_path / "stage2", ckpt_paths=out, train_steps=1))


def test_two_nodes_through_torchrun_rendezvous(setup, tmp_path):
    one = tmp_path / "one"
    run_inprocess(base_args(setup, one, micro_batch_size_per_gpu=4))
    out = tmp_path / "nodes"
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(REPO / "train_sft.py"), *base_args(setup, out, micro_batch_size_per_gpu=2)]
        procs.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert rel_close(losses(out), losses(one))


# -- bad input ---------------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(setup, tmp_path, capsys):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exc:
        run_inprocess(base_args(setup, out, lr=1e12, lr_scheduler="constant", warmup_steps=0, train_steps=20,
                                save_freq=1, clip_grad_norm=0))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "loss is nan at step" in err or "loss is inf at step" in err
    step = int(err.split(" at step ")[1].split(":")[0])
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept[-1] == f"step_{step - 1:08d}"


def test_missing_checkpoint(setup, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_inprocess(base_args(setup, tmp_path / "o", ckpt_paths=tmp_path / "nope"))
    assert "nope" in capsys.readouterr().err


def test_checkpoint_not_matching_params(setup, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(setup["native"], bad)
    params = json.loads((bad / "params.json").read_text())
    params["n_layers"] = 3
    (bad / "params.json").write_text(json.dumps(params))
    with pytest.raises(SystemExit):
        run_inprocess(base_args(setup, tmp_path / "o", ckpt_paths=bad))
    assert "missing tensors" in capsys.readouterr().err


def test_unknown_scheduler(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_inprocess(base_args(setup, tmp_path / "o", lr_scheduler="warmup_stable_decay"))
    assert exc.value.code == 2
    assert "--lr_scheduler" in capsys.readouterr().err


def test_output_dir_of_another_run_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit):
        run_inprocess(base_args(setup, out))
    assert "--overwrite" in capsys.readouterr().err


def test_compile_changes_nothing(setup, tmp_path):
    """--compile (torch.compile per block, inductor) gives the eager losses."""
    a, b = tmp_path / "eager", tmp_path / "compiled"
    run_inprocess(base_args(setup, a))
    torch._dynamo.reset()
    run_inprocess(base_args(setup, b, compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the blocks really were compiled
    assert rel_close(losses(a), losses(b), tol=1e-4), (losses(a), losses(b))


def test_bf16_compute_tracks_fp32(setup, tmp_path):
    """--param_dtype bf16 through autocast (one process) and through FSDP2's mixed precision (two processes):
    the losses stay within bf16 rounding of the fp32 run, and differ from it (the flag took effect)."""
    fp32, auto, fsdp = tmp_path / "fp32", tmp_path / "autocast", tmp_path / "fsdp"
    run_inprocess(base_args(setup, fp32))
    run_inprocess(base_args(setup, auto, param_dtype="bf16"))
    torchrun("train_sft.py", base_args(setup, fsdp, micro_batch_size_per_gpu=2, dp="fsdp", param_dtype="bf16"),
             nproc=2, port=free_port())
    for out in (auto, fsdp):
        assert rel_close(losses(out), losses(fp32), tol=2e-2), (out.name, losses(out), losses(fp32))
        assert not rel_close(losses(out), losses(fp32), tol=1e-6), out.name


def test_resume_drops_later_and_cut_short_metrics_lines(tmp_path):
    """A run killed mid-write leaves a cut last line; resuming from step 2 keeps steps 1-2 only."""
    import parallel
    import train_common as tc
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'
                                            '{"step": 3, "loss": 0.8}\n{"step": 4, "lo')
    tc.MetricsLog(tmp_path, parallel.Dist(0, 0, 1, torch.device("cpu")), total_steps=5, print_freq=1, start_step=2)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_epochs_are_whole_passes_with_accumulation(setup, tmp_path):
    """24 samples, micro-batch 7, accumulation 3: an epoch is 4 micro-batches, so steps of 3 + 1 (the last
    step takes what the epoch has left, as transformers' Trainer does), every sample exactly once per epoch."""
    one_step = tmp_path / "one_step"
    run_inprocess(base_args(setup, one_step, train_steps=None, micro_batch_size_per_gpu=24))
    epoch_tokens = sum(m["tokens"] for m in metrics(one_step))
    out = tmp_path / "accum"
    run_inprocess(base_args(setup, out, train_steps=None, train_epochs=2, micro_batch_size_per_gpu=7,
                            gradient_accum_steps=3))
    assert [m["epoch"] for m in metrics(out)] == [0, 0, 1, 1]
    assert [sum(m["tokens"] for m in metrics(out)[e:e + 2]) for e in (0, 2)] == [epoch_tokens] * 2


def test_lora_output_adapter_and_frozen_weights(setup, tmp_path):
    """With --lora_unfrozen_params the adapter dir carries those parameters too, so base + adapter is the
    trained model; with bf16 compute the untrained weights are saved exactly as read (not bf16-rounded);
    --overwrite by a full run removes the LoRA run's adapter dir."""
    from model import Transformer

    out = tmp_path / "lora"
    run_inprocess(base_args(setup, out, lora=True, lora_rank=4, lr=1e-2, lora_unfrozen_params=["^norm"],
                            lora_targets=["wq", "wv"], param_dtype="bf16"))
    base = torch.load(setup["native"] / "consolidated.00.pth")
    saved = torch.load(out / "consolidated.00.pth")
    assert sorted(k for k in torch.load(out / "adapter" / "adapter.pth") if ".lora_" not in k) == ["norm.weight"]
    assert not torch.equal(saved["norm.weight"], base["norm.weight"])
    assert all(torch.equal(saved[k], base[k]) for k in base if k != "norm.weight" and ".wq." not in k and ".wv." not in k)
    tokens = torch.randint(0, setup["hf"].config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged, stacked = Transformer.from_pretrained(out), lora.load_model([setup["native"], out / "adapter"])
        assert (merged(tokens) - stacked(tokens)).abs().max() <= 1e-5
    (out / "my_sweep.yaml").write_text("lr: [1, 2]\n")
    with pytest.raises(SystemExit):  # stacking on its own adapter would delete it
        run_inprocess(base_args(setup, out, ckpt_paths=[setup["native"], out / "adapter"], overwrite=True))
    assert (out / "adapter" / "adapter.pth").exists()
    run_inprocess(base_args(setup, out, overwrite=True))
    assert not (out / "adapter").exists() and (out / "my_sweep.yaml").exists() and (out / "chatml.yaml").exists()


@pytest.mark.parametrize("flag,value", [("gradient_accum_steps", 0), ("train_epochs", 0), ("train_steps", -3),
                                        ("warmup_steps", -2), ("lora_dropout", 1.0), ("dist_timeout", 0.0)])
def test_out_of_range_flags(setup, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        run_inprocess(base_args(setup, tmp_path / "o", **{flag: value}))
    assert exc.value.code == 2
    assert f"--{flag} {value}: must be" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_with_other_trainable_parameters_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "run"
    run_inprocess(base_args(setup, out, save_freq=1, train_steps=2))
    with pytest.raises(SystemExit):
        run_inprocess(base_args(setup, out, save_freq=1, train_steps=4, resume=True, lora=True))
    assert "--resume: --lora was False, now True" in capsys.readouterr().err
    run_inprocess(base_args(setup, out, save_freq=1, train_steps=4, resume=True, lr=1e-3))  # only warns
    assert "warning: --resume with --lr 0.001 (the run started with 0.002)" in capsys.readouterr().out
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    lora = tmp_path / "lora"  # the same adapters in another spelling resume without a word
    run_inprocess(base_args(setup, lora, save_freq=1, train_steps=2, lora=True, lora_targets=["wq", "wv"]))
    capsys.readouterr()
    run_inprocess(base_args(setup, lora, save_freq=1, train_steps=3, lora=True, lora_targets=["wv", "wq"],
                            resume=True, ckpt_paths=f"{setup['native']}/"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: --resume with --train_steps 3 (the run started with 2)"] and len(metrics(lora)) == 3


def test_a_run_that_failed_on_bad_input_can_be_retried(setup, tmp_path, capsys):
    out = tmp_path / "retry"
    with pytest.raises(SystemExit):
        run_inprocess(base_args(setup, out, train_data_paths=f"jsonl:{tmp_path / 'missing.jsonl'}"))
    run_inprocess(base_args(setup, out))
    assert len(metrics(out)) == 3


def test_validation_loss_is_logged_at_the_end(setup, tmp_path):
    """--val_freq 0 validates once, after the last step, into metrics.jsonl; at lr 0 the value is the token
    mean over the whole validation set of transformers' NLL (packed rows do not change it)."""
    from data import prepare_dataset
    from tokenize_chat import load_template, load_tokenizer

    tok = load_tokenizer(setup["native"])
    ds = prepare_dataset([f"jsonl:{setup['data']}"], tok, load_template("chatml.yaml", tok), 96,
                         cache_dir=setup["cache"], seed=42, progress=False)
    nll, count = 0.0, 0
    for i in range(len(ds)):
        ids, mask = (torch.tensor(x.astype("int64")) for x in ds[i])
        with torch.no_grad():
            logp = setup["hf"](ids[None]).logits[0, :-1].float().log_softmax(-1)
        trained = mask[1:].bool()
        nll -= float(logp.gather(-1, ids[1:, None])[:, 0][trained].sum())
        count += int(trained.sum())
    for pack in (False, True):
        out = tmp_path / f"val_{pack}"
        run_inprocess(base_args(setup, out, lr=0.0, val_data_paths=f"jsonl:{setup['data']}", pack_samples=pack))
        logged = [m.get("val/loss") for m in metrics(out)]
        assert logged[:-1] == [None, None] and abs(logged[-1] - nll / count) <= 1e-5 * logged[-1], (logged, nll / count)
