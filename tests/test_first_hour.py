"""A new user's first hour (issue 24): each mistake ends in one line that names the fix (the message, the exit
code, nothing written), and the defaults that spare the user a flag: the template found beside the checkpoint,
a data path read by its extension, Ctrl-C saving a checkpoint, the start-up line saying what a step trains."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import data
import parallel
import train_common as tc
import train_dpo
import train_sft
import train_simpo
from sft_fixtures import REPO, env, metrics, tiny_chat_model, to_argv, write_chat_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_hour")
    hf, native = tiny_chat_model(root)  # root/hf: the HF dir it was converted from
    return {"hf": root / "hf", "native": native, "data": write_chat_data(root / "chat.jsonl"),
            "cache": root / "cache", "root": root}


def flags(setup, out, **overrides):
    """No --template_config: the converted dir's chatml.yaml is found."""
    args = {"ckpt_paths": setup["native"], "train_data_paths": f"jsonl:{setup['data']}", "output_dir": out,
            "max_seq_len": 96, "lr": 2e-3, "micro_batch_size_per_gpu": 4, "train_steps": 2,
            "data_cache_dir": setup["cache"], "seed": 42}
    args.update(overrides)
    return to_argv(args)


def fails(main, argv, capsys, code=1) -> str:
    """main(argv) exits with `code`; its stderr, which must be one line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(path: Path) -> dict:
    """Every file under path (the lock file aside: it names its holder) with its content and modification time."""
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != tc.LOCK_FILE}


# -- errors that say the next command ---------------------------------------------------------------------------
def test_hf_dir_as_ckpt_paths_names_the_convert_command(setup, tmp_path, capsys):
    hf = setup["hf"]
    command = f"python convert.py --ckpt_paths {hf} --output_dir {hf}_native"
    line = fails(train_sft.main, flags(setup, tmp_path / "o", ckpt_paths=hf), capsys)
    assert f"{hf} is a Hugging Face checkpoint" in line and f"`{command}`, then pass {hf}_native" in line
    assert not (tmp_path / "o").exists()
    import generate  # the same line for generation, and for a weight file of the HF dir
    line = fails(generate.main, ["--ckpt_paths", str(hf / "model.safetensors"), "--prompt", "Hi"], capsys)
    assert command in line


def test_data_path_without_prefix_is_read_by_its_extension(setup, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("some text\n")
    (tmp_path / "pairs.json").write_text("{}\n")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    downloaded = tmp_path / "hub_files"  # a hub dataset's files: datasets.load_dataset reads the dir
    downloaded.mkdir()
    sources = data.parse_sources([str(setup["data"]), str(tmp_path / "notes.txt"), str(tmp_path / "pairs.json"),
                                  str(saved), str(downloaded), "HuggingFaceH4/ultrachat_200k"])
    assert [(s.type, s.spec) for s in sources] == [
        ("jsonl", f"jsonl:{setup['data']}"), ("text", f"text:{tmp_path / 'notes.txt'}"),
        ("jsonl", f"jsonl:{tmp_path / 'pairs.json'}"), ("local", f"local:{saved}"), ("hub", str(downloaded)),
        ("hub", "HuggingFaceH4/ultrachat_200k")]
    (tmp_path / "data.csv").write_text("a,b\n")
    for path, needle in [(tmp_path / "data.csv", f"write jsonl:{tmp_path / 'data.csv'} (one JSON record per line) "
                                                 f"or text:"),
                         (tmp_path / "missing.jsonl", "no such file")]:
        with pytest.raises(data.DataError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            data.parse_sources([str(path)])
    # A trainer takes the bare path, and so nothing is written when it is wrong.
    train_sft.main(flags(setup, tmp_path / "run", train_data_paths=setup["data"], train_steps=1))
    assert len(metrics(tmp_path / "run")) == 1
    line = fails(train_sft.main, flags(setup, tmp_path / "o", train_data_paths=tmp_path / "missing.jsonl"), capsys)
    assert "missing.jsonl': no such file" in line and not (tmp_path / "o").exists()


@pytest.mark.parametrize("main,flag,said", [
    (train_sft.main, "--learning_rate", "--learning_rate: this repo calls it --lr"),
    (train_sft.main, "--max_length", "--max_length: this repo calls it --max_seq_len"),
    (train_sft.main, "--gradient_accumulation_steps", "this repo calls it --gradient_accum_steps"),
    (train_sft.main, "--num_train_epochs", "--num_train_epochs: this repo calls it --train_epochs"),
    (train_sft.main, "--per_device_train_batch_size", "this repo calls it --micro_batch_size_per_gpu"),
    (train_sft.main, "--weight_decay", "--weight_decay: this repo calls it --wd"),
    (train_sft.main, "--lr_scheduler_type", "--lr_scheduler_type: this repo calls it --lr_scheduler"),
    (train_sft.main, "--warmup_ratio", "--warmup_ratio: this repo takes --warmup_steps"),
    (train_sft.main, "--lora_r", "--lora_r: this repo calls it --lora_rank"),  # never taken as an abbreviation
    (train_sft.main, "--epochs", "--epochs: this repo calls it --train_epochs"),  # torchtune
    (train_dpo.main, "--beta", "--beta: this repo calls it --dpo_beta"),
    (train_simpo.main, "--beta", "--beta: this repo calls it --simpo_beta"),
    (train_sft.main, "--lerning_rate", "unknown flag --lerning_rate; did you mean --lr?"),
    (train_sft.main, "--lr_sched", "unknown flag --lr_sched; did you mean --lr_scheduler?"),
    (train_sft.main, "--gradient_accum", "unknown flag --gradient_accum; did you mean --gradient_accum_steps?"),
])
def test_other_trainers_flag_names_and_typos_get_one_line(setup, tmp_path, capsys, main, flag, said):
    line = fails(main, flags(setup, tmp_path / "o") + [flag, "8"], capsys, code=2)
    assert said in line, line
    assert not (tmp_path / "o").exists()


def test_wandb_without_the_package_fails_before_anything_loads(setup, tmp_path, capsys, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find(name, *a))
    line = fails(train_sft.main, flags(setup, tmp_path / "o", wandb=True), capsys, code=2)
    assert "--wandb needs the wandb package: pip install wandb, or drop --wandb" in line
    assert not (tmp_path / "o").exists()


def test_help_groups_flags_and_shows_each_default_once():
    out = subprocess.run([sys.executable, str(REPO / "train_dpo.py"), "--help"], capture_output=True, text=True,
                         env=env()).stdout
    titles = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles[titles.index("options"):] == [
        "options", "model", "data", "optimisation", "batch and packing", "parallelism", "LoRA", "checkpoints",
        "logging", "memory plan", "train_dpo.py"], titles
    assert "(default: [])" not in out and "(default: None)" not in out and "(default: False)" not in out
    flat = " ".join(out.split())
    assert "(default: wq wk wv wo w1 w2 w3)" in flat and "(default: 0.9 0.999)" in flat
    for flag in flat.split(" --")[1:]:  # each flag's help names its default once at most
        assert flag.count("default") <= 1, flag
    assert out.startswith("usage: train_dpo.py --ckpt_paths PATH")


def test_data_and_tokenize_chat_take_ckpt_paths(setup, tmp_path, capsys):
    """--ckpt_paths as every other command (--ckpt_dir kept), and the template found beside it."""
    import tokenize_chat

    for flag in ("--ckpt_paths", "--ckpt_dir"):
        tokenize_chat.main([flag, str(setup["native"]), "--show", str(setup["data"]), "--n", "1"])
        assert "<|im_start|>" in capsys.readouterr().out
        data.main([flag, str(setup["native"]), "--train_data_paths", str(setup["data"]), "--max_seq_len", "96",
                   "--data_cache_dir", str(setup["cache"])])
        assert "samples: 24 kept of 24" in capsys.readouterr().out


# -- templates found on their own -------------------------------------------------------------------------------
def tokenizer_dir(root: Path, name: str) -> Path:
    from dev.assets import (LLAMA3_TOKENIZER, MISTRAL_V1_TOKENIZER, MISTRAL_V3_TOKENIZER, asset, qwen3_tokenizer_dir,
                            smollm2_tokenizer_dir)

    files = {"llama3": LLAMA3_TOKENIZER, "llama2": MISTRAL_V1_TOKENIZER, "mistral_v1": MISTRAL_V1_TOKENIZER,
             "mistral_v3": MISTRAL_V3_TOKENIZER}
    if name in files:
        d = root / name
        d.mkdir()
        shutil.copy(asset(*files[name]), d / "tokenizer.model")
        return d
    return {"smollm2": smollm2_tokenizer_dir, "qwen": qwen3_tokenizer_dir}[name]()


@pytest.mark.parametrize("model_type,tokenizer,template", [
    ("llama", "llama3", "llama3_instruct"), ("llama", "llama2", "llama2_chat"), ("llama", "smollm2", "smollm2_chat"),
    ("mistral", "mistral_v3", "mistral_instruct"), ("mistral", "mistral_v1", "mistral_instruct_v1"),
    ("qwen3", "qwen", "qwen3"), ("qwen2", "qwen", "chatml"),
])
def test_convert_picks_the_family_template(tmp_path, model_type, tokenizer, template):
    """The README's model_type table, with the tokenizer telling a family's formats apart (Llama 3's header
    tokens, SmolLM2's chat template with its default system prompt, Mistral's v3 control tokens)."""
    import convert

    assert convert.family_template({"model_type": model_type}, tokenizer_dir(tmp_path, tokenizer)) == template


def test_converted_dir_holds_its_template_and_the_trainers_find_it(setup, tmp_path, capsys):
    assert sorted(p.name for p in setup["native"].glob("*.yaml")) == ["chatml.yaml"]
    out = tmp_path / "found"
    train_sft.main(flags(setup, out))
    assert f"template: {setup['native'] / 'chatml.yaml'} (from --ckpt_paths" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.yaml")) == ["chatml.yaml"]
    chosen = tmp_path / "chosen"  # an explicit --template_config wins
    train_sft.main(flags(setup, chosen, template_config="smollm2_chat"))
    assert sorted(p.name for p in chosen.glob("*.yaml")) == ["smollm2_chat.yaml"]
    bare = tmp_path / "bare"  # a dir without one, and no flag: the choices named, nothing written
    shutil.copytree(setup["native"], bare)
    (bare / "chatml.yaml").unlink()
    line = fails(train_sft.main, flags(setup, tmp_path / "o", ckpt_paths=bare), capsys)
    assert f"no chat template (*.yaml) in {bare}: pass --template_config NAME, one of chatml, gemma3, " in line
    assert not (tmp_path / "o").exists()


# -- interrupts and recovery ------------------------------------------------------------------------------------
def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes(setup, tmp_path):
    out = tmp_path / "run"
    argv = flags(setup, out, train_steps=60, micro_batch_size_per_gpu=2)
    proc = subprocess.Popen([sys.executable, str(REPO / "train_sft.py"), *argv], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 2/" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, rest[-2000:]
    assert "Ctrl-C: saved" in rest and "resume with --resume" in rest and "Traceback" not in rest, rest[-2000:]
    saved = parallel.checkpoint_dirs(out)[-1]
    assert len(metrics(out)) == int(saved.name.split("_")[1]) < 60
    train_sft.main(argv + ["--resume"])
    assert [m["step"] for m in metrics(out)] == list(range(1, 61))


def test_interrupt_while_saving_says_so_and_keeps_nothing_partial(setup, tmp_path, capsys, monkeypatch):
    """A Ctrl-C inside DCP's save arrives wrapped in its CheckpointException (whose text holds a traceback): it is
    named as an interrupt, never as a full disk, and the temp dir goes."""
    from torch.distributed.checkpoint.api import CheckpointException

    def interrupted_save(state, checkpoint_id):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise CheckpointException("save", {0: (KeyboardInterrupt(), None)})

    monkeypatch.setattr(parallel.dcp, "save", interrupted_save)
    out = tmp_path / "run"
    line = fails(train_sft.main, flags(setup, out, save_freq=1), capsys, code=130)
    assert line == ("train_sft.py: interrupted while saving the step 1 checkpoint, which was not kept; no checkpoint "
                    "to resume from: rerun with --overwrite"), line
    assert list((out / "checkpoints").iterdir()) == []


def test_a_full_disk_is_claimed_only_on_enospc_or_too_little_space(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    d = parallel.Dist(0, 0, 1, None)

    def said(error, needed=1):
        return parallel.write_failure("the step 3 checkpoint", tmp_path, error, d, needed, "x")

    wrapped = CheckpointException("save", {0: (RuntimeError("unexpected pos 512 vs 128"), None)})
    assert "no space left" not in said(wrapped) and "RuntimeError: unexpected pos 512 vs 128" in said(wrapped)
    assert "no space left on device" in said(CheckpointException("save", {0: (OSError(errno.ENOSPC, "full"), None)}))
    assert "no space left on device" in said(wrapped, needed=shutil.disk_usage(tmp_path).free + 1)


def test_rerun_after_a_run_without_checkpoint_says_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_args.json").write_text("{}")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")  # stopped before a checkpoint
    before = snapshot(out)
    line = fails(train_sft.main, flags(setup, out), capsys)
    assert "holds a run that stopped before its first checkpoint, so there is nothing to resume: pass --overwrite" \
           in line and "--resume" not in line
    line = fails(train_sft.main, flags(setup, out, resume=True), capsys)
    assert "--resume: no checkpoint under" in line and "rerun with --overwrite in place of --resume" in line
    assert snapshot(out) == before
    train_sft.main(flags(setup, out, overwrite=True))
    assert len(metrics(out)) == 2


@pytest.mark.parametrize("save_freq", [0, 1])
def test_resume_on_a_finished_run_changes_nothing(setup, tmp_path, capsys, save_freq):
    """Exit 0: a job script that always passes --resume (a requeued job) succeeds on a run that is done; nothing
    is retrained or rewritten. A larger --train_steps trains on from the last checkpoint."""
    out = tmp_path / "run"
    train_sft.main(flags(setup, out, save_freq=save_freq))
    before = snapshot(out)
    capsys.readouterr()
    train_sft.main(flags(setup, out, save_freq=save_freq, resume=True))  # returns: exit code 0
    assert f"--output_dir {out} holds a finished run (2" in capsys.readouterr().out
    assert snapshot(out) == before
    line = fails(train_sft.main, flags(setup, out, save_freq=save_freq), capsys)
    assert "holds a finished run (2 steps); pass --overwrite to replace it" in line
    if save_freq:
        train_sft.main(flags(setup, out, save_freq=save_freq, resume=True, train_steps=3))
        assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_failed_run_into_the_input_dir_leaves_no_lock(setup, tmp_path, capsys):
    native = tmp_path / "native"
    shutil.copytree(setup["native"], native)
    before = snapshot(native)
    line = fails(train_sft.main, flags(setup, native, ckpt_paths=native), capsys)
    assert f"--output_dir {native} holds the input checkpoint" in line
    assert snapshot(native) == before and not (native / tc.LOCK_FILE).exists()


# -- what a step trains ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pack", [False, True])
def test_startup_line_says_what_a_step_trains(setup, tmp_path, capsys, pack):
    from tokenize_chat import load_template, load_tokenizer

    train_sft.main(flags(setup, tmp_path / "run", gradient_accum_steps=2, pack_samples=pack, train_steps=1))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("batch: "))
    tok = load_tokenizer(setup["native"])
    ds = data.prepare_dataset([f"jsonl:{setup['data']}"], tok, load_template("chatml", tok), 96,
                              cache_dir=setup["cache"], seed=42, progress=False)
    loader = data.Loader(ds, 4, pack=pack, seed=42)
    per_epoch = -(-loader.num_steps() // 2)
    tokens = f"~{int(ds.doc_lengths.sum()) / per_epoch:,.0f} tokens per optimizer step"
    if pack:
        rows = len(loader.rows(0))
        assert line == (f"batch: 4 packed rows (~{24 / rows:.1f} samples each) per micro-batch x 2 accumulation x 1 "
                        f"process = ~{24 / per_epoch:.1f} samples and {tokens}; {per_epoch} steps per epoch, 1 "
                        f"steps in all"), line
    else:  # 24 samples, 6 micro-batches of 4: 3 steps of 8
        assert line == (f"batch: 4 samples per micro-batch x 2 accumulation x 1 process = 8 samples and {tokens}; "
                        f"3 steps per epoch, 1 steps in all"), line


# -- smaller ones -----------------------------------------------------------------------------------------------
def test_truncated_json_line_reports_its_own_column(setup, tmp_path, capsys):
    cut = '{"messages": [{"role": "user", "content": "Hi"}'
    src = tmp_path / "cut.jsonl"
    src.write_text(setup["data"].read_text().splitlines()[0] + "\n" + cut + "\n")
    from tokenize_chat import load_template, load_tokenizer

    tok = load_tokenizer(setup["native"])
    with pytest.raises(data.DataError) as e:
        data.prepare_dataset([str(src)], tok, load_template("chatml", tok), 96, cache_dir=tmp_path / "c",
                             progress=False, num_proc=1)
    assert str(e.value) == (f"{src} line 2: malformed JSON (Expecting ',' delimiter at column {len(cut) + 1}); the "
                            f"line ends inside its JSON: cut short?")
    import generate

    src.write_text('{"prompt": "Hi"}\n' + cut + "\n")
    line = fails(generate.main, ["--ckpt_paths", str(setup["native"]), "--prompts_file", str(src), "--output_file",
                                 str(tmp_path / "out.jsonl")], capsys)
    assert f"{src}:2: not valid JSON (Expecting ',' delimiter at column {len(cut) + 1})" in line


def test_python_generate_and_the_cli_agree_on_the_stop_token(setup, tmp_path):
    """model.generate yields the stop token (a reply's ids as produced, and how a caller tells stop from length);
    the CLI's text leaves it out, and generate.split_stop turns the one into the other."""
    import generate
    from model import Transformer
    from model import generate as model_generate
    from tokenize_chat import load_template, load_tokenizer, stop_token_ids, tokenize_conversation

    tok = load_tokenizer(setup["native"])
    template = load_template("chatml", tok)
    model = Transformer.from_pretrained(setup["native"])
    ids, _ = tokenize_conversation([{"role": "user", "content": "Hi"}], tok, template, add_generation_prompt=True)
    free = list(model_generate(model, ids, 12))
    stop = free[4]  # a stop token the random model is sure to reach
    stopped = list(model_generate(model, ids, 12, stop_ids={stop}))
    assert stopped == free[:free.index(stop) + 1]
    assert generate.split_stop(stopped, {stop}) == (stopped[:-1], "stop")
    assert generate.split_stop(free[:3], {stop}) == (free[:3], "length")
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"prompt": "Hi"}\n')
    generate.main(["--ckpt_paths", str(setup["native"]), "--prompts_file", str(src), "--output_file",
                   str(tmp_path / "out.jsonl"), "--max_new_tokens", "12"])
    row = json.loads((tmp_path / "out.jsonl").read_text())
    reply = list(model_generate(model, ids, 12, stop_ids=set(stop_token_ids(tok, template))))
    shown, reason = generate.split_stop(reply, set(stop_token_ids(tok, template)))
    assert (row["completion"], row["finish_reason"]) == (tok.decode(shown), reason)


def test_demo_fetch_dir_gets_the_umask_mode(tmp_path, monkeypatch):
    """dev/demo.py fetch writes into a temp dir renamed into place: mkdtemp's 0700 must not stay with it."""
    import transformers

    from dev import demo

    class Saved:
        config = type("Config", (), {})()

        def save_pretrained(self, path):
            (Path(path) / "config.json").write_text("{}")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: Saved())
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    umask = os.umask(0o022)
    try:
        out = demo.fetch_smollm2(tmp_path / "hf", tmp_path / "cache", gguf=gguf)
    finally:
        os.umask(umask)
    assert (out / "config.json").exists() and out.stat().st_mode & 0o777 == 0o755


def test_demo_grpo_reward_and_prompts(tmp_path):
    """make demo's GRPO stage: train_grpo.py loads dev/demo.py:correct_sum by its path (nothing runs at import),
    and it pays 1 only for exactly the asked reply with the right sum; grpo.jsonl's problems are all from the
    hard half (sums >= 100) and in no other split."""
    import re

    import train_grpo
    from dev import demo

    [(_, correct_sum)] = train_grpo.load_reward_funcs([f"{REPO}/dev/demo.py:correct_sum"])
    replies = ["47 + 38 = 85. The answer is 85.", " 47 + 38 = 85. The answer is 85.\n",
               "47 + 38 = 75. The answer is 75.", "47 + 38 = 85. The answer is 75.", "The answer is 85.",
               [{"role": "assistant", "content": "47 + 38 = 85. The answer is 85."}]]  # a chat prompt's form
    n = len(replies)
    assert correct_sum(prompts=[""] * n, completions=replies, completion_ids=[[]] * n, a=[47] * n,
                       b=[38] * n) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]

    demo.write_data(tmp_path, n_sft=384, n_pref=256, n_grpo=256, n_eval=48)

    def problems(name):
        text = (tmp_path / name).read_text()
        return {(int(a), int(b)) for a, b in re.findall(r"What is (\d+) \+ (\d+)\?", text)}
    grpo = problems("grpo.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "grpo.jsonl").read_text().splitlines()]
    assert len(grpo) == 256 and all(a + b >= 100 for a, b in grpo)
    assert all(demo.question(r["a"], r["b"]) == r["prompt"] for r in rows)
    for other in ("sft.jsonl", "preference.jsonl", "eval.jsonl"):
        assert problems(other) and not grpo & problems(other), other


# -- every run draws its curves ---------------------------------------------------------------------------------
def png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND"


def test_every_run_draws_its_curves(setup, tmp_path, capsys, monkeypatch):
    """metrics.png at the end (and at a checkpoint once a minute has passed since the last drawing); without
    matplotlib the run still succeeds, and one line says how to get the picture."""
    out = tmp_path / "run"
    train_sft.main(flags(setup, out))
    assert png(out / "metrics.png") and not list(out.glob(".metrics.png*"))
    run = tc.Run.__new__(tc.Run)  # draw_metrics reads the process, the output dir and the last drawing's time
    run.d, run.args, run.drawn = parallel.Dist(0, 0, 1, None), type("A", (), {"output_dir": str(out)})(), 0.0
    (out / "metrics.png").unlink()
    import time
    run.drawn = time.perf_counter()
    tc.draw_metrics(run)  # a checkpoint right after a drawing: none
    assert not (out / "metrics.png").exists()
    run.drawn -= 61
    tc.draw_metrics(run)
    assert png(out / "metrics.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setattr(tc, "_told_no_matplotlib", False)
    bare = tmp_path / "bare"
    capsys.readouterr()
    train_sft.main(flags(setup, bare))
    said = [line for line in capsys.readouterr().out.splitlines() if "metrics.png" in line]
    assert said == [f"metrics.png not drawn: matplotlib is not installed (pip install matplotlib, then python "
                    f"plot.py {bare} draws it)"], said
    assert (bare / "consolidated.00.pth").exists() and not (bare / "metrics.png").exists()


def test_plot_command_draws_a_run_dir_and_several_runs(setup, tmp_path):
    """plot.py (the product) and dev/plot.py (kept for its users) draw one run into its dir, several into one PNG."""
    a, b = tmp_path / "a", tmp_path / "b"
    train_sft.main(flags(setup, a))
    train_sft.main(flags(setup, b, lr=1e-3))
    for p in (a, b):
        (p / "metrics.png").unlink()
    subprocess.run([sys.executable, str(REPO / "plot.py"), str(a)], check=True, env=env(), capture_output=True)
    assert png(a / "metrics.png")
    subprocess.run([sys.executable, str(REPO / "dev" / "plot.py"), str(a / "metrics.jsonl"), str(b),
                    "--output", str(tmp_path / "both.png")], check=True, env=env(), capture_output=True)
    assert png(tmp_path / "both.png")
