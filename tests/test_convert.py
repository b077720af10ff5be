"""convert.py: HF <-> native round trips, every input layout, and bad input that must fail cleanly."""

import json
import resource
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
from model import Transformer, generate
from tiny import hf_model, native_model, save_hf


def run(*argv):
    convert.main([str(a) for a in argv])


def snapshot(path: Path) -> dict:
    """Every file under path with its size and mtime: 'untouched' means this is unchanged."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))} if path.exists() else {}


@pytest.mark.parametrize("family", ["llama3.1", "qwen2", "mistral", "qwen2-untied"])
def test_hf_native_hf_round_trip_is_bit_exact(tmp_path, family):
    hf, native_dir = native_model(tmp_path, family)
    original = load_file(tmp_path / f"{family}-hf" / "model.safetensors")
    run("--to_hf", "--ckpt_paths", native_dir, "--output_dir", tmp_path / "back", "--precision", "fp32")
    exported = load_file(tmp_path / "back" / "model.safetensors")
    if hf.config.tie_word_embeddings:
        original.pop("lm_head.weight", None)
    assert exported.keys() == original.keys()
    for k in original:
        assert torch.equal(exported[k], original[k]), k

    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(reloaded) is type(hf)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


def test_to_hf_from_scratch_config_and_sharding(tmp_path, monkeypatch):
    """Without the source config.json beside the native weights, --to_hf writes one transformers loads;
    above the shard size it writes several safetensors files and an index."""
    hf, native_dir = native_model(tmp_path, "llama3.1")
    (native_dir / "config.json").unlink()
    monkeypatch.setattr(convert, "SHARD_BYTES", 200_000)
    run("--to_hf", "--ckpt_paths", native_dir / "consolidated.00.pth", "--output_dir", tmp_path / "out",
        "--precision", "fp32")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


def test_export_replaces_a_previous_export(tmp_path, monkeypatch):
    """Exporting into a dir holding an earlier export: its weight files go (transformers loaded an old
    model.safetensors in preference to new shards beside it), a file of the user's stays."""
    hf, native_dir = native_model(tmp_path, "llama3")
    out = tmp_path / "out"
    run("--to_hf", "--ckpt_paths", native_dir, "--output_dir", out, "--precision", "bf16")  # one model.safetensors
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(convert, "SHARD_BYTES", 200_000)
    run("--to_hf", "--ckpt_paths", native_dir, "--output_dir", out, "--precision", "fp32")  # shards + index
    assert not (out / "model.safetensors").exists()
    assert (out / "notes.txt").read_text() == "mine"
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)  # fp32: not the bf16 export
    monkeypatch.setattr(convert, "SHARD_BYTES", 5 * 1024**3)
    run("--to_hf", "--ckpt_paths", native_dir, "--output_dir", out)  # back to one file: the shards go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_to_hf_default_precision_is_the_native_dtype(tmp_path):
    """--to_hf without --precision writes the native weights' own dtype: an fp32 run exports bit-exact (the
    default used to be bf16, which rounded every weight); --precision bf16 still casts."""
    _, native_dir = native_model(tmp_path, "llama3")  # fp32 native weights
    original = load_file(tmp_path / "llama3-hf" / "model.safetensors")
    run("--to_hf", "--ckpt_paths", native_dir, "--output_dir", tmp_path / "default")
    exported = load_file(tmp_path / "default" / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(exported[k].dtype == torch.float32 and torch.equal(exported[k], original[k]) for k in original)
    assert json.loads((tmp_path / "default" / "config.json").read_text())["dtype"] == "float32"
    run("--to_hf", "--ckpt_paths", native_dir, "--output_dir", tmp_path / "bf16", "--precision", "bf16")
    cast = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(torch.equal(cast[k], original[k].bfloat16()) for k in original)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_conversion_replaces_previous_tokenizer_files(hf_dir, tmp_path):
    """A native dir holds exactly one conversion's tokenizer files: a stale tokenizer.model or chat template
    from an earlier conversion into the same dir would be read instead of the new tokenizer.json."""
    (hf_dir / "tokenizer.model").write_text("tiktoken ranks")
    (hf_dir / "chat_template.jinja").write_text("{{ messages }}")
    out = tmp_path / "native"
    run("--ckpt_paths", hf_dir, "--output_dir", out)
    (out / "notes.txt").write_text("mine")
    (hf_dir / "tokenizer.model").unlink()
    (hf_dir / "chat_template.jinja").unlink()
    (hf_dir / "tokenizer.json").write_text("{}")
    run("--ckpt_paths", hf_dir, "--output_dir", out)
    names = {p.name for p in out.iterdir()}
    assert {"consolidated.00.pth", "params.json", "config.json", "tokenizer.json", "notes.txt"} <= names
    assert not names & {"tokenizer.model", "chat_template.jinja"}


def test_sharded_safetensors_and_bin_give_identical_weights(tmp_path):
    hf = hf_model("llama3")
    single = save_hf(hf, tmp_path / "single")
    sharded = save_hf(hf, tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    state = load_file(single / "model.safetensors")
    # .bin layouts as older transformers wrote them: one pytorch_model.bin, or shards plus an index.
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(single / "config.json", binary)
    torch.save(state, binary / "pytorch_model.bin")
    bin_sharded = tmp_path / "bin_sharded"
    bin_sharded.mkdir()
    shutil.copy(single / "config.json", bin_sharded)
    keys, weight_map = list(state), {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, bin_sharded / name)
        weight_map.update({k: name for k in part})
    (bin_sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    outputs = {}
    for src in (single, sharded, binary, bin_sharded):
        run("--ckpt_paths", src, "--output_dir", tmp_path / f"{src.name}-native", "--precision", "fp32")
        outputs[src.name] = torch.load(tmp_path / f"{src.name}-native" / "consolidated.00.pth", weights_only=True)
    ref = outputs.pop("single")
    for name, out in outputs.items():
        assert out.keys() == ref.keys(), name
        assert all(torch.equal(out[k], ref[k]) for k in ref), name


def test_convert_into_the_hf_dir_itself_with_original_tokenizer(tmp_path):
    """The torchllms README's command writes the native files into the HF dir; Llama 3's tiktoken file sits in original/."""
    hf = hf_model("llama3.1")
    hf_dir = save_hf(hf, tmp_path / "llama3.1_8b_instruct")
    (hf_dir / "original").mkdir()
    (hf_dir / "original" / "tokenizer.model").write_text("tiktoken ranks")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf_dir / name).write_text("{}")
    run("--ckpt_paths", hf_dir, "--output", hf_dir)  # the torchllms README spells it --output; default bf16
    assert {"consolidated.00.pth", "params.json", "tokenizer.model", "model.safetensors",
            "tokenizer.json", "config.json"} <= {p.name for p in hf_dir.iterdir()}
    assert not [p for p in hf_dir.iterdir() if p.name.startswith(".convert-")]
    model = Transformer.from_pretrained(hf_dir / "consolidated.00.pth")
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    ref = load_file(hf_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.tok_embeddings.weight, ref.bfloat16())


# -- bad input: non-zero exit, a message naming the problem, nothing left behind --------------------------------
def expect_failure(capsys, argv, *needles, output_dir=None):
    before = snapshot(output_dir) if output_dir else None
    with pytest.raises(SystemExit) as exc:
        run(*argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    if output_dir is not None:
        assert snapshot(output_dir) == before  # existing files untouched, no partial or temp file
    return err


@pytest.fixture
def hf_dir(tmp_path):
    return save_hf(hf_model("llama3"), tmp_path / "hf")


@pytest.fixture
def out_dir(tmp_path):
    """An output dir that already holds a previous conversion, which a failed run must not touch."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "params.json").write_text('{"previous": true}')
    (out / "consolidated.00.pth").write_bytes(b"previous weights")
    return out


def test_missing_dir(tmp_path, capsys, out_dir):
    expect_failure(capsys, ["--ckpt_paths", tmp_path / "nope", "--output_dir", out_dir], "nope", "no such directory",
                   output_dir=out_dir)


def test_fresh_output_dir_is_removed_on_failure(tmp_path, capsys, hf_dir):
    (hf_dir / "config.json").unlink()
    expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", tmp_path / "new"], "no config.json")
    assert not (tmp_path / "new").exists()


def test_no_config(hf_dir, capsys, out_dir):
    (hf_dir / "config.json").unlink()
    expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", out_dir], str(hf_dir), "no config.json",
                   output_dir=out_dir)


def test_no_weights(hf_dir, capsys, out_dir):
    (hf_dir / "model.safetensors").unlink()
    expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", out_dir], "no weights found",
                   output_dir=out_dir)


def test_unsupported_model_type(hf_dir, capsys, out_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gemma2"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", out_dir], "gemma2", "llama", "mistral",
                   "qwen2", output_dir=out_dir)


def test_missing_tensor(hf_dir, capsys, out_dir):
    state = load_file(hf_dir / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, hf_dir / "model.safetensors")
    expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", out_dir], "missing tensors",
                   "model.layers.1.mlp.up_proj.weight", output_dir=out_dir)


def test_wrong_shape(hf_dir, capsys, out_dir):
    state = load_file(hf_dir / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(state, hf_dir / "model.safetensors")
    expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", out_dir],
                   "model.layers.0.self_attn.k_proj.weight", "(16, 64)", "(32, 64)", output_dir=out_dir)


def test_unexpected_tensor(hf_dir, capsys, out_dir):
    state = load_file(hf_dir / "model.safetensors")
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, hf_dir / "model.safetensors")
    expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", out_dir], "unexpected tensor",
                   "model.layers.0.mlp.extra.weight", output_dir=out_dir)


@pytest.mark.parametrize("edit,needles", [
    (lambda c: {**c, "hidden_act": "gelu"}, ["hidden_act 'gelu'", "only silu"]),  # SwiGLU is always SiLU here
    (lambda c: {**c, "num_key_value_heads": 3}, ["num_attention_heads=4", "num_key_value_heads=3"]),
    (lambda c: {**c, "vocab_size": 0}, ["vocab_size must be a positive integer, got 0"]),
    (lambda c: {**c, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     ["llama3 rope scaling lacks low_freq_factor"]),
    (lambda c: [c], ["expected a JSON object, found a list"]),
], ids=["hidden_act", "kv_heads", "vocab_size", "llama3_rope", "list"])
def test_bad_config(hf_dir, capsys, out_dir, edit, needles):
    config = hf_dir / "config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", out_dir], str(config), *needles,
                   output_dir=out_dir)


@pytest.mark.parametrize("family,config,refused", [
    ("mistral", {"sliding_window": 8}, False),  # Mistral 7B v0.1 has 4096 of 32768: the window applies
    ("mistral", {"sliding_window": 512}, False),  # as long as max_position_embeddings: full attention
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, True),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 8}, False),  # Qwen2.5's configs: window unused
])
def test_sliding_window(tmp_path, capsys, family, config, refused):
    """Mistral's window converts, and past it (64 tokens, window 8) the logits, a packed batch (each document
    attends within itself and its window) and greedy decoding through the KV cache equal transformers';
    --to_hf writes the window back. Qwen2's per-layer window is refused."""
    hf_dir = save_hf(hf_model(family), tmp_path / "hf")
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if refused:
        expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", tmp_path / "out"], str(path),
                       "use_sliding_window", "not supported")
        assert not (tmp_path / "out").exists()
        return
    run("--ckpt_paths", hf_dir, "--output_dir", tmp_path / "out", "--precision", "fp32")
    from transformers import AutoModelForCausalLM
    ref_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = Transformer.from_pretrained(tmp_path / "out")
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - ref_model(tokens).logits).abs().max() <= 1e-4
        # two documents of 40 and 24 tokens packed in one row
        positions = torch.cat([torch.arange(40), torch.arange(24)])[None]
        packed = model(tokens[:1], positions, segments=torch.tensor([[0, 0, 40, 0, 0], [0, 40, 64, 40, 40]]))
        alone = torch.cat([ref_model(tokens[:1, :40]).logits, ref_model(tokens[:1, 40:]).logits], 1)
        assert (packed - alone).abs().max() <= 1e-4
        new = list(generate(model, tokens[0, :5].tolist(), max_new_tokens=20))
        ref = ref_model.generate(tokens[:1, :5], max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert new == ref[0, 5:].tolist()
    if family == "mistral":
        run("--to_hf", "--ckpt_paths", tmp_path / "out", "--output_dir", tmp_path / "back", "--precision", "fp32")
        assert json.loads((tmp_path / "back" / "config.json").read_text())["sliding_window"] == config["sliding_window"]


def test_output_dir_is_a_file(hf_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", afile], str(afile), "not a directory")
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("to_hf", [False, True])
def test_disk_full(tmp_path, capsys, hf_dir, native, out_dir, to_hf):
    """A file-size limit makes every write past 100 KB fail with EFBIG (Python ignores SIGXFSZ), as a full
    disk would: the error names the output dir, the dirs the run created go, an existing dir is untouched."""
    argv = ["--to_hf", "--ckpt_paths", native] if to_hf else ["--ckpt_paths", hf_dir]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        nested = tmp_path / "a" / "b" / "c"
        expect_failure(capsys, [*argv, "--output_dir", nested, "--precision", "fp32"], str(nested), "File too large")
        expect_failure(capsys, [*argv, "--output_dir", out_dir, "--precision", "fp32"], str(out_dir),
                       "File too large", output_dir=out_dir)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not (tmp_path / "a").exists()


def test_truncated_safetensors(hf_dir, capsys, out_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", out_dir], "model.safetensors",
                   output_dir=out_dir)


def test_failure_while_writing_leaves_the_hf_dir_as_it_was(hf_dir, capsys, monkeypatch):
    """The worst case: converting into the input dir itself and failing half-way through the weights."""
    before = snapshot(hf_dir)
    original = convert.permute_to_native
    calls = []

    def flaky(w, n):
        calls.append(1)
        if len(calls) == 3:
            raise convert.ConvertError("disk full (simulated)")
        return original(w, n)

    monkeypatch.setattr(convert, "permute_to_native", flaky)
    expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", hf_dir], "disk full")
    assert snapshot(hf_dir) == before


def test_pickled_object_in_bin_is_refused(tmp_path, capsys, hf_dir, out_dir):
    state = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    torch.save({**state, "evil": Payload()}, hf_dir / "pytorch_model.bin")  # runs code when unpickled
    err = expect_failure(capsys, ["--ckpt_paths", hf_dir, "--output_dir", out_dir], "pytorch_model.bin",
                         "weights_only", output_dir=out_dir)
    assert "Traceback" not in err


# -- native dirs that do not match their params.json --------------------------------------------------------------
@pytest.fixture(scope="module")
def native(tmp_path_factory):
    _, native_dir = native_model(tmp_path_factory.mktemp("native"), "llama3")
    return native_dir


def tampered(native, tmp_path, edit):
    out = tmp_path / "tampered"
    shutil.copytree(native, out)
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    edit(state)
    torch.save(state, out / "consolidated.00.pth")
    return out


def test_native_missing_tensor_named(native, tmp_path, capsys):
    bad = tampered(native, tmp_path, lambda s: s.pop("layers.1.ffn_norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensors.*layers\.1\.ffn_norm\.weight"):
        Transformer.from_pretrained(bad)
    expect_failure(capsys, ["--to_hf", "--ckpt_paths", bad, "--output_dir", tmp_path / "x"], "layers.1.ffn_norm.weight")
    assert not (tmp_path / "x").exists()


def test_native_extra_tensor_named(native, tmp_path):
    bad = tampered(native, tmp_path, lambda s: s.update({"layers.0.attention.wq.scales": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors.*layers\.0\.attention\.wq\.scales"):
        Transformer.from_pretrained(bad)


@pytest.mark.parametrize("name,text,needle", [
    ("params.json", "{oops", "invalid JSON"),
    ("params.json", "[1]", "expected a JSON object"),
    ("params.json", '{"dim": 64, "n_heads": 4, "n_kv_heads": 3, "vocab_size": 512}', "n_kv_heads=3"),
    ("config.json", "{oops", "invalid JSON"),
])
def test_to_hf_bad_json_in_native_dir(native, tmp_path, capsys, name, text, needle):
    bad = tmp_path / "bad"
    shutil.copytree(native, bad)
    (bad / name).write_text(text)
    expect_failure(capsys, ["--to_hf", "--ckpt_paths", bad, "--output_dir", tmp_path / "x"], str(bad / name), needle)
    assert not (tmp_path / "x").exists()


def test_native_wrong_shape_named(native, tmp_path):
    bad = tampered(native, tmp_path, lambda s: s.update({"norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"norm\.weight has shape \(3,\)"):
        Transformer.from_pretrained(bad)


class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_native_pickled_object_refused(native, tmp_path, capsys):
    bad = tmp_path / "evil"
    shutil.copytree(native, bad)
    state = torch.load(bad / "consolidated.00.pth", weights_only=True)
    torch.save({**state, "payload": Payload()}, bad / "consolidated.00.pth")
    with pytest.raises(ValueError, match="tensor-only"):
        Transformer.from_pretrained(bad)
    assert "arbitrary code ran" not in capsys.readouterr().out


def test_native_dir_without_params(native, tmp_path):
    bad = tmp_path / "noparams"
    shutil.copytree(native, bad)
    (bad / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json"):
        Transformer.from_pretrained(bad)
