"""data.py: sources, the memmap cache, the length policy, batches, packing, distributed slices, resume.

Real tokenizer (Llama 3 tiktoken from the llama-models wheel) and template (llama3_instruct); the packing
check compares against Hugging Face transformers' LlamaForCausalLM (a tiny random one, fp32)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from dev.assets import LLAMA3_TOKENIZER, asset
from data import DataError, Loader, prepare_dataset
from tiny import dense_mask
from tokenize_chat import load_template, load_tokenizer, tokenize_conversation

REPO = Path(__file__).resolve().parent.parent
WORDS = "the a cat dog runs sleeps quickly over under bright dark river mountain data token".split()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    shutil.copy(asset(*LLAMA3_TOKENIZER), d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(ckpt), load_template("llama3_instruct")


def text(rng, lo, hi):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def conversations(n, seed=0, lo=2, hi=60):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"q{i} " + text(rng, lo, hi)},
                {"role": "assistant", "content": f"a{i} " + text(rng, lo, hi)}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "be brief"}] + msgs
        out.append({"messages": msgs, "id": i})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prep(tok, paths, tmp_path, max_seq_len=512, **kw):
    kw.setdefault("num_proc", 1)
    kw.setdefault("progress", False)
    return prepare_dataset(paths, *tok, max_seq_len, cache_dir=tmp_path / "cache", **kw)


def cache_entries(tmp_path):
    d = tmp_path / "cache"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ---------------------------------------------------------------------------------------------------
# Cache


def test_cache_round_trip_hit_and_rebuild(tok, tmp_path):
    records = conversations(20)
    src = write_jsonl(tmp_path / "sft.jsonl", records)
    ds = prep(tok, f"jsonl:{src}", tmp_path)
    assert ds.built and len(ds) == 20 and ds.ids.dtype == np.uint32 and ds.mask.dtype == np.uint8
    assert ds.offsets.dtype == np.int64
    for i, r in enumerate(records):
        ids, mask = tokenize_conversation(r["messages"], *tok)
        got_ids, got_mask = ds[i]
        assert got_ids.tolist() == ids and got_mask.tolist() == mask
    meta = json.loads((ds.path / "meta.json").read_text())
    assert meta["format_version"] == data.FORMAT_VERSION and meta["tokenizer"] == tok[0].fingerprint
    assert meta["template"] == tok[1].fingerprint and meta["max_seq_len"] == 512
    assert meta["stats"]["samples"] == 20 and meta["stats"]["tokens"] == len(ds.ids)

    again = prep(tok, f"jsonl:{src}", tmp_path)
    assert not again.built and again.path == ds.path

    records[5]["messages"][-1]["content"] = "an edited answer"
    write_jsonl(src, records)
    edited = prep(tok, f"jsonl:{src}", tmp_path)
    assert edited.built and edited.path != ds.path
    assert tok[0].decode(edited[5][0].tolist()).count("an edited answer") == 1
    assert prep(tok, f"jsonl:{src}", tmp_path, max_seq_len=256).path != edited.path  # max_seq_len keys too


def test_parallel_build_equals_serial(tok, tmp_path):
    records = conversations(2 * data.CHUNK + 17, hi=10)
    paths = [f"jsonl:{write_jsonl(tmp_path / 'sft.jsonl', records)}"]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records[:data.CHUNK + 5]).save_to_disk(str(tmp_path / "local"))
    paths.append(f"local:{tmp_path / 'local'}")  # rows read by the forked workers from the Arrow files
    one = prep(tok, paths, tmp_path / "a", num_proc=1, num_samples=[None, 0.9])
    two = prep(tok, paths, tmp_path / "b", num_proc=2, num_samples=[None, 0.9])
    assert two.built and one.path.name == two.path.name and len(two) == len(records) + round(0.9 * (data.CHUNK + 5))
    for name in ("ids", "mask", "offsets"):
        assert np.array_equal(getattr(one, name), getattr(two, name))


def test_cli_prints_statistics(ckpt, tmp_path, capsys):
    src = write_jsonl(tmp_path / "s.jsonl", conversations(30, seed=4))
    argv = ["--ckpt_dir", str(ckpt), "--template_config", "llama3_instruct", "--train_data_paths", f"jsonl:{src}",
            "--val_data_paths", f"jsonl:{src}", "--val_num_samples", "5", "--max_seq_len", "64",
            "--data_cache_dir", str(tmp_path / "cache"), "--micro_batch_size_per_gpu", "2", "--num_proc", "1"]
    out = data.main(argv)
    text = capsys.readouterr().out
    assert len(out["train"]) + out["train"].stats["dropped"].get("too_long", 0) == 30 and len(out["val"]) <= 5
    assert f"samples: {len(out['train'])} kept of 30; truncated {out['train'].stats['truncated']}" in text
    assert "length before truncation: {'mean'" in text and "steps per epoch on one rank; padding fraction: padded" in text
    data.main(argv)
    assert "(from cache)" in capsys.readouterr().out


def test_length_policy(tok, tmp_path):
    long = " ".join(["word"] * 300)
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long}]},  # truncated
        {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}]},  # too long
        {"messages": [{"role": "user", "content": "no answer"}]},                                    # no target
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"}]},
    ]
    ds = prep(tok, f"jsonl:{write_jsonl(tmp_path / 'x.jsonl', records)}", tmp_path, max_seq_len=64)
    s = ds.stats
    assert (s["samples_in"], s["samples"], s["truncated"]) == (4, 2, 1)
    assert s["dropped"] == {"no_trained_tokens": 1, "too_long": 1}
    ids, mask = tokenize_conversation(records[0]["messages"], *tok)
    assert ds[0][0].tolist() == ids[:64] and ds[0][1].tolist() == mask[:64] and len(ds.doc(0)[0]) == 64
    assert s["length_before_truncation"]["max"] == len(tokenize_conversation(records[1]["messages"], *tok)[0])


# ---------------------------------------------------------------------------------------------------
# Sources, splits, sub-sampling, formats


def test_text_source_trains_every_token_and_appends_eos(tok, tmp_path):
    lines = ["first line of text", "", "second  line"]
    (tmp_path / "t.txt").write_text("\ufeff" + "\n".join(lines) + "\n")  # a byte-order mark is not text
    ds = prep(tok, f"text:{tmp_path / 't.txt'}", tmp_path)
    t = tok[0]
    assert len(ds) == 2  # the blank line is not a sample
    for i, line in enumerate(["first line of text", "second  line"]):
        ids, mask = ds[i]
        assert ids.tolist() == [t.bos_id] + t.encode(line) + [t.eos_id]
        assert mask.tolist() == [0] + [1] * (len(ids) - 1)
    # BOS as transformers encodes plain text: SmolLM2's config names <|im_start|> (id 1) but never adds it;
    # Mistral's sentencepiece opens with <s> although llama2_chat writes its <s> into each user turn
    from transformers import AutoTokenizer

    from dev.assets import MISTRAL_V1_TOKENIZER, asset, smollm2_tokenizer_dir
    smol = load_tokenizer(smollm2_tokenizer_dir())
    ds = prep((smol, load_template("chatml", smol)), f"text:{tmp_path / 't.txt'}", tmp_path)
    expected = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())("first line of text")["input_ids"]
    assert smol.bos_id == 1 and ds[0][0].tolist() == expected + [smol.eos_id]
    (tmp_path / "mistral").mkdir()
    shutil.copy(asset(*MISTRAL_V1_TOKENIZER), tmp_path / "mistral" / "tokenizer.model")
    sp = load_tokenizer(tmp_path / "mistral")
    ds = prep((sp, load_template("llama2_chat", sp)), f"text:{tmp_path / 't.txt'}", tmp_path)
    assert ds[0][0].tolist() == [sp.bos_id] + sp.encode("first line of text") + [sp.eos_id] and sp.bos_id == 1


def test_local_source_splits_and_subsampling(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    train, test = conversations(30, seed=1), conversations(7, seed=2)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                               "test": datasets.Dataset.from_list(test)})
    dd.save_to_disk(str(tmp_path / "dd"))
    ds = prep(tok, f"local:{tmp_path / 'dd'}", tmp_path, splits="test")
    assert len(ds) == 7 and ds[3][0].tolist() == tokenize_conversation(test[3]["messages"], *tok)[0]
    assert len(prep(tok, f"local:{tmp_path / 'dd'}", tmp_path)) == 30  # default split: train
    with pytest.raises(DataError, match=r"no split 'dev'.*\['test', 'train'\]"):
        prep(tok, f"local:{tmp_path / 'dd'}", tmp_path, splits="dev")
    (tmp_path / "empty").mkdir()
    for wrong in (tmp_path / "empty", tmp_path / "dd" / "dataset_dict.json"):
        with pytest.raises(DataError, match="not a dataset written by save_to_disk"):
            prep(tok, f"local:{wrong}", tmp_path)

    decoded = lambda d: [tok[0].decode(d[i][0].tolist()) for i in range(len(d))]
    a = prep(tok, f"local:{tmp_path / 'dd'}", tmp_path, num_samples=10, seed=3)
    b = prep(tok, f"local:{tmp_path / 'dd'}", tmp_path, num_samples="10", seed=3)
    c = prep(tok, f"local:{tmp_path / 'dd'}", tmp_path, num_samples=10, seed=4)
    assert len(a) == 10 and not b.built and decoded(a) == decoded(b) and decoded(a) != decoded(c)
    assert len(prep(tok, f"local:{tmp_path / 'dd'}", tmp_path, num_samples="0.5")) == 15
    assert len(prep(tok, f"local:{tmp_path / 'dd'}", tmp_path, num_samples="all")) == 30

    # a plain Dataset (no DatasetDict) has no splits
    datasets.Dataset.from_list(test).save_to_disk(str(tmp_path / "plain"))
    assert len(prep(tok, f"local:{tmp_path / 'plain'}", tmp_path)) == 7


def test_hub_source_through_load_dataset(tok, tmp_path, monkeypatch):
    """A bare name goes to datasets.load_dataset; offline, a local directory in the hub's data/ layout
    (split name in the file name, as ultrachat_200k's train_sft) stands in for a cached hub dataset."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # not the user's cache
    repo = tmp_path / "fake_hub_repo"
    (repo / "data").mkdir(parents=True)
    records = conversations(12, seed=5)
    write_jsonl(repo / "data" / "train_sft-00000-of-00001.jsonl", records)
    write_jsonl(repo / "data" / "test_sft-00000-of-00001.jsonl", records[:4])
    ds = prep(tok, str(repo), tmp_path, splits="train_sft")
    assert len(ds) == 12 and ds[7][0].tolist() == tokenize_conversation(records[7]["messages"], *tok)[0]
    assert len(prep(tok, str(repo), tmp_path, splits="test_sft")) == 4
    with pytest.raises(DataError, match="load_dataset failed"):
        prep(tok, "no-such-org/no-such-dataset-xyz", tmp_path, splits="train")


def test_mixed_sources_jsonl_subsampled_and_text(tok, tmp_path):
    records = conversations(40, seed=6)
    src = write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.txt").write_text("plain one\nplain two\n")
    ds = prep(tok, [f"jsonl:{src}", f"text:{tmp_path / 'b.txt'}"], tmp_path, num_samples=["0.25", "all"], seed=1)
    assert len(ds) == 12
    first = [tok[0].decode(ds[i][0].tolist()) for i in range(10)]
    ids = [int(s.split("<|start_header_id|>user<|end_header_id|>\n\nq")[1].split()[0]) for s in first]
    assert ids == sorted(ids) and len(set(ids)) == 10  # a subset, kept in file order
    assert tok[0].decode(ds[11][0].tolist()).endswith("plain two<|end_of_text|>")
    with pytest.raises(DataError, match="2 values for 3 data paths"):
        prep(tok, [f"jsonl:{src}"] * 3, tmp_path, num_samples=[1, 2])


def test_preference_formats_mask_only_the_final_response(tok, tmp_path):
    prompt = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
              {"role": "user", "content": "second question"}]
    full = {"chosen": prompt + [{"role": "assistant", "content": "good answer"}],
            "rejected": prompt + [{"role": "assistant", "content": "bad answer"}], "score": 3}
    split = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "good answer"}],
             "rejected": [{"role": "assistant", "content": "bad answer"}]}
    strings = {"prompt": "first question", "chosen": "good answer", "rejected": "bad answer"}
    src = write_jsonl(tmp_path / "p.jsonl", [full, split, strings])
    ds = prep(tok, f"jsonl:{src}", tmp_path, kind="preference")
    assert len(ds) == 3 and len(ds.offsets) == 7
    (c_ids, c_mask), (r_ids, r_mask) = ds[0]
    assert ds[1][0][0].tolist() == c_ids.tolist() and ds[1][1][0].tolist() == r_ids.tolist()
    t = tok[0]
    trained = lambda ids, mask: t.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m])
    assert trained(c_ids, c_mask) == "good answer<|eot_id|>" and trained(r_ids, r_mask) == "bad answer<|eot_id|>"
    assert c_ids.tolist() == tokenize_conversation(full["chosen"], *tok)[0]
    (c_ids, c_mask), _ = ds[2]
    assert c_ids.tolist() == tokenize_conversation([{"role": "user", "content": "first question"},
                                                    {"role": "assistant", "content": "good answer"}], *tok)[0]

    # a pair is dropped when either side loses its response to max_seq_len
    long = {"prompt": "q", "chosen": "short", "rejected": " ".join(["x"] * 200)}
    long2 = {"prompt": " ".join(["x"] * 200), "chosen": "short", "rejected": "short"}
    ds = prep(tok, f"jsonl:{write_jsonl(tmp_path / 'q.jsonl', [long, long2, strings])}", tmp_path,
              max_seq_len=64, kind="preference")
    assert (len(ds), ds.stats["truncated"], ds.stats["dropped"]) == (2, 1, {"too_long": 1})


def test_empty_replies_are_dropped_and_counted(tok, tmp_path):
    """A trained assistant turn with no content and no tool call would train the end-of-turn token alone
    (the model learns to answer with nothing): the record is dropped and counted, never kept."""
    u, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "fine"}
    sft = [{"messages": [u, {"role": "assistant", "content": ""}]},
           {"messages": [u, {"role": "assistant", "content": [{"type": "text", "text": " \n"}]}]},
           {"messages": [u, {"role": "assistant", "content": " "}, u, a]},  # an empty turn mid-conversation
           {"messages": [u, a]}]
    ds = prep(tok, f"jsonl:{write_jsonl(tmp_path / 's.jsonl', sft)}", tmp_path)
    assert (ds.stats["samples_in"], len(ds), ds.stats["dropped"]) == (4, 1, {"empty_reply": 3})
    assert ds.doc(0)[0].tolist() == tokenize_conversation([u, a], *tok)[0]
    assert "samples: 1 kept of 4; truncated 0; dropped 3 {'empty_reply': 3}" in data.format_stats("train", ds)
    with pytest.raises(DataError, match=r"every one of the 1 samples.*\{'empty_reply': 1\} \(.*empty_reply: an "
                                        r"assistant turn with no content and no tool call"):
        prep(tok, f"jsonl:{write_jsonl(tmp_path / 'e.jsonl', sft[:1])}", tmp_path)

    # preference: only the final response is trained, so only it must say something
    pairs = [{"prompt": "q", "chosen": "", "rejected": "no"}, {"prompt": "q", "chosen": "yes", "rejected": "\t"},
             {"chosen": [u, {"role": "assistant", "content": ""}, u, a],
              "rejected": [u, {"role": "assistant", "content": ""}, u, {"role": "assistant", "content": "bad"}]}]
    ds = prep(tok, f"jsonl:{write_jsonl(tmp_path / 'p.jsonl', pairs)}", tmp_path, kind="preference")
    assert (len(ds), ds.stats["dropped"]) == (1, {"empty_reply": 2})


def test_record_shapes_build_the_same_cache(tok, tmp_path):
    """ShareGPT records and content parts give the cache exactly what the plain message records give."""
    plain = conversations(6)

    def sharegpt(r):
        roles = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in r["messages"]]}

    def parts(r):  # each content cut in two text parts, mid-word: they join with nothing between them
        return {"messages": [{**m, "content": [{"type": "text", "text": t} for t in (c[:len(c) // 2], c[len(c) // 2:])]}
                             for m in r["messages"] for c in [m["content"]]]}
    mixed = [sharegpt(r) if i % 2 else parts(r) for i, r in enumerate(plain)]
    want = prep(tok, f"jsonl:{write_jsonl(tmp_path / 'plain.jsonl', plain)}", tmp_path)
    got = prep(tok, f"jsonl:{write_jsonl(tmp_path / 'mixed.jsonl', mixed)}", tmp_path)
    assert len(got) == len(want) == 6
    for i in range(6):
        assert [x.tolist() for x in got.doc(i)] == [x.tolist() for x in want.doc(i)]

    pair = {"conversations": [{"from": "human", "value": "2 + 2?"}], "chosen": {"from": "gpt", "value": "4."},
            "rejected": {"from": "gpt", "value": "5."}}
    ranking = prep(tok, f"jsonl:{write_jsonl(tmp_path / 'r.jsonl', [pair])}", tmp_path, kind="preference")
    strings = {"prompt": "2 + 2?", "chosen": "4.", "rejected": "5."}
    strings = prep(tok, f"jsonl:{write_jsonl(tmp_path / 's.jsonl', [strings])}", tmp_path, kind="preference")
    for d in range(2):
        assert [x.tolist() for x in ranking.doc(d)] == [x.tolist() for x in strings.doc(d)]


# ---------------------------------------------------------------------------------------------------
# Bad input: each error names the place and the fix; nothing is left in the cache


def test_malformed_json_line(tok, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(conversations(1)[0]) + "\n\n" + '{"messages": [}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 3: malformed JSON"):
        prep(tok, f"jsonl:{src}", tmp_path)
    assert cache_entries(tmp_path) == []


def test_wrong_schema_names_the_key(tok, tmp_path):
    good = conversations(2)
    src = write_jsonl(tmp_path / "s.jsonl", good + [{"conversation": []}])
    with pytest.raises(DataError, match=r"s.jsonl line 3: missing key 'messages' \(keys: \['conversation'\]\)"):
        prep(tok, f"jsonl:{src}", tmp_path)
    src = write_jsonl(tmp_path / "s.jsonl", good + [{"messages": [{"role": "user", "text": "hi"}]}])
    with pytest.raises(DataError, match=r"line 3: messages\[0\].content must be a string"):
        prep(tok, f"jsonl:{src}", tmp_path)
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"p.jsonl line 1: missing key 'rejected'"):
        prep(tok, f"jsonl:{src}", tmp_path, kind="preference")
    assert cache_entries(tmp_path) == []


def test_empty_file(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl: the file is empty"):
        prep(tok, f"jsonl:{tmp_path / 'empty.jsonl'}", tmp_path)


def test_every_sample_dropped(tok, tmp_path):
    records = [{"messages": [{"role": "user", "content": "no answer"}]}] * 3 + [
        {"messages": [{"role": "user", "content": "x " * 100}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(DataError, match=r"every one of the 4 samples.*'no_trained_tokens': 3, 'too_long': 1"):
        prep(tok, f"jsonl:{write_jsonl(tmp_path / 'd.jsonl', records)}", tmp_path, max_seq_len=32)
    assert cache_entries(tmp_path) == []


def test_missing_path(tok, tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl does not exist"):
        prep(tok, f"jsonl:{tmp_path / 'nope.jsonl'}", tmp_path)


def test_unknown_source_prefix(tok, tmp_path):
    with pytest.raises(DataError, match=r"unknown source prefix 'csv'; use jsonl:, text:, local:"):
        prep(tok, f"csv:{tmp_path / 'x.csv'}", tmp_path)


def test_datasets_missing_is_a_clear_error(tok, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"need the `datasets` package: pip install datasets"):
        prep(tok, f"local:{tmp_path / 'd'}", tmp_path)


def test_interrupt_leaves_nothing_and_stale_temps_are_removed(tok, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "sft.jsonl", conversations(3 * data.CHUNK, hi=4))
    real, calls = data._tokenize_task, []

    def interrupted(task):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(data, "_tokenize_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep(tok, f"jsonl:{src}", tmp_path)
    assert cache_entries(tmp_path) == []
    monkeypatch.setattr(data, "_tokenize_task", real)

    # a build killed with SIGKILL leaves its temp dir; the next build of that key removes it
    name = prep(tok, f"jsonl:{src}", tmp_path).path.name
    shutil.rmtree(tmp_path / "cache" / name)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "cache" / f".tmp-{name}-{socket.gethostname()}-{dead.pid}-abcdef"
    stale.mkdir()
    prep(tok, f"jsonl:{src}", tmp_path)
    assert cache_entries(tmp_path) == [name]


SLOW_CLI = """
import sys, time
sys.path.insert(0, {repo!r})
import data
real = data._tokenize_task
def slow(task):  # module level in __main__, so the forked pool workers can run it
    time.sleep(0.2)
    return real(task)
data._tokenize_task = slow
data.main(sys.argv[1:])
"""


def test_sigterm_during_build_leaves_nothing(ckpt, tmp_path):
    """torchrun stops workers with SIGTERM; the CLI, mid-build with a process pool, must clean up."""
    src = write_jsonl(tmp_path / "big.jsonl", conversations(20 * data.CHUNK, hi=3))
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI.format(repo=str(REPO)))
    cmd = [sys.executable, str(script), "--ckpt_dir", str(ckpt), "--template_config", "llama3_instruct",
           "--train_data_paths", f"jsonl:{src}", "--max_seq_len", "512", "--data_cache_dir",
           str(tmp_path / "cache"), "--num_proc", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.startswith(".tmp-") for p in (tmp_path / "cache").glob("*")):
            break
        time.sleep(0.01)
    time.sleep(0.5)  # the pool is up and some chunks are written
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert cache_entries(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# Batches


@pytest.fixture(scope="module")
def sft(tok, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    return prep(tok, f"jsonl:{write_jsonl(tmp / 's.jsonl', conversations(37, seed=9, hi=20))}", tmp, max_seq_len=128)


def test_padded_batch_labels_are_shifted_targets(sft):
    batch = next(iter(Loader(sft, 4, seed=0, shuffle=False)))
    assert batch["sample_ids"].tolist() == [0, 1, 2, 3]
    T = int(sft.doc_lengths[:4].max())
    for k in ("input_ids", "labels", "position_ids", "document_ids"):
        assert batch[k].shape == (4, T) and batch[k].dtype == torch.int64
    for r in range(4):
        ids, mask = (torch.from_numpy(x.astype(np.int64)) for x in sft[r])
        n = len(ids)
        assert batch["input_ids"][r, :n].tolist() == ids.tolist()
        want = torch.where(mask[1:].bool(), ids[1:], -100).tolist() + [-100] * (T - n + 1)
        assert batch["labels"][r].tolist() == want
        assert batch["document_ids"][r].tolist() == [0] * n + [-1] * (T - n)
        assert batch["position_ids"][r, :n].tolist() == list(range(n))


def tiny_llama(vocab_size):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


def test_packing_isolates_documents_and_matches_padded_loss(sft):
    packed = Loader(sft, 2, pack=True, seed=1)
    batch = next(iter(packed))
    padded = Loader(sft, 2, seed=0).collate([[s] for s in batch["sample_ids"].tolist()])
    # a tiny vocabulary keeps the model small: renumber the tokens in use (same map for both batches)
    used = torch.unique(torch.cat([batch["input_ids"].flatten(), padded["input_ids"].flatten()]))
    remap = lambda x: torch.where(x == -100, x, torch.searchsorted(used, x.clamp(min=0)))
    for b in (batch, padded):
        b["input_ids"], b["labels"] = remap(b["input_ids"]), remap(b["labels"])
    model = tiny_llama(len(used))
    docs = batch["document_ids"]
    assert batch["input_ids"].shape == (2, 128) and (docs.max(-1).values >= 1).all()  # >= 2 docs per row
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=dense_mask(batch["segments"], *docs.shape),
                       position_ids=batch["position_ids"]).logits
        leaky = model(batch["input_ids"]).logits  # plain causal attention: documents see their neighbours
        worst = leak = 0.0
        for r in range(2):
            for d in range(int(docs[r].max()) + 1):
                cols = (docs[r] == d).nonzero().flatten()
                alone = model(batch["input_ids"][r, cols][None]).logits[0]
                worst = max(worst, (logits[r, cols] - alone).abs().max().item())
                leak = max(leak, (leaky[r, cols] - alone).abs().max().item())
        assert worst <= 1e-5 and leak > 1e-2

        # the same documents, padded: the token-mean loss is the same
        padded_logits = model(padded["input_ids"]).logits
    ce = lambda lg, lb: torch.nn.functional.cross_entropy(lg.flatten(0, 1), lb.flatten(), ignore_index=-100)
    assert (batch["labels"] != -100).sum() == (padded["labels"] != -100).sum()
    assert abs(ce(logits, batch["labels"]).item() - ce(padded_logits, padded["labels"]).item()) <= 1e-5


def test_packing_plan_keeps_documents_whole(sft):
    loader = Loader(sft, 3, pack=True, seed=2)
    seen = []
    for batch in loader:
        docs, pos = batch["document_ids"], batch["position_ids"]
        for r in range(3):
            n_docs = int(docs[r].max()) + 1
            for d in range(n_docs):
                cols = (docs[r] == d).nonzero().flatten()
                assert pos[r, cols].tolist() == list(range(len(cols)))
            # the first token of a document is never a target of its predecessor
            starts = (docs[r, 1:] != docs[r, :-1]).nonzero().flatten()
            assert (batch["labels"][r, starts] == -100).all()
        seen += batch["sample_ids"].tolist()
    assert sorted(seen) == list(range(len(sft))) and loader.epoch == 1
    for lo in (Loader(sft, 3, pack=True, seed=2), Loader(sft, 3, seed=2)):  # padding_fraction reads the plan
        want = data.padding_fraction(lo)
        docs = torch.cat([b["document_ids"].flatten() for b in lo])
        assert abs((docs == -1).float().mean().item() - want) < 1e-6


def test_batches_compute_no_padding_column_and_no_spare_filler_row(sft):
    """A batch ends at its fullest row (packed rows too: no column is padding in every row), and an epoch's
    last step has only the rows left; a rank with none left gets one filler row with nothing trained."""
    for loader in (Loader(sft, 4, pack=True, seed=3), Loader(sft, 5, seed=3)):
        n, B = len(loader.rows(0)), loader.batch_size
        batches = list(loader)
        assert all((b["document_ids"] >= 0).any(0).all() for b in batches)
        assert [len(b["input_ids"]) for b in batches] == [min(B, n - a) for a in range(0, n, B)]
    assert len(sft) % 4 == 1  # with 2 ranks of 2 rows, the last step's one sample goes to rank 0
    last = [list(Loader(sft, 2, seed=0, rank=r, world_size=2))[-1] for r in range(2)]
    assert len(last[0]["input_ids"]) == 1 and last[0]["sample_ids"].numel() == 1
    assert len(last[1]["input_ids"]) == 1 and last[1]["sample_ids"].numel() == 0
    assert (last[1]["labels"] == -100).all()


def test_fixed_shape_packed_batches_are_the_batches_padded(sft):
    """Compiled runs (--compile) take packed batches of one shape, [batch_size, row capacity], so the compiled
    blocks never see a new one: each is the plain batch with padding columns (pad id, label -100, position 0,
    document -1) and empty rows added, the segments and counts unchanged. Epoch ends with fewer rows and a
    rank's filler row included; padded batches are left as they are."""
    assert len(Loader(sft, 2, pack=True, seed=4).rows(0)) == 12  # 5 ranks of 2: rank 0 ends with one row, rank 4
    for rank, filler in ((0, False), (4, True)):  # with a filler row
        kw = dict(batch_size=2, pack=True, seed=4, rank=rank, world_size=5, pad_id=7)
        plain, fixed = list(Loader(sft, **kw)), list(Loader(sft, **kw, fixed_shape=True))
        assert len(plain) == len(fixed) == 2 and len(plain[-1]["input_ids"]) == 1
        assert (len(plain[-1]["sample_ids"]) == 0) == filler
        for a, b in zip(plain, fixed):
            R, T = a["input_ids"].shape
            assert b["input_ids"].shape == (2, 128)
            fill = {"input_ids": 7, "labels": -100, "position_ids": 0, "document_ids": -1, "response_ids": -1}
            for k, v in fill.items():
                assert torch.equal(b[k][:R, :T], a[k]), k
                assert (b[k][:, T:] == v).all() and (b[k][R:] == v).all(), k
            for k in ("segments", "sample_ids", "tokens"):
                assert torch.equal(a[k], b[k]), k
    padded = Loader(sft, 3, seed=0, fixed_shape=True)
    assert [b["input_ids"].shape for b in padded] == [b["input_ids"].shape for b in Loader(sft, 3, seed=0)]


def test_preference_batch_is_chosen_then_rejected(tok, tmp_path):
    records = [{"prompt": f"q{i} " + "x " * i, "chosen": f"good {i}", "rejected": f"bad {i}" + " y" * i}
               for i in range(5)]
    ds = prep(tok, f"jsonl:{write_jsonl(tmp_path / 'p.jsonl', records)}", tmp_path, kind="preference")
    loader = Loader(ds, 2, seed=0, shuffle=False, rank=1, world_size=2)
    batches = list(loader)
    assert len(batches) == 2 and [b["sample_ids"].tolist() for b in batches] == [[1, 3], []]
    b = batches[0]
    assert b["input_ids"].shape[0] == 4
    text = [tok[0].decode([t for t in row.tolist() if t != -100]) for row in b["labels"]]
    assert text == ["good 1<|eot_id|>", "good 3<|eot_id|>", "bad 1 y<|eot_id|>", "bad 3 y y y<|eot_id|>"]
    assert ((batches[1]["labels"] != -100).sum(-1) == 0).all()  # filler rows: nothing trained
    with pytest.raises(DataError, match="share_prompt .* needs packing"):
        Loader(ds, 2, share_prompt=True)


# ---------------------------------------------------------------------------------------------------
# Distributed slices, determinism, resume


def epoch_samples(ds, world, **kw):
    """Per-rank lists of sample ids for one epoch, ranks simulated in-process."""
    out = []
    for rank in range(world):
        loader = Loader(ds, rank=rank, world_size=world, **kw)
        out.append([s for b in loader for s in b["sample_ids"].tolist()])
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_same_seed_same_order_and_resume_mid_epoch(sft, pack):
    kw = dict(batch_size=2, pack=pack, seed=7)
    full = epoch_samples(sft, 2, **kw)
    assert full == epoch_samples(sft, 2, **kw) and full != epoch_samples(sft, 2, **{**kw, "seed": 8})
    assert sorted(full[0] + full[1]) == list(range(len(sft)))

    loaders = [Loader(sft, rank=r, world_size=2, **kw) for r in range(2)]
    its = [iter(lo) for lo in loaders]
    head = [[s for _ in range(3) for s in next(it)["sample_ids"].tolist()] for it in its]
    state = loaders[0].state_dict()
    assert state == loaders[1].state_dict()
    resumed = [Loader(sft, rank=r, world_size=2, **kw) for r in range(2)]
    for lo in resumed:
        lo.load_state_dict(json.loads(json.dumps(state)))
    tail = [[s for b in lo for s in b["sample_ids"].tolist()] for lo in resumed]
    assert [h + t for h, t in zip(head, tail)] == full
    assert all(lo.epoch == 1 and lo.consumed == 0 for lo in resumed)

    # resuming on one rank instead of two still sees exactly the unseen samples
    single = Loader(sft, **{**kw, "batch_size": 3}, rank=0, world_size=1)
    single.load_state_dict(state)
    rest = [s for b in single for s in b["sample_ids"].tolist()]
    assert sorted(head[0] + head[1] + rest) == list(range(len(sft)))
    with pytest.raises(DataError, match="seed=7 but this run has 8"):
        Loader(sft, 2, seed=8).load_state_dict(state)


WORKER = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {repo!r})
from data import Loader, prepare_dataset
from tokenize_chat import load_template, load_tokenizer
dist.init_process_group("gloo")
rank = dist.get_rank()
ds = prepare_dataset("jsonl:{src}", load_tokenizer({ckpt!r}), load_template("llama3_instruct"), 128,
                     cache_dir={cache!r}, num_proc=1, progress=False)
out = {{"built": ds.built, "path": str(ds.path)}}
for pack in (False, True):
    loader = Loader(ds, 3, pack=pack, seed=11)
    out[str(pack)] = [b["sample_ids"].tolist() for b in loader]
try:  # a failed build on rank 0 is an error on every rank, not a hang
    prepare_dataset("jsonl:{bad}", load_tokenizer({ckpt!r}), load_template("llama3_instruct"), 128,
                    cache_dir={cache!r}, num_proc=1, progress=False)
except ValueError as e:
    out["error"] = str(e)
json.dump(out, open(os.path.join({tmp!r}, f"rank{{rank}}.json"), "w"))
dist.destroy_process_group()
"""


def test_two_ranks_torchrun_disjoint_and_complete(ckpt, tmp_path):
    n = 41
    src = write_jsonl(tmp_path / "s.jsonl", conversations(n, seed=12))
    script = tmp_path / "worker.py"
    (tmp_path / "bad.jsonl").write_text('{"messages": [}\n')
    script.write_text(WORKER.format(repo=str(REPO), src=src, ckpt=str(ckpt), cache=str(tmp_path / "cache"),
                                    tmp=str(tmp_path), bad=tmp_path / "bad.jsonl"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             "2", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["built"] for r in ranks] == [True, False] and ranks[0]["path"] == ranks[1]["path"]
    assert cache_entries(tmp_path) == [Path(ranks[0]["path"]).name]
    assert "bad.jsonl line 1: malformed JSON" in ranks[0]["error"]
    assert ranks[1]["error"].startswith("rank 0 failed to build the data cache: DataError: ")
    for pack in ("False", "True"):
        assert len(ranks[0][pack]) == len(ranks[1][pack])  # same number of steps: no rank waits forever
        seen = [s for r in ranks for b in r[pack] for s in b]
        assert sorted(seen) == list(range(n))
