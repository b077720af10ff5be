"""generate.py against transformers' greedy `generate`, stop tokens, batched prompts files, piped chat."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import generate as gen
import lora
from model import Transformer, generate
from sft_fixtures import REPO, env, train_bpe_tokenizer
from tiny import hf_model, save_hf
from tokenize_chat import load_template, load_tokenizer, stop_token_ids, tokenize_conversation

STOP_PROMPT = "What is 2 plus 3?"  # the crafted model ends its greedy answer to this one with <|im_end|>
PROMPTS = [STOP_PROMPT, "Hi", "What is 12 plus 30? And doubled, please: you add numbers.", "x"]
N = 24  # max_new_tokens


def prompt_ids(tok, tpl, prompt, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenize_conversation(messages, tok, tpl, add_generation_prompt=True)[0]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A tiny random Llama (untied, GQA) with a ChatML BPE tokenizer, converted to a native dir, whose
    greedy answer to STOP_PROMPT reaches <|im_end|>: its output row is made 1.05x the row of a token the
    model emits there, so <|im_end|> outscores that token where it would have won."""
    root = tmp_path_factory.mktemp("chat")
    tok_dir = train_bpe_tokenizer(root / "bpe")
    tok, tpl = load_tokenizer(tok_dir), load_template("chatml", load_tokenizer(tok_dir))
    hf = hf_model("llama3", seed=0, vocab_size=tok.vocab_size)
    ids = prompt_ids(tok, tpl, STOP_PROMPT)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(ids):].tolist()
    k = next(k for k in range(4, N) if out[k] not in out[:k])
    with torch.no_grad():
        hf.lm_head.weight[tok.token_id("<|im_end|>")] = 1.05 * hf.lm_head.weight[out[k]]
    hf_dir = save_hf(hf, root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, hf_dir / name)
    import convert
    convert.main(["--ckpt_paths", str(hf_dir), "--output_dir", str(root / "native"), "--precision", "fp32"])
    return hf, root / "native", tok, tpl


def hf_greedy(hf, ids, stops):
    """transformers' greedy generate; the reply ends before the first stop token."""
    out = hf.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(out) if t in stops), None)
    return out if cut is None else out[:cut], cut is not None


def test_greedy_equals_transformers_and_stops(chat, capsys):
    """Reference: transformers' LlamaForCausalLM.generate(do_sample=False) on the same prompt ids (built
    with tokenize_conversation). The printed text is the reply decoded up to, not including, the stop."""
    hf, native, tok, tpl = chat
    stops = set(stop_token_ids(tok, tpl))
    finished = set()
    for prompt in PROMPTS:
        ref, stopped = hf_greedy(hf, prompt_ids(tok, tpl, prompt), stops)
        assert 1 <= len(ref) < N if stopped else len(ref) == N
        finished.add("stop" if stopped else "length")
        assert stopped or prompt != STOP_PROMPT  # the crafted stop is reached
        gen.main(["--ckpt_paths", str(native), "--template_config", "chatml", "--prompt", prompt,
                  "--max_new_tokens", str(N)])
        printed = capsys.readouterr().out
        assert printed == tok.decode(ref) + "\n"
        assert "<|im_end|>" not in printed
    assert finished == {"stop", "length"}


def test_several_prompts_system_and_sampling(chat, capsys):
    hf, native, tok, tpl = chat
    stops = set(stop_token_ids(tok, tpl))
    gen.main(["--ckpt_paths", str(native), "--template_config", "chatml", "--prompt", "Hi", "--prompt", "x",
              "--system", "You add numbers.", "--max_new_tokens", str(N)])
    out = capsys.readouterr().out
    refs = [tok.decode(hf_greedy(hf, prompt_ids(tok, tpl, p, "You add numbers."), stops)[0]) for p in ("Hi", "x")]
    assert out == f">>> Hi\n{refs[0]}\n\n>>> x\n{refs[1]}\n"
    args = ["--ckpt_paths", str(native), "--template_config", "chatml", "--prompt", "Hi", "--temperature", "1.0",
            "--top_p", "0.9", "--top_k", "50", "--max_new_tokens", "16"]
    samples = []
    for seed in (1, 1, 2):
        gen.main(args + ["--seed", str(seed)])
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] != samples[2]  # seeded


def test_generate_batch_equals_one_at_a_time(chat):
    """Left-padded batches with a KV cache give each prompt what `model.generate` gives it alone."""
    _, native, tok, tpl = chat
    model = Transformer.from_pretrained(native)
    stops = set(stop_token_ids(tok, tpl))
    prompts = [prompt_ids(tok, tpl, p) for p in PROMPTS] + [[5, 9, 3]]
    alone = [list(generate(model, p, N, stop_ids=stops)) for p in prompts]
    assert alone == gen.generate_batch(model, prompts, N, stop_ids=stops)
    assert [a[:10] for a in alone] == gen.generate_batch(model, prompts, 10, stop_ids=stops)
    assert any(a[-1] in stops for a in alone) and any(len(a) == N for a in alone)


def test_prompts_file(chat, tmp_path):
    """One output line per input line, in input order, extra keys kept; batched equals one at a time."""
    hf, native, tok, tpl = chat
    stops = set(stop_token_ids(tok, tpl))
    lines = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]
    lines.insert(2, {"messages": [{"role": "system", "content": "You add numbers."},
                                  {"role": "user", "content": "What is 4 plus 4?"},
                                  {"role": "assistant", "content": "8."}, {"role": "user", "content": "Doubled?"}]})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines[:3]) + "\n" +
                   "".join(json.dumps(x) + "\n" for x in lines[3:]))  # a blank line is skipped
    dst = tmp_path / "sub" / "out.jsonl"
    gen.main(["--ckpt_paths", str(native), "--template_config", "chatml", "--prompts_file", str(src),
              "--output_file", str(dst), "--max_new_tokens", str(N), "--batch_size", "2"])
    got = [json.loads(x) for x in dst.read_text().splitlines()]
    assert len(got) == len(lines)
    for line, out in zip(lines, got):
        assert {k: v for k, v in out.items() if k not in ("completion", "finish_reason")} == line
        messages = line.get("messages") or [{"role": "user", "content": line["prompt"]}]
        ids = tokenize_conversation(messages, tok, tpl, add_generation_prompt=True)[0]
        ref, stopped = hf_greedy(hf, ids, stops)
        assert out["completion"] == tok.decode(ref)
        assert out["finish_reason"] == ("stop" if stopped else "length")
    assert got[0]["finish_reason"] == "stop"


def test_chat_from_a_pipe(chat):
    """--chat reads stdin as a pipe: the history carries over; /reset clears it; EOF ends the session."""
    hf, native, tok, tpl = chat
    stops = set(stop_token_ids(tok, tpl))
    stdin = "Hi\nx\n/reset\n\nx\n"
    r = subprocess.run([sys.executable, str(REPO / "generate.py"), "--ckpt_paths", str(native), "--template_config",
                        "chatml", "--chat", "--max_new_tokens", str(N)], input=stdin, capture_output=True,
                       text=True, env=env(), timeout=120)
    assert r.returncode == 0, r.stderr
    first = tok.decode(hf_greedy(hf, prompt_ids(tok, tpl, "Hi"), stops)[0])
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "x"}]
    second = tok.decode(hf_greedy(hf, tokenize_conversation(history, tok, tpl, True)[0], stops)[0])
    fresh = tok.decode(hf_greedy(hf, prompt_ids(tok, tpl, "x"), stops)[0])
    assert second != fresh  # the history matters, so /reset is visible
    assert r.stdout == f"{first}\n{second}\n(history cleared)\n{fresh}\n"


def test_lora_adapter_and_template_from_the_run_dir(chat, tmp_path, capsys):
    """base + a LoRA adapter dir; the template is the one the run copied into its output dir."""
    _, native, tok, tpl = chat
    model = Transformer.from_pretrained(native)
    lora.apply_lora(model, 4, 8.0, targets=("wq", "wv", "w2"))
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.5)
    run = tmp_path / "run"
    lora.save_adapter(run / "adapter", lora.adapter_state_dict(model.state_dict()), 4, 8.0, ("wq", "wv", "w2"))
    shutil.copy(REPO / "templates" / "chatml.yaml", run / "chatml.yaml")
    merged = lora.load_model([native, run / "adapter" / "adapter.pth"])
    ref = list(generate(merged, prompt_ids(tok, tpl, "Hi"), N, stop_ids=set(stop_token_ids(tok, tpl))))
    base = list(generate(Transformer.from_pretrained(native), prompt_ids(tok, tpl, "Hi"), N))
    assert ref != base
    gen.main(["--ckpt_paths", str(native), str(run / "adapter"), "--prompt", "Hi", "--max_new_tokens", str(N)])
    assert capsys.readouterr().out == tok.decode([t for t in ref if t not in stop_token_ids(tok, tpl)]) + "\n"


def test_stream_decoder_multibyte(chat):
    """Characters split over several byte tokens print once whole, never as U+FFFD."""
    tok = chat[2]
    text = "héllo 日本語 😀 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # the 512-id vocabulary splits the non-ASCII characters into bytes
    d = gen.StreamDecoder(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_bad_input(chat, tmp_path, capsys):
    _, native, _, _ = chat
    base = ["--ckpt_paths", str(native), "--max_new_tokens", "2"]

    def error(args):
        with pytest.raises(SystemExit) as e:
            gen.main(args)
        assert e.value.code not in (0, None)
        return capsys.readouterr().err

    bare = tmp_path / "bare"  # a native dir without a template (convert.py writes the family's)
    shutil.copytree(native, bare)
    for f in bare.glob("*.yaml"):
        f.unlink()
    err = error(["--ckpt_paths", str(bare), "--max_new_tokens", "2", "--prompt", "Hi"])
    assert "no chat template (*.yaml) in" in err and "--template_config NAME, one of chatml, gemma3" in err
    assert "not found" in error(base + ["--template_config", "no_such_template", "--prompt", "Hi"])
    assert "not found" in error(["--ckpt_paths", str(tmp_path / "nope"), "--template_config", "chatml",
                                 "--prompt", "Hi"])
    bad = {"not json": "{'prompt': 1}", "no prompt": '{"text": "Hi"}', "ends with assistant":
           '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}',
           "unknown role": '{"messages": [{"role": "robot", "content": "Hi"}]}',
           "no role": '{"messages": [{"content": "Hi"}]}', "lone surrogate": '{"prompt": "Hi", "id": "\\ud800"}'}
    for what, line in bad.items():
        src = tmp_path / "in.jsonl"
        src.write_text('{"prompt": "Hi"}\n' + line + "\n")
        err = error(base + ["--template_config", "chatml", "--prompts_file", str(src), "--output_file",
                            str(tmp_path / "out.jsonl")])
        assert f"{src}:2:" in err, (what, err)
        assert not (tmp_path / "out.jsonl").exists()
    assert "--output_file" in error(base + ["--template_config", "chatml", "--prompts_file", str(src)])
    src.write_bytes(b'{"prompt": "Hi"}\n{"prompt": "\xff"}\n')
    assert f"{src}:2: not valid UTF-8" in error(base + ["--template_config", "chatml", "--prompts_file", str(src),
                                                         "--output_file", str(tmp_path / "out.jsonl")])
    src.write_text('{"prompt": "Hi"}\n')
    assert "is a directory" in error(base + ["--template_config", "chatml", "--prompts_file", str(src),
                                             "--output_file", str(tmp_path)])  # found before generating
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_sample_follows_the_truncated_softmax():
    """20,000 draws against softmax(logits / T) restricted to the top k, then to the smallest set holding top_p of
    the mass, renormalised (the definition transformers' TopK/TopP warpers implement): each frequency within 4
    standard errors. Degenerate settings collapse to the argmax instead of failing."""
    from model import sample
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    p = (logits / 0.7).softmax(-1)
    p[4:] = 0  # top_k 4
    p /= p.sum()
    keep = (p.cumsum(-1) - p < 0.85) & (p > 0)  # top_p 0.85 over the sorted (already descending) probabilities
    expected = torch.where(keep, p, 0.0)
    expected /= expected.sum()
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(logits, 0.7, 0.85, 4, g) for _ in range(20_000)])
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    assert (freq - expected).abs().max() <= 4 * (0.25 / len(draws)) ** 0.5 and freq[~keep].sum() == 0
    assert keep.tolist() == [True, True, True, False, False, False]  # the cut falls inside the top k
    assert sample(logits, 1e-40, 1.0, 0, g) == 0 and sample(logits, 1.0, 1e-9, 0, g) == 0
    assert sample(logits.flip(0), 1.0, 1.0, 1, g) == 5


def test_bad_sampling_flags(chat, capsys):
    with pytest.raises(SystemExit):
        gen.main(["--ckpt_paths", str(chat[1]), "--prompt", "Hi", "--temperature", "1", "--top_p", "0"])
    assert "--top_p in (0, 1]" in capsys.readouterr().err
