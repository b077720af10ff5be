"""tokenize_chat.py against the official references, on the real tokenizers shipped in wheels.

References: Meta's tiktoken Tokenizer and ChatFormat (llama-models 0.3.0) for Llama 3; mistral-common
1.13.1's tokenizer and encode_chat_completion for Mistral v1/v3; SmolLM2's own chat template through
transformers' apply_chat_template for ChatML; Meta's Llama 2 chat_completion format (re-stated below,
run on the Llama-2-style Mistral v1 sentencepiece model, as no wheel ships Llama 2's) for llama2_chat;
HF `tokenizers`/transformers loaded from the same files for plain-text parity.
"""

import json
import os
import shutil
import unicodedata
from pathlib import Path

import pytest

from dev.assets import LLAMA3_TOKENIZER, MISTRAL_V1_TOKENIZER, MISTRAL_V3_TOKENIZER, asset, smollm2_tokenizer_dir
from dev.chat_samples import conversations, mixed_lines, mixed_text

import tokenize_chat as tc

TEXT = mixed_text(50_000)
LINES = mixed_lines(50_000)
CONVERSATIONS = conversations()


def _dir_with(tmp_path_factory, name, src, dest="tokenizer.model"):
    d = tmp_path_factory.mktemp(name)
    (d / dest).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, d / dest)
    return d


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return _dir_with(tmp_path_factory, "llama3", asset(*LLAMA3_TOKENIZER))


@pytest.fixture(scope="module")
def mistral_v1_dir(tmp_path_factory):
    return _dir_with(tmp_path_factory, "mistral_v1", asset(*MISTRAL_V1_TOKENIZER))


@pytest.fixture(scope="module")
def mistral_v3_dir(tmp_path_factory):
    return _dir_with(tmp_path_factory, "mistral_v3", asset(*MISTRAL_V3_TOKENIZER))


@pytest.fixture(scope="module")
def smollm2_dir():
    return smollm2_tokenizer_dir()


@pytest.fixture(scope="module")
def toks(llama3_dir, mistral_v1_dir, mistral_v3_dir, smollm2_dir):
    return {"llama3": tc.load_tokenizer(llama3_dir), "mistral_v1": tc.load_tokenizer(mistral_v1_dir),
            "mistral_v3": tc.load_tokenizer(mistral_v3_dir), "smollm2": tc.load_tokenizer(smollm2_dir)}


def _mismatch(ours, ref_fn, texts):
    return [t for t in texts if ours.encode(t) != ref_fn(t)]


# ---------------------------------------------------------------------------------------------------
# Tokenizer parity on >= 50 KB of mixed text

def test_corpus_is_mixed_and_large():
    assert len(TEXT.encode()) >= 50_000 and sum(len(s.encode()) for s in LINES) >= 50_000
    for needle in ["你好", "👨‍👩‍👧‍👦", "<|eot_id|>", "[INST]", "    ", "\n\n\n", "def f(x)", "1234567890123"]:
        assert needle in TEXT


def test_llama3_parity_hf_and_meta(toks, llama3_dir):
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter
    ours = toks["llama3"]
    assert ours.kind == "tiktoken" and ours.vocab_size == 128_256
    hf = TikTokenConverter(vocab_file=str(llama3_dir / "tokenizer.model"), pattern=tc.LLAMA3_PATTERN,
                           extra_special_tokens=tc.LLAMA3_SPECIALS).converted()
    hf.encode_special_tokens = True  # text that looks like a special token is text
    meta = MetaTokenizer(llama3_dir / "tokenizer.model")
    assert ours.encode(TEXT) == hf.encode(TEXT, add_special_tokens=False).ids
    assert not _mismatch(ours, lambda t: hf.encode(t, add_special_tokens=False).ids, LINES)
    assert not _mismatch(ours, lambda t: meta.encode(t, bos=False, eos=False), LINES)
    assert ours.decode(ours.encode(TEXT)) == TEXT and all(ours.decode(ours.encode(t)) == t for t in LINES)
    assert (ours.bos_id, ours.eos_id) == (meta.bos_id, meta.eos_id) == (128000, 128001)
    assert ours.token_id("<|eot_id|>") == meta.special_tokens["<|eot_id|>"] == 128009


def test_llama3_tokenizer_json_path(tmp_path, llama3_dir, toks):
    """A Llama 3 HF checkpoint without original/: its tokenizer.json (Split regex + ByteLevel, 256 added
    tokens), here written by transformers' converter, goes through the tokenizer.json path."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    TikTokenConverter(vocab_file=str(llama3_dir / "tokenizer.model"), pattern=tc.LLAMA3_PATTERN,
                      extra_special_tokens=tc.LLAMA3_SPECIALS).converted().save(str(tmp_path / "tokenizer.json"))
    ours = tc.load_tokenizer(tmp_path)
    assert ours.vocab_size == 128_256 and ours.token_id("<|eot_id|>") == 128009
    assert ours.encode(TEXT) == toks["llama3"].encode(TEXT)


def test_smollm2_bytelevel_json_parity(toks, smollm2_dir):
    import tokenizers
    ours = toks["smollm2"]
    hf = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    hf.encode_special_tokens = True
    assert ours.kind == "tiktoken" and ours.vocab_size == hf.get_vocab_size() == 49152
    assert ours.encode(TEXT) == hf.encode(TEXT, add_special_tokens=False).ids
    assert not _mismatch(ours, lambda t: hf.encode(t, add_special_tokens=False).ids, LINES)
    assert ours.decode(ours.encode(TEXT)) == TEXT
    assert ours.token_id("<|im_end|>") == 2 and ours.eos_id == 2


@pytest.mark.parametrize("variant", ["digits", "qwen_split_nfc"])
def test_tokenizer_json_pretokenizer_variants(smollm2_dir, tmp_path, variant):
    """The other byte-level pre-tokenizers seen in real checkpoints, on SmolLM2's vocabulary: HF SmolLM2
    (Digits + ByteLevel) and Qwen2.5 / Llama 3 tokenizer.json (Split regex + ByteLevel, Qwen's NFC)."""
    import tokenizers
    spec = json.loads((smollm2_dir / "tokenizer.json").read_text())
    if variant == "digits":
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    else:
        qwen_regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                      r"\s*[\r\n]+|\s+(?!\S)|\s+")
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": qwen_regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
        spec["normalizer"] = {"type": "NFC"}
        spec["added_tokens"].append({"id": 49152, "content": "<tool_call>", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": False})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ours = tc.load_tokenizer(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf.encode_special_tokens = True
    text = TEXT + " call <tool_call> now"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert not _mismatch(ours, lambda t: hf.encode(t, add_special_tokens=False).ids, LINES)
    norm = (lambda t: unicodedata.normalize("NFC", t)) if variant != "digits" else (lambda t: t)
    assert ours.decode(ours.encode(TEXT)) == norm(TEXT)
    if variant != "digits":  # a non-special added token is vocabulary: produced from text, like HF does
        assert 49152 in ours.encode("<tool_call>")


@pytest.mark.parametrize("which", ["mistral_v1", "mistral_v3"])
def test_sentencepiece_parity(toks, mistral_v1_dir, mistral_v3_dir, which, tmp_path):
    """Equal to mistral-common's encode everywhere. transformers' conversion of a sentencepiece model
    (tokenizers BPE + Metaspace) is equal except on runs of spaces and leading whitespace, where it
    departs from sentencepiece itself; there sentencepiece (what Meta and Mistral use) is the truth."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers import AutoTokenizer
    ours = toks[which]
    src = asset(*(MISTRAL_V1_TOKENIZER if which == "mistral_v1" else MISTRAL_V3_TOKENIZER))
    mc = MistralTokenizer.from_file(str(src)).instruct_tokenizer.tokenizer
    assert ours.kind == "sentencepiece" and ours.vocab_size == mc.n_words
    assert ours.encode(TEXT) == mc.encode(TEXT, bos=False, eos=False)
    assert not _mismatch(ours, lambda t: mc.encode(t, bos=False, eos=False), LINES)
    (tmp_path / "tokenizer.model").write_bytes(src.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "add_eos_token": False}))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    plain = [t for t in LINES if "  " not in t and not t[:1].isspace()]
    assert len(plain) > 300
    assert not _mismatch(ours, lambda t: hf.encode(t, add_special_tokens=False, split_special_tokens=True), plain)
    # sentencepiece reads U+2581 "▁" as its own space symbol, so only that character does not round-trip
    assert ours.decode(ours.encode(TEXT)) == TEXT.replace("\u2581", " ")
    assert all(ours.decode(ours.encode(t)) == t for t in LINES if "\u2581" not in t)
    assert (ours.bos_id, ours.eos_id) == (mc.bos_id, mc.eos_id) == (1, 2)


def test_typed_special_strings_are_text(toks):
    for name, tok in toks.items():
        for s in ["<|eot_id|>", "<|begin_of_text|>", "<|im_end|>", "<s>", "</s>", "[INST]", "<|endoftext|>"]:
            ids = tok.encode(s)
            assert not any(tok.is_control(i) for i in ids), (name, s, ids)
            assert tok.decode(ids) == s


@pytest.mark.parametrize("name", ["llama3", "smollm2", "mistral_v1"])
def test_ids_past_the_vocabulary_decode_to_nothing(toks, name):
    """A model's embedding rows padded past its tokenizer (Qwen2.5: 151,936 rows, 151,665 tokens) can be sampled:
    such an id has no text, as in transformers, instead of an error that ends a GRPO run or a chat."""
    tok = toks[name]
    ids = tok.encode("Hello world")
    assert tok.decode(ids[:1] + [tok.vocab_size + 7, 10**6] + ids[1:]) == tok.decode(ids)


def test_token_id_errors_name_the_token(toks):
    with pytest.raises(tc.TokenizerError, match=r"<\|eot_id\|>"):
        toks["mistral_v1"].token_id("<|eot_id|>")
    with pytest.raises(tc.TokenizerError, match=r"\[INST\]"):
        toks["mistral_v1"].token_id("[INST]")  # v1: plain text, not a control token
    assert toks["mistral_v3"].token_id("[INST]") == 3


def test_load_tokenizer_detection_and_errors(tmp_path, llama3_dir, mistral_v1_dir):
    d = tmp_path / "hf_layout"
    (d / "original").mkdir(parents=True)
    os.symlink(llama3_dir / "tokenizer.model", d / "original" / "tokenizer.model")
    tok = tc.load_tokenizer(d)
    assert tok.kind == "tiktoken" and tok.vocab_size == 128_256
    assert tok.fingerprint == tc.load_tokenizer(llama3_dir).fingerprint  # a hash of the file content
    assert tok.fingerprint != tc.load_tokenizer(mistral_v1_dir).fingerprint
    from dev.assets import smollm2_tokenizer_dir  # a tokenizer beside the weights wins over original/
    shutil.copy(smollm2_tokenizer_dir() / "tokenizer.json", d / "tokenizer.json")
    assert tc.load_tokenizer(d).vocab_size == 49_152
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tc.TokenizerError, match=r"empty.*tokenizer\.model.*original/tokenizer\.model.*tokenizer\.json"):
        tc.load_tokenizer(empty)


# ---------------------------------------------------------------------------------------------------
# Template parity, token for token, against the official references

def _llama3_reference(llama3_dir):
    from llama_models.datatypes import RawMessage, ToolPromptFormat
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    fmt = ChatFormat(MetaTokenizer(llama3_dir / "tokenizer.model"))

    def ref(messages, add_generation_prompt):
        raw = [RawMessage(role=m["role"], content=m["content"]) for m in messages]
        if add_generation_prompt:
            return fmt.encode_dialog_prompt(raw).tokens
        tokens = [fmt.tokenizer.bos_id]
        for m in raw:
            tokens += fmt.encode_message(m, ToolPromptFormat.json)[0]
        return tokens
    return ref


def _mistral_reference(path):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    train = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    infer = MistralTokenizer.from_file(str(path), mode=ValidationMode.test)

    def ref(messages, add_generation_prompt):
        # the prompt ends with [/INST]: there is no separate generation prompt in Mistral's format
        tok = train if messages[-1]["role"] == "assistant" else infer
        return tok.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    return ref


def _llama2_reference(sp_tok):
    """Meta's Llama 2 chat_completion: system folded into the first user turn, then per user/answer
    pair encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ", bos, eos), and a final open
    encode(f"[INST] {user.strip()} [/INST]", bos)."""
    def ref(messages, add_generation_prompt):
        msgs = [dict(m) for m in messages]
        if msgs[0]["role"] == "system":
            sys_msg = msgs.pop(0)
            msgs[0]["content"] = "<<SYS>>\n" + sys_msg["content"] + "\n<</SYS>>\n\n" + msgs[0]["content"]
        tokens = []
        for prompt, answer in zip(msgs[::2], msgs[1::2]):
            tokens += [sp_tok.bos_id] + sp_tok.encode(
                f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} ") + [sp_tok.eos_id]
        if msgs[-1]["role"] == "user":
            tokens += [sp_tok.bos_id] + sp_tok.encode(f"[INST] {msgs[-1]['content'].strip()} [/INST]")
        return tokens
    return ref


def _smollm2_reference(smollm2_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(smollm2_dir))

    def ref(messages, add_generation_prompt):
        out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    ref.hf = hf
    ref.hf_default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    added = list(hf.get_added_vocab())
    ref.injects = lambda messages: any(a in m["content"] for m in messages for a in added)
    return ref


def _parity_cases(name):
    for case, msgs in CONVERSATIONS:
        for gen in (False, True):
            yield case, msgs, gen


@pytest.fixture(scope="module")
def references(toks, llama3_dir, smollm2_dir):
    return {"llama3_instruct": (toks["llama3"], _llama3_reference(llama3_dir)),
            "mistral_instruct": (toks["mistral_v3"], _mistral_reference(asset(*MISTRAL_V3_TOKENIZER))),
            "mistral_instruct_v1": (toks["mistral_v1"], _mistral_reference(asset(*MISTRAL_V1_TOKENIZER))),
            "llama2_chat": (toks["mistral_v1"], _llama2_reference(toks["mistral_v1"])),
            "smollm2_chat": (toks["smollm2"], _smollm2_reference(smollm2_dir)),
            "chatml": (toks["smollm2"], _smollm2_reference(smollm2_dir))}


@pytest.mark.parametrize("template_name", ["llama3_instruct", "mistral_instruct", "mistral_instruct_v1",
                                           "llama2_chat", "smollm2_chat", "chatml"])
def test_template_parity(references, template_name):
    tok, ref = references[template_name]
    template = tc.load_template(template_name, tok)
    compared = injected = 0
    for case, msgs, gen in _parity_cases(template_name):
        has_assistant = any(m["role"] == "assistant" for m in msgs)
        if not gen and not has_assistant:
            with pytest.raises(tc.ConversationError, match="train nothing"):
                tc.tokenize_conversation(msgs, tok, template, add_generation_prompt=gen)
            continue
        ids, mask = tc.tokenize_conversation(msgs, tok, template, add_generation_prompt=gen)
        expected = ref(msgs, gen)
        if template_name == "chatml" and msgs[0]["role"] != "system":
            # chatml.yaml deliberately has no default system prompt: SmolLM2's is the only difference
            default = ref([{"role": "system", "content": ref.hf_default_system}], False)
            assert expected[:len(default)] == default
            expected = expected[len(default):]
        assert len(mask) == len(ids)
        if template_name in ("smollm2_chat", "chatml") and ref.injects(msgs):
            # Deliberate: transformers turns "<|im_end|>" typed in a message into the control token;
            # we keep it text. Same characters, and only the template's own control tokens.
            assert ids != expected
            assert ref.hf.decode(ids) == ref.hf.decode(expected)
            n_turns = len(msgs) + (1 if template_name == "smollm2_chat" and msgs[0]["role"] != "system" else 0)
            assert ids.count(tok.token_id("<|im_end|>")) == n_turns
            injected += 1
            continue
        assert ids == expected, f"{template_name} / {case} / generation_prompt={gen}"
        compared += 1
    print(f"\n{template_name}: {compared} renderings equal to the reference, {injected} injection cases")
    assert compared >= 20
    assert injected >= 3 if template_name in ("smollm2_chat", "chatml") else injected == 0


def test_at_least_20_conversations():
    assert len(CONVERSATIONS) >= 20


# ---------------------------------------------------------------------------------------------------
# Masks: golden ids and what is trained

GOLDEN_CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!"}]

GOLDEN = {  # (id, trained) per token; the parity tests above tie these to the references
    "llama3_instruct": ("llama3", [
        (128000, 0),  # <|begin_of_text|>
        (128006, 0), (9125, 0), (128007, 0), (271, 0),  # <|start_header_id|> "system" <|end_header_id|> "\n\n"
        (3513, 0), (10015, 0), (13, 0),  # "Be" " brief" "."
        (128009, 0),  # <|eot_id|> ending the system turn: masked
        (128006, 0), (882, 0), (128007, 0), (271, 0),  # <|start_header_id|> "user" <|end_header_id|> "\n\n"
        (13347, 0),  # "Hi"
        (128009, 0),  # <|eot_id|> ending the user turn: masked
        (128006, 0), (78191, 0), (128007, 0), (271, 0),  # <|start_header_id|> "assistant" <|end_header_id|> "\n\n"
        (9906, 1), (0, 1),  # "Hello" "!"
        (128009, 1),  # <|eot_id|> ending the assistant turn: trained
    ]),
    "mistral_instruct": ("mistral_v3", [
        (1, 0),  # <s>
        (3, 0),  # [INST] (a control token in v3)
        (2507, 0), (7585, 0), (29491, 0), (781, 0), (781, 0), (24577, 0),  # "▁Be" "▁brief" "." "\n" "\n" "Hi"
        (4, 0),  # [/INST]
        (23325, 1), (29576, 1),  # "▁Hello" "!"
        (2, 1),  # </s>: trained
    ]),
    "mistral_instruct_v1": ("mistral_v1", [
        (1, 0),  # <s>
        (733, 0), (16289, 0), (28793, 0),  # "▁[" "INST" "]": plain text in v1
        (1739, 0), (6817, 0), (28723, 0), (13, 0), (13, 0), (23809, 0),  # "▁Be" "▁brief" "." "\n" "\n" "Hi"
        (733, 0), (28748, 0), (16289, 0), (28793, 0),  # "▁[" "/" "INST" "]"
        (22557, 1), (28808, 1),  # "▁Hello" "!"
        (2, 1),  # </s>: trained
    ]),
    "llama2_chat": ("mistral_v1", [
        (1, 0),  # <s>
        (733, 0), (16289, 0), (28793, 0),  # "▁[" "INST" "]"
        (2087, 0), (18741, 0), (4060, 0), (13, 0),  # "▁<<" "SYS" ">>" "\n"
        (3574, 0), (6817, 0), (28723, 0), (13, 0),  # "Be" "▁brief" "." "\n"
        (28789, 0), (700, 0), (18741, 0), (4060, 0), (13, 0), (13, 0),  # "<" "</" "SYS" ">>" "\n" "\n"
        (23809, 0),  # "Hi"
        (733, 0), (28748, 0), (16289, 0), (28793, 0),  # "▁[" "/" "INST" "]"
        (22557, 1), (28808, 1),  # "▁Hello" "!"
        (28705, 1),  # "▁": Meta's space before </s>
        (2, 1),  # </s>: trained
    ]),
    "smollm2_chat": ("smollm2", [
        (1, 0),  # <|im_start|>
        (9690, 0), (198, 0), (6077, 0), (5453, 0), (30, 0),  # "system" "\n" "Be" " brief" "."
        (2, 0),  # <|im_end|> ending the system turn: masked
        (198, 0),  # "\n"
        (1, 0), (4093, 0), (198, 0), (26843, 0),  # <|im_start|> "user" "\n" "Hi"
        (2, 0), (198, 0),  # <|im_end|> "\n"
        (1, 0), (520, 0), (9531, 0), (198, 0),  # <|im_start|> "ass" "istant" "\n"
        (19556, 1), (17, 1),  # "Hello" "!"
        (2, 1),  # <|im_end|>: trained
        (198, 0),  # "\n" after it: masked
    ]),
}


@pytest.mark.parametrize("template_name", sorted(GOLDEN))
def test_golden_ids_and_mask(toks, template_name):
    tok_name, golden = GOLDEN[template_name]
    tok = toks[tok_name]
    ids, mask = tc.tokenize_conversation(GOLDEN_CONV, tok, tc.load_template(template_name, tok))
    assert list(zip(ids, mask)) == golden


def _trained_runs(ids, mask, tok):
    runs, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.visible(cur))
            cur = []
    return runs


@pytest.mark.parametrize("template_name,tok_name", [
    ("llama3_instruct", "llama3"), ("mistral_instruct", "mistral_v3"), ("mistral_instruct_v1", "mistral_v1"),
    ("llama2_chat", "mistral_v1"), ("chatml", "smollm2"), ("smollm2_chat", "smollm2")])
def test_only_assistant_content_and_end_are_trained(toks, template_name, tok_name):
    """Each assistant turn is exactly one trained run: its content then its end-of-turn token; no
    header, BOS, system or user token is trained."""
    tok = toks[tok_name]
    template = tc.load_template(template_name, tok)
    end_id = tok.token_id(template.stop[0])
    for case, msgs in CONVERSATIONS:
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        if not answers:
            continue
        ids, mask = tc.tokenize_conversation(msgs, tok, template)
        fmt = template.roles["assistant"]
        runs = _trained_runs(ids, mask, tok)
        assert len(runs) == len(answers), case
        for run, answer in zip(runs, answers):
            answer = {"both": answer.strip, "right": lambda: answer.rstrip(fmt.strip_chars)}.get(fmt.strip, lambda: answer)()
            if tok.kind == "sentencepiece":  # its pieces spell a space and a typed "\u2581" alike
                answer = answer.replace("\u2581", " ")
            if tok_name == "smollm2":  # its vocabulary lacks the 0x04 byte: dropped from the ids, as in `tokenizers`
                answer = answer.replace("\x04", "")
            assert run.endswith(template.stop[0]), case  # the end-of-turn token is trained
            # the run is the answer (sentencepiece shows its leading "▁" as a space) and the end string
            assert run.strip() == (answer + fmt.end).strip() or run.lstrip(" ") == answer + fmt.end, (case, run)
        trained_ids = [i for i, m in zip(ids, mask) if m]
        assert trained_ids.count(end_id) == len(answers)
        if tok.bos_id is not None:
            assert all(m == 0 for i, m in zip(ids, mask) if i == tok.bos_id)


@pytest.mark.parametrize("template_name,tok_name", [
    ("llama3_instruct", "llama3"), ("mistral_instruct", "mistral_v3"), ("mistral_instruct_v1", "mistral_v1")])
def test_exactly_one_bos(toks, template_name, tok_name):
    tok = toks[tok_name]
    template = tc.load_template(template_name, tok)
    for case, msgs in CONVERSATIONS:
        ids, _ = tc.tokenize_conversation(msgs, tok, template, add_generation_prompt=True)
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id, case


def test_llama2_has_one_bos_per_user_turn(toks):
    """Meta's Llama 2 format opens every [INST] turn with <s> (documented in llama2_chat.yaml)."""
    tok = toks["mistral_v1"]
    msgs = dict(CONVERSATIONS)["multi_turn"]
    ids, mask = tc.tokenize_conversation(msgs, tok, tc.load_template("llama2_chat", tok))
    assert ids.count(tok.bos_id) == 3 and ids[0] == tok.bos_id


def test_generation_prompt_and_stop_tokens(toks):
    tok = toks["llama3"]
    template = tc.load_template("llama3_instruct.yaml", tok)
    msgs = [{"role": "user", "content": "Hi"}]
    ids, mask = tc.tokenize_conversation(msgs, tok, template, add_generation_prompt=True)
    assert ids[-4:] == [128006, 78191, 128007, 271]  # <|start_header_id|> "assistant" <|end_header_id|> "\n\n"
    assert sum(mask) == 0
    assert tc.stop_token_ids(tok, template) == [128009, 128008, 128001]  # <|eot_id|> <|eom_id|> <|end_of_text|>
    chatml = tc.load_template("chatml", toks["smollm2"])
    assert tc.stop_token_ids(toks["smollm2"], chatml) == [2, 0]  # <|im_end|> <|endoftext|>
    assert tc.stop_token_ids(toks["mistral_v3"], tc.load_template("mistral_instruct")) == [2]  # </s>


# ---------------------------------------------------------------------------------------------------
# Bad input

@pytest.fixture(scope="module")
def l3(toks):
    return toks["llama3"], tc.load_template("llama3_instruct", toks["llama3"])


@pytest.mark.parametrize("messages,match", [
    ([{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}], r"message 0: unknown role 'wizard'"),
    ([{"role": "user"}, {"role": "assistant", "content": "x"}], r"message 0 \(role user\) has no 'content'"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}], r"message 0 .*must be a string, got int"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], r"message 1 .*got NoneType"),
    ([], r"empty message list"),
    ([{"role": "user", "content": "hi"}], r"no assistant turn: this conversation would train nothing"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
     r"message 1: a system message may only come first"),
    ("not a list", r"'messages' must be a list"),
    ([{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "x"}], r"message 0: role must be a string"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cut \ud83d"}],
     r"message 1 \(role assistant\): content has an unpaired surrogate '\\ud83d' at character 4"),
])
def test_bad_conversations(l3, messages, match):
    tok, template = l3
    with pytest.raises(tc.ConversationError, match=match):
        tc.tokenize_conversation(messages, tok, template)


def test_system_without_user_to_fold_into(toks):
    tok = toks["mistral_v3"]
    with pytest.raises(tc.ConversationError, match="no user message to fold it into"):
        tc.tokenize_conversation([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
                                 tok, tc.load_template("mistral_instruct"))


def test_template_token_missing_from_tokenizer_fails_at_load(toks):
    with pytest.raises(tc.TemplateError, match=r"llama3_instruct\.yaml.*'<\|begin_of_text\|>'.*lacks"):
        tc.load_template("llama3_instruct", toks["mistral_v3"])
    with pytest.raises(tc.TemplateError, match=r"mistral_instruct\.yaml.*'\[INST\]'.*lacks"):
        tc.load_template("mistral_instruct", toks["mistral_v1"])  # v1: [INST] is not a control token


@pytest.mark.parametrize("content,match", [
    ("name: x\nroles: {user: {start: '[INST]'\n", r"bad\.yaml: not valid YAML"),
    ("name: x\nroles:\n  user: {start: 5}\n  system: {}\n", r"bad\.yaml: key roles\.user\.'start' must be"),
    ("name: x\nbos: '<s>'\nroles: {system: {}, user: {}, assistant: {}}\n", r"bad\.yaml: key 'bos' = '<s>' is not listed"),
    ("name: x\nrolez: {}\n", r"bad\.yaml: unknown key 'rolez'"),
    ("name: x\n", r"bad\.yaml: missing key 'roles'"),
    ("- a\n- b\n", r"bad\.yaml: expected a mapping"),
    ("roles: {system: {}, user: {}, assistant: {strip: sideways}}\n", r"bad\.yaml: key 'roles\.assistant\.strip'"),
    ("roles: {system: {}, user: {}}\ntrained_roles: [assistant]\n", r"bad\.yaml: key 'trained_roles' names 'assistant'"),
])
def test_malformed_template_names_file_and_key(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(tc.TemplateError, match=match):
        tc.load_template(path)


def test_load_template_by_name_path_and_fingerprint(tmp_path):
    a = tc.load_template("chatml")
    b = tc.load_template("chatml.yaml")
    c = tc.load_template(Path(tc.TEMPLATES_DIR) / "chatml.yaml")
    assert a == b == c and len(a.fingerprint) == 16
    changed = tmp_path / "chatml.yaml"
    changed.write_text((Path(tc.TEMPLATES_DIR) / "chatml.yaml").read_text() + "\n# edited\n")
    assert tc.load_template(changed).fingerprint != a.fingerprint
    with pytest.raises(tc.TemplateError, match="not found.*shipped: .*llama3_instruct"):
        tc.load_template("no_such_template")


# ---------------------------------------------------------------------------------------------------
# Record shapes: OpenAI messages, content parts, null content, ShareGPT -> the same messages and tokens

PLAIN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
         {"role": "assistant", "content": "Rome, since 1871."}]


def _parts(*texts):
    return [{"type": "text", "text": t} for t in texts]


SFT_SHAPES = {
    "content parts": {"messages": [PLAIN[0], {"role": "user", "content": _parts("Capital ", "of France?")},
                                   {"role": "assistant", "content": _parts("Paris.")}, PLAIN[3],
                                   {"role": "assistant", "content": _parts("Rome,", " since ", "1871.")}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."},
                                   {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."},
                                   {"from": "human", "value": "And of Italy?"},
                                   {"from": "gpt", "value": "Rome, since 1871."}]},
    "sharegpt, top-level system": {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "And of Italy?"}, {"from": "gpt", "value": _parts("Rome, since 1871.")}]},
    "sharegpt with role/content keys": {"system": "Be brief.", "conversations": [
        {"role": "human", "content": "Capital of France?"}, {"role": "gpt", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome, since 1871."}]},
}


@pytest.mark.parametrize("shape", list(SFT_SHAPES))
@pytest.mark.parametrize("template_name,tok_name", [("llama3_instruct", "llama3"), ("chatml", "smollm2"),
                                                    ("mistral_instruct", "mistral_v3")])
def test_record_shapes_read_as_the_plain_record(toks, shape, template_name, tok_name):
    tok = toks[tok_name]
    template = tc.load_template(template_name, tok)
    [conv] = tc.record_conversations(SFT_SHAPES[shape], "sft")
    [plain] = tc.record_conversations({"messages": PLAIN}, "sft")
    assert conv == plain == PLAIN
    assert tc.tokenize_conversation(conv, tok, template) == tc.tokenize_conversation(PLAIN, tok, template)


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}
CALL2 = {"type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}
TOOL_CHAT = [{"role": "user", "content": "Weather and time in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL, CALL2]},
             {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": "14:05"},
             {"role": "assistant", "content": "21 °C at 14:05."}]


def test_null_content_and_sharegpt_tool_turns_read_as_openai_messages():
    """null (or absent) content beside tool_calls reads as ""; ShareGPT's function_call (one call or a list,
    LLaMA-Factory's JSON of {name, arguments}) becomes an assistant message with OpenAI tool_calls, and
    observation / tool turns the tool role. Keys the template renders (tool_calls, tool_call_id, name) stay."""
    null = [TOOL_CHAT[0], {"role": "assistant", "content": None, "tool_calls": [CALL, CALL2]}, *TOOL_CHAT[2:]]
    absent = [TOOL_CHAT[0], {"role": "assistant", "tool_calls": [CALL, CALL2]}, *TOOL_CHAT[2:]]
    calls = json.dumps([c["function"] for c in (CALL, CALL2)], ensure_ascii=False)
    sharegpt = {"conversations": [{"from": "human", "value": TOOL_CHAT[0]["content"]},
                                  {"from": "function_call", "value": calls},
                                  {"from": "observation", "value": '{"temp": 21}'}, {"from": "tool", "value": "14:05"},
                                  {"from": "gpt", "value": "21 °C at 14:05."}], "tools": "[]"}
    for record in ({"messages": null}, {"messages": absent}, sharegpt):
        assert tc.record_conversations(record, "sft") == [TOOL_CHAT]
    one = {"conversations": [{"from": "human", "value": "hi"},
                             {"from": "function_call", "value": json.dumps(CALL["function"])}]}
    assert tc.record_conversations(one, "sft")[0][1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    kept = {"role": "tool", "content": _parts("14:05"), "tool_call_id": "abc123xyz", "name": "get_time"}
    assert tc.normalize_messages([kept], "messages") == [{**kept, "content": "14:05"}]


@pytest.mark.parametrize("record,match", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                                {"type": "image_url", "image_url": {"url": "x.png"}}]}]},
     r"messages\[0\]\.content\[1\] is a 'image_url' part: only text parts are read"),
    ({"messages": [{"role": "user", "content": _parts("hi")}, {"role": "assistant", "content": [
        {"type": "input_audio", "input_audio": {}}]}]}, r"messages\[1\]\.content\[0\] is a 'input_audio' part"),
    ({"messages": [{"role": "user", "content": ["hi"]}]},
     r"messages\[0\]\.content\[0\] must be a text part .* got str"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     r"messages\[1\]\.content must be a string \(or a list of text parts; null only beside tool_calls\), got null"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, r"messages\[0\]\.content must be a string or a list"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "get_weather(Paris)"}]},
     r"conversations\[1\]: a function_call value must be JSON"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": '{"name": "f"}'}]},
     r"conversations\[1\]: a function_call value must be \{'name': str, 'arguments': \.\.\.\}"),
    ({"conversations": [{"from": "human"}]}, r"conversations\[0\]\.value must be a string, got nothing"),
    ({"conversations": []},
     r"'conversations' must be a non-empty list of \{'from', 'value'\} turns, got list \(empty\)"),
    ({"system": "A", "conversations": [{"from": "system", "value": "B"}, {"from": "human", "value": "hi"}]},
     r"a 'system' key and a different system turn conversations\[0\]: keep one"),
    ({"conversation": []}, r"missing key 'messages' \(keys: \['conversation'\]\); expected 'messages' or ShareGPT"),
])
def test_bad_record_shapes_name_the_message_and_part(record, match):
    with pytest.raises(tc.ConversationError, match=match):
        tc.record_conversations(record, "sft")


def test_preference_and_prompt_shapes_read_alike():
    plain = tc.record_conversations({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
                                    "preference")
    ranking = {"conversations": [{"from": "human", "value": "Capital of France?"}],  # LLaMA-Factory's ranking format
               "chosen": {"from": "gpt", "value": "Paris."}, "rejected": {"from": "gpt", "value": _parts("Lyon.")}}
    parts = {"prompt": [{"role": "user", "content": _parts("Capital of ", "France?")}],
             "chosen": [{"role": "assistant", "content": _parts("Paris.")}],
             "rejected": {"role": "assistant", "content": "Lyon."}}
    full = {"chosen": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "user", "content": _parts("Capital of France?")},
                         {"role": "assistant", "content": "Lyon."}]}
    for record in (ranking, parts, full):
        assert tc.record_conversations(record, "preference") == plain
    # a response that calls a tool before it answers is still a bare response: the prompt goes before it
    call = [{"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "content": "21"},
            {"role": "assistant", "content": "21 °C."}]
    chosen, rejected = tc.record_conversations({"prompt": "Weather?", "chosen": call,
                                                "rejected": call[:2] + [{"role": "assistant", "content": "Cold."}]},
                                               "preference")
    assert [m["role"] for m in chosen] == ["user", "assistant", "tool", "assistant"] and chosen[1]["content"] == ""
    assert rejected[:3] == chosen[:3] and rejected[3]["content"] == "Cold."
    with pytest.raises(tc.ConversationError, match="different prompts"):  # tool calls are part of the prompt
        tc.record_conversations({"chosen": [*TOOL_CHAT[:4], {"role": "assistant", "content": "a"}],
                                 "rejected": [TOOL_CHAT[0], {**TOOL_CHAT[1], "tool_calls": [CALL]}, TOOL_CHAT[2],
                                              TOOL_CHAT[3], {"role": "assistant", "content": "b"}]}, "preference")

    prompt = [[{"role": "user", "content": "Capital of France?"}]]
    for record in ({"prompt": "Capital of France?"},
                   {"prompt": [{"role": "user", "content": _parts("Capital of France?")}]},
                   {"messages": [{"role": "user", "content": _parts("Capital of", " France?")}]},
                   {"conversations": [{"from": "human", "value": "Capital of France?"}]}):
        assert tc.record_conversations(record, "prompt") == prompt


def test_prompts_file_reads_record_shapes(toks, tmp_path):
    """generate.py's prompts file reads its records as training does (record_conversations, kind 'prompt')."""
    import generate

    tok = toks["smollm2"]
    template = tc.load_template("chatml", tok)
    lines = [{"prompt": "Capital of France?"}, {"prompt": [{"role": "user", "content": _parts("Capital of France?")}]},
             {"messages": [{"role": "user", "content": _parts("Capital", " of France?")}], "id": 7},
             {"conversations": [{"from": "human", "value": "Capital of France?"}]}]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records, ids = generate.read_prompts_file(src, "Be brief.", tok, template)
    want = tc.tokenize_conversation(PLAIN[:2], tok, template, add_generation_prompt=True)[0]
    assert records == lines and ids == [want] * 4
    src.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: messages\[0\]\.content\[0\] is a 'image_url' part"):
        generate.read_prompts_file(src, None, tok, template)


def test_empty_reply_finds_trained_turns_with_nothing_to_say(l3):
    _, template = l3
    u = {"role": "user", "content": "q"}
    assert tc.empty_reply([u, {"role": "assistant", "content": "a"}], template) is None
    assert tc.empty_reply([u, {"role": "assistant", "content": " \n\t"}], template) == 1
    assert tc.empty_reply([u, {"role": "assistant", "content": ""}, u, {"role": "assistant", "content": "a"}],
                          template) == 1
    assert tc.empty_reply([u, {"role": "assistant", "content": ""}, u, {"role": "assistant", "content": "a"}],
                          template, final_only=True) is None  # a preference pair trains its final response alone
    assert tc.empty_reply([u, {"role": "assistant", "content": "", "tool_calls": [CALL]}], template) is None
    assert tc.empty_reply([{"role": "system", "content": ""}, u, {"role": "assistant", "content": "a"}],
                          template) is None


# ---------------------------------------------------------------------------------------------------
# Visualiser

def test_visualiser_main(llama3_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m}) for _, m in CONVERSATIONS[:4]) + "\n")
    tc.main(["--ckpt_dir", str(llama3_dir), "--template_config", "llama3_instruct", "--show", str(data), "--n", "2"])
    out = capsys.readouterr().out
    assert out.count("---") == 2 and "data.jsonl:1  trained 3 / " in out
    assert "[[Paris.<|eot_id|>]]" in out and "<|start_header_id|>user<|end_header_id|>" in out


def test_visualiser_shows_both_sides_and_fails_on_bad_records(llama3_dir, tmp_path, capsys):
    pair = {"conversations": [{"from": "human", "value": "2 + 2?"}], "chosen": {"from": "gpt", "value": "4."},
            "rejected": {"from": "gpt", "value": "5."}}
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
    data = tmp_path / "data.jsonl"
    args = ["--ckpt_dir", str(llama3_dir), "--template_config", "llama3_instruct", "--show", str(data)]
    data.write_text(json.dumps(pair) + "\n" + json.dumps(empty) + "\n")
    tc.main(args)  # an empty reply is data.py's counted drop, not an error
    out = capsys.readouterr().out
    assert "data.jsonl:1  chosen  trained 3 / " in out and "data.jsonl:1  rejected  trained 3 / " in out
    assert "[[4.<|eot_id|>]]" in out and "[[5.<|eot_id|>]]" in out and "2 + 2?<|eot_id|>" in out
    assert "(data.py drops this record: message 1 is an empty assistant reply)" in out

    data.write_text(json.dumps(pair) + "\n{broken\n" + json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}) + "\n")
    with pytest.raises(SystemExit) as exc:
        tc.main(args)
    assert exc.value.code == f"error: 2 bad records in {data} (above); data.py refuses them"
    out = capsys.readouterr().out
    assert "data.jsonl:2: not valid JSON" in out and "data.jsonl:3: messages[0].content[0] is a 'image_url' part" in out


def test_mask_equals_transformers_assistant_mask(references, toks):
    """transformers' return_assistant_tokens_mask, with SmolLM2's template marked up with
    {% generation %} around content + <|im_end|> (bench.py), gives the same ids and the same mask."""
    from dev.bench import CHATML_WITH_GENERATION
    tok, ref = references["smollm2_chat"]
    template = tc.load_template("smollm2_chat", tok)
    compared = 0
    for case, msgs in CONVERSATIONS:
        if not any(m["role"] == "assistant" for m in msgs) or ref.injects(msgs):
            continue
        out = ref.hf.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                         chat_template=CHATML_WITH_GENERATION)
        ids, mask = tc.tokenize_conversation(msgs, tok, template)
        assert (ids, mask) == (list(out["input_ids"]), list(out["assistant_masks"])), case
        compared += 1
    assert compared >= 20


def test_bench_tokenize_runs(smollm2_dir):
    from dev import bench
    r = bench.bench_tokenize(smollm2_dir, "smollm2_chat", n=20, min_s=0.02)
    assert r["conversations"] == 20 and r["ours_conv_per_s"] > 0 and r["speedup_vs_best_hf"] > 0
