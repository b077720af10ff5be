"""Tokenizers and YAML chat templates -> token ids + a loss mask.

Three tokenizer kinds, detected from the files of a checkpoint dir (`load_tokenizer`):
- tiktoken for Llama 3's `tokenizer.model` (a text file of base64 byte strings and ranks);
- byte-level BPE `tokenizer.json` (Qwen2.5, SmolLM2), turned into tiktoken ranks with its own split regex;
- sentencepiece for Llama 2 / Mistral `tokenizer.model` (byte fallback, the leading-space convention).

A chat template is a YAML file of strings (`templates/*.yaml`, schema in docs/templates.md). Strings it lists
under `special_tokens` become control tokens; everything else, and every message, is plain text: a user
who types "<|eot_id|>" gets the characters, never the control token.

What a record may look like (`record_conversations`: OpenAI messages, text parts, ShareGPT, all read into
OpenAI-form messages by `normalize_messages`) is decided here too, so data.py, generate.py and the visualiser
read records alike:

    python tokenize_chat.py --ckpt_dir DIR --template_config llama3_instruct --show data.jsonl --n 3
"""

import argparse
import base64
import hashlib
import json
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
# Files that travel with the weights (transformers 5 keeps the chat template in chat_template.jinja).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "config.json")


class ConversationError(ValueError):
    """A record or conversation that cannot be tokenized (callers prefix the file and line)."""


class TemplateError(ValueError):
    """A template file that is malformed, or that does not fit the tokenizer."""


class TokenizerError(ValueError):
    """Tokenizer files that are missing or of an unsupported kind."""


# ---------------------------------------------------------------------------------------------------
# Tokenizers

# Meta's Llama 3 split regex and special tokens (llama_models/llama3/tokenizer.py): 256 specials follow
# the 128,000 ranks. Llama 3.0 named some of them reserved_*, but the ids used by chat are the same.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]
# What `tokenizers`' ByteLevel pre-tokenizer splits with when use_regex is true (the GPT-2 regex).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Digits(individual_digits) then ByteLevel, as one regex: each digit is its own piece, so a run of
# spaces before a digit ends there, as it does at the end of a piece.
GPT2_DIGITS_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"


def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\0" + Path(p).read_bytes())
    return h.hexdigest()[:16]


class TiktokenTokenizer:
    """Byte-level BPE through tiktoken: Llama 3's own file, or ranks rebuilt from a tokenizer.json."""

    kind = "tiktoken"

    def __init__(self, path, ranks: dict, pattern: str, specials: dict, in_text=(), bos=None, eos=None,
                 normalization=None, files=(), n_vocab=None, add_bos=True):
        import tiktoken
        self.path = str(path)
        self.specials = dict(specials)  # name -> id: control tokens, never produced from text
        # Added tokens that HF marks special=false (e.g. Qwen's "<tool_call>") are vocabulary, not
        # control: transformers produces them from plain text, so we do too.
        self._in_text = frozenset(in_text)
        self._enc = tiktoken.Encoding(Path(path).name, pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=self.specials)
        self._normalization = normalization
        n_ids = max(max(ranks.values()), max(self.specials.values(), default=-1)) + 1
        self.vocab_size = n_vocab or n_ids
        self._nbytes = np.zeros(n_ids, dtype=np.int64)  # bytes of text each id stands for: spans for the mask
        for b, i in ranks.items():
            self._nbytes[i] = len(b)
        for t in self._in_text:
            self._nbytes[self.specials[t]] = len(t.encode())
        self._control_ids = {i for t, i in self.specials.items() if t not in self._in_text}
        self.bos_id = self.specials[bos] if bos else None
        self.eos_id = self.specials[eos] if eos else None
        self.add_bos = add_bos and self.bos_id is not None  # whether plain text starts with BOS (text: data)
        self.fingerprint = _hash_files(files or [path])

    def normalize(self, text: str) -> str:
        return unicodedata.normalize(self._normalization, text) if self._normalization else text

    def _encode(self, text: str) -> list[int]:
        if self._in_text:
            return self._enc.encode(text, allowed_special=self._in_text, disallowed_special=())
        return self._enc.encode_ordinary(text)

    # Ids past vocab_size stand for bytes the vocabulary lacks: dropped, as `tokenizers` drops them.
    def encode(self, text: str) -> list[int]:
        ids = self._encode(self.normalize(text))
        return [i for i in ids if i < self.vocab_size] if len(self._nbytes) > self.vocab_size else ids

    def encode_with_spans(self, text: str):
        """ids, and the byte span [start, end) of the (normalized, UTF-8) text each one covers."""
        ids = np.array(self._encode(self.normalize(text)), dtype=np.int64)
        nbytes = self._nbytes[ids]
        ends = np.cumsum(nbytes)
        kept = ids < self.vocab_size
        return ids[kept].tolist(), (ends - nbytes)[kept], ends[kept]

    def decode(self, ids) -> str:
        """Text of ids; an id past the vocabulary (a model's embedding rows padded beyond it, which sampling can
        reach) has none, as in transformers' decode."""
        ids = list(ids)
        try:
            raw = self._enc.decode_bytes(ids)
        except KeyError:
            raw = b"".join(self._enc.decode_single_token_bytes(i) for i in ids if self._known(i))
        return raw.decode("utf-8", errors="replace")

    def _known(self, i: int) -> bool:
        try:
            self._enc.decode_single_token_bytes(i)
            return True
        except KeyError:
            return False

    visible = decode  # control tokens by name: decode already writes them so

    def is_control(self, i: int) -> bool:
        return i in self._control_ids

    def token_id(self, name: str) -> int:
        if name not in self.specials:
            raise TokenizerError(f"tokenizer {self.path} has no special token {name!r}")
        return self.specials[name]


class SentencePieceTokenizer:
    """Llama 2 / Mistral `tokenizer.model`: encode adds sentencepiece's dummy leading space, as the
    references (Meta's Llama 2 code, mistral-common) do on every encode call."""

    kind = "sentencepiece"

    def __init__(self, path):
        import sentencepiece
        self.path = str(path)
        self._sp = sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = sp.get_piece_size()
        self.specials = {sp.id_to_piece(i): i for i in range(self.vocab_size) if self.is_control(i)}
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.add_bos = self.bos_id is not None  # Meta's and Mistral's code open plain text with <s>
        self.fingerprint = _hash_files([path])

    def normalize(self, text: str) -> str:
        return text

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)  # control pieces such as "<s>" in the text stay plain text

    def encode_with_spans(self, text: str):
        """ids, and the byte span [start, end) of the UTF-8 text each one covers, as sentencepiece reports it
        (the dummy leading space and all but the last byte-fallback piece of a character cover nothing)."""
        pieces = self._sp.encode(text, return_type="proto").pieces
        return ([p.id for p in pieces], np.array([p.begin for p in pieces], dtype=np.int64),
                np.array([p.end for p in pieces], dtype=np.int64))

    def decode(self, ids) -> str:  # ids past the vocabulary have no text (see TiktokenTokenizer.decode)
        return self._sp.decode([i for i in ids if 0 <= i < self._sp.get_piece_size()])

    def visible(self, ids) -> str:
        """Text of ids with control tokens written by name (`decode` drops them) and sentencepiece's
        leading space kept."""
        out, sp = bytearray(), self._sp
        for i in ids:
            p = sp.id_to_piece(i)
            out += bytes([int(p[1:-1], 16)]) if sp.is_byte(i) else p.encode() if self.is_control(i) \
                else p.replace("\u2581", " ").encode()
        return out.decode("utf-8", errors="replace")

    def is_control(self, i: int) -> bool:
        return self._sp.is_control(i) or self._sp.is_unknown(i)

    def token_id(self, name: str) -> int:
        if name in self.specials:
            return self.specials[name]
        # A user-defined piece (Gemma's <start_of_turn>, <end_of_turn>): sentencepiece matches it whole, in
        # any text too (as transformers does for Gemma), so it is one id wherever it appears.
        i = self._sp.piece_to_id(name)
        if self._sp.id_to_piece(i) == name and not self._sp.is_unknown(i) and self._sp.encode(name) == [i]:
            return i
        raise TokenizerError(f"tokenizer {self.path} has no control token {name!r}")


Tokenizer = TiktokenTokenizer | SentencePieceTokenizer


def _read_tiktoken_ranks(path: Path) -> dict | None:
    """The ranks of a tiktoken BPE file, or None when the file is not one (a binary sentencepiece model
    fails on its first line)."""
    ranks = {}
    try:
        for line in path.read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:
        return None
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _split_pattern(pre, path) -> str:
    """The one regex that reproduces a tokenizer.json byte-level pre-tokenizer."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and "Regex" in steps[0].get("pattern", {}) and steps[0].get("behavior") == "Isolated" \
            and not steps[0].get("invert") and not steps[1].get("add_prefix_space"):
        return steps[0]["pattern"]["Regex"]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True) \
            and not steps[1].get("add_prefix_space"):
        return GPT2_DIGITS_PATTERN
    raise TokenizerError(f"{path}: pre_tokenizer {json.dumps(pre)[:300]} is not supported (supported: ByteLevel; "
                         "Split(regex, Isolated) + ByteLevel(use_regex=false); Digits + ByteLevel)")


def _token_name(value):
    return value.get("content") if isinstance(value, dict) else value


def _tiktoken_from_json(path: Path) -> TiktokenTokenizer:
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: model type {model.get('type')!r} is not byte-level BPE")
    pattern = _split_pattern(spec.get("pre_tokenizer"), path)
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise TokenizerError(f"{path}: normalizer {norm.get('type')!r} is not supported (only none or NFC)")
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab, byte_of = model["vocab"], {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in vocab.items() if tok not in added}
    # tiktoken merges the pair whose result has the lowest rank and returns ranks as ids, so ranks = ids
    # is exact when the vocabulary numbers merge results in merge order: true of GPT-2 style
    # vocabularies (Qwen2.5, SmolLM2) and of tiktoken-born ones (Llama 3's tokenizer.json lists every
    # pair that makes a token, hence repeated results).
    last = -1
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab[a + b]
        if i < last:
            raise TokenizerError(f"{path}: merge {a!r}+{b!r} is out of id order; tiktoken ranks cannot express it")
        last = i
    # Some vocabularies lack a few bytes (SmolLM2 has no 0x04, nor 0xC0, which UTF-8 never uses);
    # `tokenizers` drops such a byte (no unk token, no byte fallback). tiktoken needs every byte, so they
    # get ids past the vocabulary that `encode` then drops.
    n_vocab = max(max(vocab.values()), max(added.values(), default=-1)) + 1
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = n_vocab + b
    config_path = path.parent / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    bos, eos = _token_name(config.get("bos_token")), _token_name(config.get("eos_token"))
    in_text = [t["content"] for t in spec.get("added_tokens", []) if not t.get("special", True)]
    # transformers opens plain text with BOS when the post-processor's template holds it (Llama 3) or the
    # config asks for it; SmolLM2's config names a bos_token (<|im_start|>) that is never added.
    add_bos = config.get("add_bos_token") is True or \
        (bos is not None and bos in json.dumps(spec.get("post_processor")))
    return TiktokenTokenizer(path, ranks, pattern, added, in_text=in_text,
                             bos=bos if bos in added else None, eos=eos if eos in added else None,
                             normalization="NFC" if norm else None, n_vocab=n_vocab,
                             files=[path] + ([config_path] if config_path.exists() else []), add_bos=add_bos)


def load_tokenizer(ckpt_dir) -> Tokenizer:
    """The tokenizer of a checkpoint dir, its kind detected from the files in it."""
    d = Path(ckpt_dir)
    if not any((d / f).is_file() for f in ("tokenizer.model", "tokenizer.json")) \
            and (d / "original" / "tokenizer.model").is_file():
        d = d / "original"  # Meta's download layout; files beside the weights come first
    model = d / "tokenizer.model" if (d / "tokenizer.model").is_file() else None
    if model is not None:
        ranks = _read_tiktoken_ranks(model)
        if ranks is not None:
            specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
            return TiktokenTokenizer(model, ranks, LLAMA3_PATTERN, specials,
                                     bos="<|begin_of_text|>", eos="<|end_of_text|>")
    if (d / "tokenizer.json").is_file():
        spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        if "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or model is None:
            return _tiktoken_from_json(d / "tokenizer.json")
    if model is not None:
        return SentencePieceTokenizer(model)
    raise TokenizerError(f"no tokenizer in {d}: looked for tokenizer.model, original/tokenizer.model and "
                         "tokenizer.json (convert.py copies them next to the weights)")


# ---------------------------------------------------------------------------------------------------
# Chat templates

@dataclass
class RoleFormat:
    start: str = ""   # before the content; never trained
    end: str = ""     # after the content; trained with it for trained roles (the end-of-turn token)
    after: str = ""   # after `end`, e.g. ChatML's newline; never trained
    after_last: str | None = None  # instead of `after` on the conversation's last message (OLMo 2: nothing)
    strip: str = "none"  # none | both | left | right: whitespace stripped from the content
    strip_chars: str | None = None  # what `strip` removes (default: all whitespace)
    join: bool = True  # True: content is tokenized together with the template text around it, as
    #                    transformers does with a rendered Jinja string; False: on its own, as Meta's
    #                    ChatFormat and mistral-common do
    group: bool = False  # consecutive messages of this role share one start and end (Qwen's tool results)


@dataclass
class ChatTemplate:
    name: str
    path: str
    fingerprint: str
    roles: dict[str, RoleFormat]
    special_tokens: list[str] = field(default_factory=list)
    bos: str = ""
    generation_prompt: str = ""
    stop: list[str] = field(default_factory=list)
    trained_roles: list[str] = field(default_factory=lambda: ["assistant"])
    system_placement: str = "message"  # message | first_user | last_user
    system_fold: str = "{system}\n\n{content}"  # how a folded system prompt joins the user content
    drop_empty_system: bool = False
    default_system: str | None = None  # used when a conversation has no system message
    strip_before_fold: bool = False  # strip the user content, then fold the system prompt in (Gemma 3)
    # Reasoning (Qwen3): {start, end, generation_prompt_off}. An assistant turn after the last user message
    # carries start + its reasoning + end before its content (the final turn always, an empty block when it
    # has no reasoning); earlier turns lose their reasoning. generation_prompt_off: the prompt with thinking off.
    thinking: dict | None = None
    # Tool use (see _TOOLS_KEYS and docs/templates.md): how tool definitions, assistant tool calls and tool results
    # render. None: the template has no tool format and refuses tools, tool calls and tool messages.
    tools: dict | None = None


_TOP_KEYS = {"name": str, "special_tokens": list, "bos": str, "generation_prompt": str, "stop": list,
             "trained_roles": list, "system_placement": str, "system_fold": str, "drop_empty_system": bool,
             "default_system": (str, type(None)), "roles": dict, "strip_before_fold": bool,
             "thinking": (dict, type(None)), "tools": (dict, type(None))}
_ROLE_KEYS = {"start": str, "end": str, "after": str, "after_last": (str, type(None)), "strip": str,
              "strip_chars": (str, type(None)), "join": bool, "group": bool}
_THINKING_KEYS = {"start": str, "end": str, "generation_prompt_off": str}
# tools: {key: (type, default)}. Placeholders: {tool} (one definition's JSON), {definitions} (all of them),
# {system}, {tools}, {content}; a call: {name}, {arguments} (JSON), {id}; a result: {content}, {content_json}
# (the result parsed as JSON when it is JSON, as mistral-common does), {id} (tool_call_id), {name}.
_TOOLS_KEYS = {
    "definition": (str, "{tool}"),        # one tool definition
    "definition_separator": (str, ""),    # between definitions
    "definition_indent": ((int, type(None)), None),  # JSON indent of a definition (json.dumps' indent)
    "system": (str, ""),                  # text added to the system prompt when a conversation has tools
    "system_fold": (str, "{system}\n\n{tools}"),  # how `system` joins a system prompt (else: alone)
    "user": (str, ""),                    # what the chosen user message's content becomes: {definitions}, {content}
    "before_user": (str, ""),             # text before the chosen user message's turn (masked)
    "user_placement": (str, "first_user"),  # the chosen user message: first_user | last_user
    "call": (str, None),                  # one tool call (required)
    "call_separator": (str, ""),          # between calls, and between a non-empty content and the first call
    "calls": (str, "{calls}"),            # all the calls of one assistant message
    "call_join": (bool, True),            # false: each call tokenized on its own (Meta's ChatFormat)
    "call_ensure_ascii": (bool, False),   # \uXXXX escapes in the arguments' JSON (Meta's json.dumps)
    "builtin_calls": (dict, {}),          # name -> how a call of that built-in tool renders: {arg} is that
    #                                       argument's string value (Llama 3.1: '<|python_tag|>{code}')
    "builtin_call_end": ((str, type(None)), None),  # the end of a turn with a built-in call, not roles.assistant.end
    "content_with_calls": (bool, True),   # false: an assistant message with tool calls must have no content
    "result": (str, "{content}"),         # one tool message's content, inside roles.tool's start and end
}
_STRIP = {"none": lambda s, chars: s, "both": str.strip, "left": str.lstrip, "right": str.rstrip}
_CHOICES = {"system_placement": ("message", "first_user", "last_user"), "strip": tuple(_STRIP),
            "user_placement": ("first_user", "last_user")}


def _resolve_template(name_or_path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (TEMPLATES_DIR / p.name, TEMPLATES_DIR / (p.name + ".yaml")):
        if cand.is_file():
            return cand
    shipped = ", ".join(shipped_templates())
    raise TemplateError(f"template {name_or_path!r} not found: not a file, nor in {TEMPLATES_DIR} (shipped: {shipped})")


def checkpoint_dir(path) -> Path:
    """A --ckpt_paths entry as the dir its tokenizer files are in: a dir, or a weight file's dir."""
    path = Path(path)
    return path.parent if path.is_file() else path


def shipped_templates() -> list[str]:
    return sorted(q.stem for q in TEMPLATES_DIR.glob("*.yaml"))


def find_template(paths) -> Path:
    """The chat template beside a checkpoint, when --template_config is not given: the one *.yaml in its dir,
    which convert.py writes (the family's) and every training run copies into its output dir. `paths` are
    --ckpt_paths (dirs or weight files); the last first, since an adapter's run knows its template; an adapter
    dir is looked in, then the run's dir above it."""
    dirs = []
    for p in reversed([Path(p) for p in paths]):
        d = p if p.is_dir() else p.parent
        dirs += [d, d.parent] if (d / "adapter_config.json").is_file() else [d]
    for d in dirs:
        found = sorted(d.glob("*.yaml"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise TemplateError(f"{d} holds several templates ({', '.join(f.name for f in found)}): choose one "
                                f"with --template_config")
    raise TemplateError(f"no chat template (*.yaml) in {', '.join(map(str, dict.fromkeys(dirs)))}: pass "
                        f"--template_config NAME, one of {', '.join(shipped_templates())}, or a YAML path")


def load_template(name_or_path, tokenizer=None) -> ChatTemplate:
    """Read a template YAML (a bare name from templates/, or a path). With a tokenizer, also check now
    that every special token the template names exists in it."""
    path = _resolve_template(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TemplateError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise TemplateError(f"{path}: expected a mapping of keys (name, roles, ...), got {type(raw).__name__}")

    def check(d, schema, where):
        for k, v in d.items():
            if k not in schema:
                raise TemplateError(f"{path}: unknown key {where}{k!r} (known: {', '.join(schema)})")
            if not isinstance(v, schema[k]):
                raise TemplateError(f"{path}: key {where}{k!r} must be {schema[k]}, got {type(v).__name__} {v!r}")
            if isinstance(v, list) and not all(isinstance(s, str) for s in v):
                raise TemplateError(f"{path}: key {where}{k!r} must be a list of strings")
            if k in _CHOICES and v not in _CHOICES[k]:
                raise TemplateError(f"{path}: key '{where}{k}' must be one of {', '.join(_CHOICES[k])}")

    check(raw, _TOP_KEYS, "")
    if "roles" not in raw:
        raise TemplateError(f"{path}: missing key 'roles' (per-role start/end strings)")
    for role, fmt in raw["roles"].items():
        if not isinstance(fmt, dict):
            raise TemplateError(f"{path}: key 'roles.{role}' must be a mapping of start/end strings")
        check(fmt, _ROLE_KEYS, f"roles.{role}.")
    roles = {role: RoleFormat(**fmt) for role, fmt in raw["roles"].items()}
    t = ChatTemplate(name=raw.get("name", path.stem), path=str(path),
                     fingerprint=hashlib.sha256(text.encode()).hexdigest()[:16], roles=roles,
                     **{k: v for k, v in raw.items() if k not in ("name", "roles")})
    if t.thinking is not None:
        check(t.thinking, _THINKING_KEYS, "thinking.")
        if missing := [k for k in _THINKING_KEYS if k not in t.thinking]:
            raise TemplateError(f"{path}: key 'thinking' lacks {', '.join(missing)}")
    if t.tools is not None:
        check(t.tools, {k: typ for k, (typ, _) in _TOOLS_KEYS.items()}, "tools.")
        t.tools = {k: t.tools.get(k, default) for k, (_, default) in _TOOLS_KEYS.items()}
        if t.tools["call"] is None:
            raise TemplateError(f"{path}: key 'tools' lacks 'call' (how one tool call renders)")
        if "tool" not in roles:
            raise TemplateError(f"{path}: key 'tools' needs a 'tool' role under 'roles' (how tool results render)")
        if not all(isinstance(v, str) for v in t.tools["builtin_calls"].values()):
            raise TemplateError(f"{path}: key 'tools.builtin_calls' maps tool names to strings")
        if "tool" in t.trained_roles:
            raise TemplateError(f"{path}: key 'trained_roles' names 'tool': tool results are never trained")
        for k in ("system", "user", "result"):  # message text, which never holds control tokens
            if any(s in t.tools[k] for s in t.special_tokens):
                raise TemplateError(f"{path}: key 'tools.{k}' holds a special token; it becomes message text")
    if t.system_placement != "message" and "user" not in roles:
        raise TemplateError(f"{path}: key 'system_placement' folds the system prompt into a user turn: "
                            "'roles' needs 'user'")
    if t.system_fold.count("{system}") != 1 or t.system_fold.count("{content}") != 1 \
            or t.system_fold.index("{system}") > t.system_fold.index("{content}"):
        raise TemplateError(f"{path}: key 'system_fold' needs {{system}} then {{content}}, once each")
    if t.system_placement == "message" and "system" not in roles:
        raise TemplateError(f"{path}: key 'roles' needs 'system' (or set system_placement to fold it)")
    for k, s in [("bos", t.bos)] + [(f"stop[{i}]", s) for i, s in enumerate(t.stop)]:
        if s and s not in t.special_tokens:
            raise TemplateError(f"{path}: key {k!r} = {s!r} is not listed under 'special_tokens'")
    for r in t.trained_roles:
        if r not in roles:
            raise TemplateError(f"{path}: key 'trained_roles' names {r!r}, which 'roles' does not define")
    if tokenizer is not None:
        _plan(tokenizer, t)
    return t


def _plan(tokenizer, template: ChatTemplate) -> dict:
    """Every template string split into control-token ids and text, once per (tokenizer, template)."""
    cache = tokenizer.__dict__.setdefault("_template_plans", {})
    if template.fingerprint in cache:
        return cache[template.fingerprint]
    ids = {}
    for s in template.special_tokens:
        try:
            ids[s] = tokenizer.token_id(s)
        except TokenizerError:
            raise TemplateError(f"{template.path}: names special token {s!r}, which the tokenizer "
                                f"{tokenizer.path} lacks: this template is for another model family") from None
    splitter = re.compile("(" + "|".join(map(re.escape, sorted(ids, key=len, reverse=True))) + ")") if ids else None

    def split(s):
        parts = splitter.split(s) if splitter else [s]
        return [ids[p] if p in ids else tokenizer.normalize(p) for p in parts if p]

    plan = {"bos": split(template.bos), "generation_prompt": split(template.generation_prompt), "split": split}
    if template.thinking:
        plan["generation_prompt_off"] = split(template.thinking["generation_prompt_off"])
    if template.tools and template.tools["builtin_call_end"] is not None:
        plan["builtin_call_end"] = split(template.tools["builtin_call_end"])
    for role, fmt in template.roles.items():
        plan[role] = (split(fmt.start), split(fmt.end), split(fmt.after),
                      split(fmt.after if fmt.after_last is None else fmt.after_last))
    cache[template.fingerprint] = plan
    return plan


def stop_token_ids(tokenizer, template: ChatTemplate) -> list[int]:
    """Ids `generate` stops at: the template's stop strings, each a special token."""
    return [tokenizer.token_id(s) for s in template.stop]


# ---------------------------------------------------------------------------------------------------
# Records and conversations
#
# A record is what one jsonl line (or dataset row) holds: SFT {"messages": [...]} or ShareGPT {"conversations":
# [{"from", "value"}, ...], "system"?}; preference {"chosen": [...], "rejected": [...]} (full conversations sharing
# a prompt), {"prompt": str | [...], "chosen": str | [...], "rejected": ...} or ShareGPT ranking {"conversations"
# (the prompt), "chosen": {"from", "value"}, "rejected": ...}; a generation prompt {"prompt": str | [...]},
# {"messages": [...]} or {"conversations": [...]}. Each is read into OpenAI-form messages first (`normalize_messages`):
# content a string, other keys (tool_calls, tool_call_id, name, reasoning_content) as given. Its errors name the
# record's keys; a conversation's errors (checked against the template when it is tokenized) name its messages by
# number.
# Tool use, in OpenAI's form: an assistant message may carry "tool_calls" ([{"id", "type": "function",
# "function": {"name", "arguments"}}], arguments a dict or a JSON string), a {"role": "tool", "content",
# "tool_call_id", "name"} message holds a result, and the record's top-level "tools" (`record_tools`) lists the
# definitions (JSON-schema function specs, as apply_chat_template(tools=) takes them).

def _content_text(content, where: str) -> str:
    """A message's content as one string: a string as is; a list of text parts joined with nothing between
    them, as the official templates that read parts render them (Qwen2.5-VL, Qwen3.5 and Gemma 3 write each
    text part in turn). Anything but text is an error: this repo trains text models."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConversationError(f"{where}.content must be a string or a list of text parts, got "
                                f"{type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise ConversationError(f"{where}.content[{j}] is a {kind!r} part: only text parts are read (this "
                                    f"repo trains text models); drop the record or the part")
        if kind != "text" or not isinstance(part.get("text"), str):
            got = json.dumps(part, default=str)[:80] if isinstance(part, dict) else type(part).__name__
            raise ConversationError(f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': str}}, "
                                    f"got {got}")
        texts.append(part["text"])
    return "".join(texts)


def _normalize_message(m, where: str) -> dict:
    if not isinstance(m, dict):
        raise ConversationError(f"{where} must be an object with 'role' and 'content', got {type(m).__name__}")
    if not isinstance(m.get("role"), str):
        raise ConversationError(f"{where}.role must be a string, got "
                                f"{'nothing' if 'role' not in m else type(m['role']).__name__}")
    content = m.get("content")
    if content is None:  # OpenAI: content may be null (or absent) on an assistant message that calls tools
        if not m.get("tool_calls"):
            raise ConversationError(f"{where}.content must be a string (or a list of text parts; null only beside "
                                    f"tool_calls), got {'nothing' if 'content' not in m else 'null'}")
        content = ""
    return {**m, "content": _content_text(content, where)}


def normalize_messages(messages, key: str) -> list[dict]:
    """The record's `key` as OpenAI-form messages: new dicts, each with a string `role` and a string `content`
    (text parts joined; null beside `tool_calls` read as ""), every other key as the record has it. Which roles
    and keys a template can render is checked when it is tokenized."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"{key!r} must be a non-empty list of {{'role', 'content'}} messages, "
                                f"got {type(messages).__name__}{' (empty)' if messages == [] else ''}")
    return [_normalize_message(m, f"{key}[{i}]") for i, m in enumerate(messages)]


# ShareGPT roles as LLaMA-Factory's default tags map them (human, gpt, system, function_call, observation), and
# "tool" as an observation; other names pass through for the template to judge.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool", "tool": "tool"}


def _sharegpt_tool_calls(value, where: str) -> list[dict]:
    """A function_call turn's value, JSON of {"name", "arguments"} or a list of them (parallel calls), as
    OpenAI tool_calls. The arguments stay as given: an object or a JSON string."""
    calls = value
    if isinstance(value, str):
        try:
            calls = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConversationError(f"{where}: a function_call value must be JSON of {{'name', 'arguments'}} (or a "
                                    f"list of them), got {value[:60]!r} ({e.msg})") from None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c for c in calls):
        raise ConversationError(f"{where}: a function_call value must be {{'name': str, 'arguments': ...}} or a "
                                f"non-empty list of them, got {json.dumps(calls, default=str)[:80]}")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


def _sharegpt_message(turn, where: str) -> dict:
    """One ShareGPT turn ({"from", "value"}, or {"role", "content"} with ShareGPT's role names) as a message."""
    if not isinstance(turn, dict):
        raise ConversationError(f"{where} must be an object with 'from' and 'value', got {type(turn).__name__}")
    if "from" in turn:
        if not isinstance(turn["from"], str):
            raise ConversationError(f"{where}.from must be a string, got {type(turn['from']).__name__}")
        role, content = turn["from"], turn.get("value")
        if content is None:
            raise ConversationError(f"{where}.value must be a string, got "
                                    f"{'nothing' if 'value' not in turn else 'null'}")
        message = {"role": SHAREGPT_ROLES.get(role, role), "content": content}
    else:
        role = turn.get("role")
        message = {**turn, "role": SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role}
        content = turn.get("content")
    if role == "function_call":
        message.update(content="", tool_calls=_sharegpt_tool_calls(content, where))
    return _normalize_message(message, where)


def sharegpt_messages(record, key: str = "conversations") -> list[dict]:
    """A ShareGPT record's turns as messages; its top-level "system" becomes the system message (a system turn
    in the conversation says the same thing or the record is refused)."""
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise ConversationError(f"{key!r} must be a non-empty list of {{'from', 'value'}} turns, got "
                                f"{type(turns).__name__}{' (empty)' if turns == [] else ''}")
    messages = [_sharegpt_message(t, f"{key}[{i}]") for i, t in enumerate(turns)]
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ConversationError(f"'system' must be a string, got {type(system).__name__}")
    if system:  # LLaMA-Factory reads "" as no system prompt (the template's default, if it has one)
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        elif messages[0]["content"] != system:
            raise ConversationError(f"a 'system' key and a different system turn {key}[0]: keep one")
    return messages


def _response(value, key: str, sharegpt: bool) -> list[dict]:
    """A preference side: a string (the response), one message object (LLaMA-Factory's ranking format) or a
    list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    one = isinstance(value, dict)
    if sharegpt or one:
        value = [value] if one else value
        if not isinstance(value, list) or not value:
            raise ConversationError(f"{key!r} must be a string, a message or a non-empty list of messages, "
                                    f"got {type(value).__name__}")
        return [_sharegpt_message(t, key if one else f"{key}[{i}]") for i, t in enumerate(value)]
    return normalize_messages(value, key)


# What a message renders from: the keys two sides of a pair must agree on before their responses.
_RENDERED_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content", "reasoning")


def record_conversations(record, kind: str) -> list[list[dict]]:
    """The conversations of one record, as OpenAI-form messages: [messages] for SFT and for a generation prompt
    (kind 'prompt'), [chosen, rejected] for preference, each ending with its response. DPO and SimPO compare two
    answers to one prompt: everything before them must match."""
    if not isinstance(record, dict):
        hint = "; a JSON array? jsonl holds one object per line" if isinstance(record, list) else ""
        raise ConversationError(f"expected a JSON object, got {type(record).__name__}{hint}")
    if kind in ("sft", "prompt"):
        if "messages" in record:
            return [normalize_messages(record["messages"], "messages")]
        if "conversations" in record:
            return [sharegpt_messages(record)]
        if kind == "prompt" and "prompt" in record:
            prompt = record["prompt"]
            return [[{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else normalize_messages(prompt, "prompt")]
        hint = "; this looks like preference data: use kind='preference'" if "chosen" in record else ""
        wanted = "'messages'" + (", 'prompt'" if kind == "prompt" else "") + " or ShareGPT 'conversations'"
        raise ConversationError(f"missing key 'messages' (keys: {sorted(record)}); expected {wanted}{hint}")
    for k in ("chosen", "rejected"):
        if k not in record:
            raise ConversationError(f"missing key {k!r} (keys: {sorted(record)}); preference records are "
                                    f"{{'chosen', 'rejected'}}, {{'prompt', 'chosen', 'rejected'}} or ShareGPT "
                                    f"{{'conversations', 'chosen', 'rejected'}}")
    sharegpt = "conversations" in record
    prompt = sharegpt_messages(record) if sharegpt else record.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    convs = []
    for k in ("chosen", "rejected"):
        conv = _response(record[k], k, sharegpt)
        # A full conversation (ultrafeedback style) already carries the prompt; a bare response does not.
        if prompt is not None and not any(m["role"] == "user" for m in conv):
            conv = normalize_messages(prompt, "prompt") + conv
        if conv[-1]["role"] != "assistant":
            raise ConversationError(f"{k!r} must end with an assistant message (the response), ends with "
                                    f"{conv[-1]['role']!r}")
        if len(conv) == 1:
            raise ConversationError(f"{k!r} has a response but no prompt; add a 'prompt' key or the user turn")
        convs.append(conv)
    chosen, rejected = ([{key: m[key] for key in _RENDERED_KEYS if key in m} for m in c[:-1]] for c in convs)
    if chosen != rejected:
        i = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        raise ConversationError(f"'chosen' and 'rejected' have different prompts (they differ at message {i}); "
                                f"a pair must share everything before its final assistant message")
    return convs


def empty_reply(messages, template, final_only: bool = False) -> int | None:
    """The index of the first trained turn that says nothing (whitespace at most, no tool calls), or None;
    with final_only (a preference pair trains its response alone) only the last message is looked at.
    data.py drops such a record and counts it: trained, it would teach the model to answer with an
    end-of-turn token alone."""
    for i in [len(messages) - 1] if final_only else range(len(messages)):
        m = messages[i]
        if m["role"] in template.trained_roles and not m["content"].strip() and not m.get("tool_calls"):
            return i
    return None


def record_tools(record) -> list[dict] | None:
    """The tool definitions of a record: its top-level `tools` (JSON-schema function specs, what
    transformers' apply_chat_template(tools=) takes), or None."""
    tools = record.get("tools") if isinstance(record, dict) else None
    if tools is None:
        return None
    if isinstance(tools, str):  # some datasets store the list as a JSON string
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise ConversationError(f"'tools' is a string that is not valid JSON ({e})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ConversationError(f"'tools' must be a list of tool definitions (JSON objects such as "
                                f"{{'type': 'function', 'function': {{'name', 'description', 'parameters'}}}}), "
                                f"got {type(tools).__name__}")
    return tools or None


def _templates_with_tools() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.yaml") if re.search(r"^tools:", p.read_text(), re.M))


def _no_tool_format(template, what) -> ConversationError:
    return ConversationError(f"{what}, but template {template.name} ({template.path}) has no tool format; "
                             f"templates with one: {', '.join(_templates_with_tools())}")


def _tool_calls(m, i, template) -> list[dict]:
    """An assistant message's tool calls as {name, arguments (a dict), id}: OpenAI's {"id", "type": "function",
    "function": {"name", "arguments"}} (or the flat {"name", "arguments"}), arguments a dict or a JSON string."""
    calls = m.get("tool_calls")
    if calls is None or calls == []:
        return []
    where = f"message {i} (role {m['role']})"
    if template.tools is None:
        raise _no_tool_format(template, f"{where} has tool_calls")
    if m["role"] != "assistant":
        raise ConversationError(f"{where}: only an assistant message may have tool_calls")
    if not isinstance(calls, list):
        raise ConversationError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ConversationError(f"{where}: tool_calls[{j}] must be {{'type': 'function', 'function': "
                                    f"{{'name': str, 'arguments': ...}}}}, got {json.dumps(c)[:200]}")
        args = f.get("arguments")
        if args is None or args == "":  # mistral-common reads an empty string as {}
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as e:
                raise ConversationError(f"{where}: tool_calls[{j}] ({f['name']}): arguments is a string that is "
                                        f"not valid JSON ({e}): {args[:200]!r}") from None
        if not isinstance(args, dict):
            raise ConversationError(f"{where}: tool_calls[{j}] ({f['name']}): arguments must be a JSON object, "
                                    f"got {type(args).__name__}")
        call_id = c.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ConversationError(f"{where}: tool_calls[{j}].id must be a string, got {type(call_id).__name__}")
        if call_id is None and "{id}" in template.tools["call"]:
            raise ConversationError(f"{where}: tool_calls[{j}] ({f['name']}) has no 'id'; template "
                                    f"{template.name} renders each call's id")
        builtin = template.tools["builtin_calls"].get(f["name"])
        if builtin is not None:
            need = set(_PLACEHOLDER.findall(builtin))
            if not all(isinstance(args.get(k), str) for k in need):
                raise ConversationError(f"{where}: tool_calls[{j}] calls the built-in tool {f['name']}, which "
                                        f"template {template.name} writes as {builtin!r}: its arguments need "
                                        f"{sorted(need)} as strings, got {json.dumps(args)[:200]}")
        out.append({"name": f["name"], "arguments": args, "id": call_id, "builtin": builtin is not None})
    if m["content"] and not template.tools["content_with_calls"]:
        raise ConversationError(f"{where}: content beside tool_calls; template {template.name} renders an "
                                f"assistant message as text or as tool calls, not both (drop the content)")
    return out


def _check_messages(messages, template, training, tools=None) -> list[dict]:
    """A conversation as tokenize_conversation takes it, from a record or built by a caller (generate.py).
    Returns it checked: copies of the messages, content "" for a null content beside tool calls, and the
    assistant's tool calls parsed under "calls"."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("empty message list" if isinstance(messages, list) else
                                f"'messages' must be a list of {{role, content}}, got {type(messages).__name__}")
    if tools and template.tools is None:
        raise _no_tool_format(template, f"the conversation has tool definitions ('tools', {len(tools)})")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConversationError(f"message {i} is a {type(m).__name__}, not a {{role, content}} object")
        role = m.get("role")
        if not isinstance(role, str):
            raise ConversationError(f"message {i}: role must be a string, got {type(role).__name__}" if "role" in m
                                    else f"message {i} has no 'role'")
        if role == "tool" and template.tools is None:
            raise _no_tool_format(template, f"message {i} is a tool result (role 'tool')")
        if role not in template.roles and not (role == "system" and template.system_placement != "message"):
            known = sorted(set(template.roles) | {"system"})
            raise ConversationError(f"message {i}: unknown role {role!r} (template {template.name} knows {known})")
        m = dict(m)
        if m.get("content") is None and m.get("tool_calls"):
            m["content"] = ""
        if not isinstance(m.get("content"), str):
            raise ConversationError(f"message {i} (role {role}): content must be a string, got "
                                    f"{type(m['content']).__name__}" if "content" in m
                                    else f"message {i} (role {role}) has no 'content'")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can spell a lone surrogate ("\ud83d"); UTF-8 cannot
            raise ConversationError(f"message {i} (role {role}): content has an unpaired surrogate "
                                    f"{m['content'][e.start]!r} at character {e.start}: not valid Unicode "
                                    f"text") from None
        if role == "system" and i > 0:
            raise ConversationError(f"message {i}: a system message may only come first")
        for key in ("reasoning", "reasoning_content") + (("tool_call_id", "name") if role == "tool" else ()):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise ConversationError(f"message {i} (role {role}): {key} must be a string, "
                                        f"got {type(m[key]).__name__}")
        if role == "tool" and m.get("tool_call_id") is None and "{id}" in template.tools["result"]:
            raise ConversationError(f"message {i} (role tool) has no 'tool_call_id'; template {template.name} "
                                    f"renders the id of the call each result answers")
        m["calls"] = _tool_calls(m, i, template)
        out.append(m)
    if training and not any(m["role"] in template.trained_roles for m in out):
        raise ConversationError(f"no {'/'.join(template.trained_roles)} turn: this conversation would train nothing")
    return out


def _with_reasoning(messages, thinking: dict) -> list[tuple[str, str, bool]]:
    """(role, content, has_content) with Qwen3's reasoning convention, as its official template renders them:
    the reasoning comes from `reasoning_content` (or `reasoning`), else from a <think>...</think> already in
    the content; assistant turns after the last user message show it in the thinking block (the last turn
    always, empty if need be), earlier turns drop it. A user message that is a whole <tool_response> block
    is not a query. has_content: the content without its reasoning is not empty (a tool call after it is
    then preceded by the call separator)."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"
             and not (m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>"))]
    last_query = users[-1] if users else len(messages) - 1
    out = []
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] != "assistant":
            out.append((m["role"], content, bool(content)))
            continue
        reasoning = m.get("reasoning_content", m.get("reasoning"))
        if not isinstance(reasoning, str):
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        has_content = bool(content)
        if i > last_query and (i == len(messages) - 1 or reasoning):
            content = thinking["start"] + reasoning.strip("\n") + thinking["end"] + content.lstrip("\n")
        out.append(("assistant", content, has_content))
    return out


def _strip(content: str, fmt: RoleFormat) -> str:
    return _STRIP[fmt.strip](content, fmt.strip_chars)


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _fill(fmt: str, values: dict, split=None):
    """fmt with its {placeholders} that `values` names replaced, in one pass (a value is never searched for
    placeholders, so a "{content}" inside a message stays text). With `split`: a list of items, the
    template's own text split into control-token ids and text, each value as text."""
    items, pos = [], 0
    for m in _PLACEHOLDER.finditer(fmt):
        if m.group(1) in values:
            items += (split(fmt[pos:m.start()]) if split else [fmt[pos:m.start()]]) + [values[m.group(1)]]
            pos = m.end()
    items += split(fmt[pos:]) if split else [fmt[pos:]]
    return items if split else "".join(items)


def _json(x, ensure_ascii=False, indent=None) -> str:
    """JSON as transformers' `tojson` filter and mistral-common write it: json.dumps' separators, key order kept."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent)


def _result_json(content: str):
    """A tool result as mistral-common puts it in its JSON: parsed when it is JSON, {} when empty."""
    if not content:
        return {}
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return content


def _messages_to_render(messages, template, tools=None) -> list[dict]:
    """The turns to render, {role, content, calls, has_content, before}, after the template's system-prompt
    and tool-definition handling and stripping. A tool message's content is its rendered result; `before`
    holds the definitions that tools.before_user puts ahead of that turn (filled in with its control tokens
    when tokenized, so a "[INST]" inside a definition stays text)."""
    if template.thinking:
        msgs = _with_reasoning(messages, template.thinking)
    else:
        msgs = [(m["role"], m["content"], bool(m["content"])) for m in messages]
    turns = [{"role": r, "content": c, "has_content": h, "calls": m["calls"], "before": ""}
             for (r, c, h), m in zip(msgs, messages)]
    t = template.tools
    for turn, m in zip(turns, messages):
        if turn["role"] == "tool":
            turn["content"] = _fill(t["result"], {"content": m["content"], "id": m.get("tool_call_id") or "",
                                                  "name": m.get("name") or "",
                                                  "content_json": _json(_result_json(m["content"]))})
    if template.strip_before_fold:
        for turn in turns:
            if turn["role"] in template.roles:
                turn["content"] = _strip(turn["content"], template.roles[turn["role"]])
    defs = None
    if tools:
        defs = t["definition_separator"].join(_fill(t["definition"], {"tool": _json(tool, indent=t["definition_indent"])})
                                              for tool in tools)
    system = None
    if turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
    elif template.default_system is not None:
        system = template.default_system
    if defs is not None and t["system"]:
        text = _fill(t["system"], {"definitions": defs})
        system = text if system is None else _fill(t["system_fold"], {"system": system, "tools": text})
    users = [i for i, turn in enumerate(turns) if turn["role"] == "user"]
    if system is not None and not (template.drop_empty_system and system == ""):
        if template.system_placement == "message":
            turns.insert(0, {"role": "system", "content": system, "has_content": True, "calls": [], "before": ""})
            users = [i + 1 for i in users]
        else:
            if not users:
                raise ConversationError(f"a system prompt but no user message to fold it into "
                                        f"(template {template.name} puts it in the {template.system_placement} turn)")
            turn = turns[users[0] if template.system_placement == "first_user" else users[-1]]
            turn["content"] = _fill(template.system_fold, {"system": system, "content": turn["content"]})
    if defs is not None and (t["user"] or t["before_user"]):
        if not users:
            raise ConversationError(f"tool definitions but no user message to put them in (template "
                                    f"{template.name} puts them in the {t['user_placement']} message)")
        turn = turns[users[0] if t["user_placement"] == "first_user" else users[-1]]
        if t["user"]:
            turn["content"] = _fill(t["user"], {"definitions": defs, "content": turn["content"]})
        turn["before"] = defs if t["before_user"] else ""  # filled in when tokenized: its control tokens
    if not template.strip_before_fold:
        for turn in turns:
            turn["content"] = _strip(turn["content"], template.roles[turn["role"]])
    return turns


def tokenize_conversation(messages, tokenizer, template: ChatTemplate, add_generation_prompt=False,
                          enable_thinking=True, tools=None):
    """Token ids and a same-length 0/1 loss mask. Trained: each assistant turn's content, its tool calls
    and its end string (the end-of-turn token); headers, system, user and tool text and tool definitions
    are masked. With a `thinking` template the thinking block is part of the assistant content (trained);
    enable_thinking=False ends the generation prompt with an empty thinking block, as Qwen3's template does.
    tools: the conversation's tool definitions (`record_tools`), rendered as the template's `tools` says."""
    messages = _check_messages(messages, template, training=not add_generation_prompt, tools=tools)
    plan = _plan(tokenizer, template)
    parts = []  # (id_or_text, trained, join): ints are control tokens, strs are text to encode

    def literal(items, trained):
        parts.extend((x, trained, True) for x in items)

    def items(xs, trained, join):  # template text split into ids and text, with values: adjacent text as one
        text = []
        for x in xs + [None]:
            if (x is None or isinstance(x, int)) and text:
                parts.append((tokenizer.normalize("".join(text)), trained, join))
                text.clear()
            if isinstance(x, int):
                parts.append((x, trained, True))
            elif x:
                text.append(x)

    literal(plan["bos"], 0)
    rendered = _messages_to_render(messages, template, tools)
    for n, turn in enumerate(rendered):
        role, content = turn["role"], turn["content"]
        start, end, after, after_last = plan[role]
        fmt = template.roles[role]
        if n == len(rendered) - 1:
            after = after_last
        trained = 1 if role in template.trained_roles else 0
        first = not (fmt.group and n > 0 and rendered[n - 1]["role"] == role)
        last = not (fmt.group and n + 1 < len(rendered) and rendered[n + 1]["role"] == role)
        if turn["before"]:
            items(_fill(template.tools["before_user"], {"definitions": turn["before"]}, plan["split"]), 0, fmt.join)
        if first:
            literal(start, 0)
        if content or not fmt.join:  # an empty content tokenized on its own still splits the text around it
            parts.append((tokenizer.normalize(content), trained, fmt.join) if content else None)
        if turn["calls"]:
            t, split = template.tools, plan["split"]
            calls = [_fill(t["builtin_calls"][c["name"]], c["arguments"], split) if c["builtin"] else
                     _fill(t["call"], {"name": c["name"], "id": c["id"] or "",
                                       "arguments": _json(c["arguments"], t["call_ensure_ascii"])}, split)
                     for c in turn["calls"]]
            sep = split(t["call_separator"])
            first = sep if turn["has_content"] else []
            if t["call_join"]:
                pre, _, post = t["calls"].partition("{calls}")
                items(split(pre) + first + [x for k, c in enumerate(calls) for x in (sep if k else []) + c]
                      + split(post), trained, fmt.join)
            else:  # each call on its own (Meta's ChatFormat encodes them one by one)
                for k, c in enumerate(calls):
                    parts.append(None)
                    items((sep if k else first) + c, trained, fmt.join)
            if any(c["builtin"] for c in turn["calls"]) and t["builtin_call_end"] is not None:
                end = plan["builtin_call_end"]
        if last:
            literal(end, trained)
            literal(after, 0)
    if add_generation_prompt:
        off = template.thinking and not enable_thinking
        literal(plan["generation_prompt_off" if off else "generation_prompt"], 0)
    return _encode_parts(parts, tokenizer)


def tokenize_response(messages, tokenizer, template, tools=None):
    """A preference side's ids and mask: only its final response (with its end-of-turn) trained. The mask
    drops what the prompt with the generation prompt tokenizes to, their common prefix, so a token that
    straddles the boundary stays trained."""
    ids, mask = tokenize_conversation(messages, tokenizer, template, tools=tools)
    prompt, _ = tokenize_conversation(messages[:-1], tokenizer, template, add_generation_prompt=True, tools=tools)
    n = next((i for i, (a, b) in enumerate(zip(ids, prompt)) if a != b), min(len(ids), len(prompt)))
    return ids, [0] * n + mask[n:]


def _encode_parts(parts, tokenizer):
    ids, mask = [], []
    run = []  # consecutive text parts tokenized as one string

    def flush():
        if not run:
            return
        text = "".join(p[0] for p in run)
        if len({p[1] for p in run}) == 1:
            toks = tokenizer.encode(text)
            mask.extend([run[0][1]] * len(toks))
        else:
            # A token that straddles template text and trained content is trained: the model has to
            # produce it to produce the content. A token covering no text goes with the byte after it.
            trained = np.repeat([p[1] for p in run], [len(p[0].encode()) for p in run])
            trained_before = np.concatenate(([0], np.cumsum(trained)))  # trained bytes before each offset
            toks, starts, ends = tokenizer.encode_with_spans(text)
            ends = np.minimum(np.maximum(ends, starts + 1), len(trained))
            mask.extend((trained_before[ends] > trained_before[starts]).astype(int).tolist())
        ids.extend(toks)
        run.clear()

    for p in parts:
        if p is None or isinstance(p[0], int) or not p[2] or (run and not run[-1][2]):
            flush()
        if p is None:
            continue
        if isinstance(p[0], int):
            ids.append(p[0])
            mask.append(p[1])
        elif p[0]:
            run.append(p)
    flush()
    return ids, mask


# ---------------------------------------------------------------------------------------------------
# Visualiser

def render_tokens(ids, mask, tokenizer, color: bool) -> str:
    """Tokens as text: trained ones green (or inside [[ ]] without a terminal), masked ones dim (or
    bare), control tokens by name."""
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:
            j += 1
        text = tokenizer.visible(ids[i:j])
        if color:
            out.append(("\033[92m" if mask[i] else "\033[2m") + text + "\033[0m")
        else:
            out.append(f"[[{text}]]" if mask[i] else text)
        i = j
    return "".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Show how conversations tokenize: trained tokens in green "
                                 "(between [[ ]] when not a terminal), masked ones dim; a record's tool "
                                 "definitions, tool calls and tool results as the template renders them.",
                                 allow_abbrev=False)
    ap.add_argument("--ckpt_paths", "--ckpt_dir", dest="ckpt_paths", nargs="+", required=True, metavar="PATH",
                    help="checkpoint dir with tokenizer.model / tokenizer.json (as the trainers take it; the "
                         "first path's tokenizer is used)")
    ap.add_argument("--template_config", default=None, metavar="NAME",
                    help="template name in templates/ or a YAML path (default: the *.yaml beside --ckpt_paths)")
    ap.add_argument("--show", required=True, help="jsonl of training records: {'messages': [...]}, ShareGPT "
                    "{'conversations': [...]}, or preference pairs (both sides shown)")
    ap.add_argument("--n", type=int, default=3, help="how many samples to show")
    ap.add_argument("--add_generation_prompt", action="store_true", help="render as an inference prompt")
    args = ap.parse_args(argv)
    try:
        tokenizer = load_tokenizer(checkpoint_dir(args.ckpt_paths[0]))
        template = load_template(args.template_config or find_template(args.ckpt_paths), tokenizer)
        lines = Path(args.show).read_text(encoding="utf-8-sig").splitlines()
    except (TokenizerError, TemplateError, OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: {e}")
    color = sys.stdout.isatty()
    shown, bad = 0, 0
    for lineno, line in enumerate(lines, 1):
        if shown >= args.n:
            break
        if not line.strip():
            continue
        where = f"{args.show}:{lineno}"
        try:  # as data.py reads it: SFT messages (or ShareGPT), or both sides of a preference pair
            record = json.loads(line)
            kind = "preference" if isinstance(record, dict) and "chosen" in record else "sft"
            convs, tools = record_conversations(record, kind), record_tools(record)
            if not args.add_generation_prompt and not any(m["role"] in template.trained_roles for m in convs[0]):
                print(f"{where}: data.py drops this record: no {'/'.join(template.trained_roles)} turn to train")
                continue
            if args.add_generation_prompt:
                docs = [tokenize_conversation(c, tokenizer, template, True, tools=tools) for c in convs]
            else:
                docs = [(tokenize_response if kind == "preference" else tokenize_conversation)(
                    c, tokenizer, template, tools=tools) for c in convs]
        except json.JSONDecodeError as e:
            print(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            bad += 1
            continue
        except ConversationError as e:
            print(f"{where}: {e}")
            bad += 1
            continue
        empty = [empty_reply(c, template, final_only=kind == "preference") for c in convs]
        for side, conv, (ids, mask), e in zip(("chosen", "rejected") if kind == "preference" else ("",),
                                              convs, docs, empty):
            n_calls = sum(len(m.get("tool_calls") or []) for m in conv)
            n_results = sum(m.get("role") == "tool" for m in conv)
            uses = f"  tools: {len(tools or [])} defined, {n_calls} calls, {n_results} results" \
                if tools or n_calls or n_results else ""
            print(f"--- {where}{'  ' + side if side else ''}  trained {sum(mask)} / {len(ids)} tokens{uses}")
            if e is not None and not args.add_generation_prompt:
                print(f"(data.py drops this record: message {e} is an empty {conv[e]['role']} reply)")
            print(render_tokens(ids, mask, tokenizer, color))
        shown += 1
    if not color:
        print("(trained tokens are between [[ ]])")
    if bad:
        sys.exit(f"error: {bad} bad record{'s' if bad > 1 else ''} in {args.show} (above); data.py refuses them")


if __name__ == "__main__":
    main()
