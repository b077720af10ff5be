"""Data: sources -> pretokenized memmap cache -> batches for SFT and preference training (docs/data.md).

    ds = prepare_dataset(["jsonl:train.jsonl", "HuggingFaceH4/ultrachat_200k"], tokenizer, template,
                         max_seq_len=2048, kind="sft", splits=[None, "train_sft"], num_samples=[None, 0.1])
    loader = Loader(ds, batch_size=4, pack=True, seed=0)     # rank / world size from torch.distributed
    while loader.epoch < epochs:
        for batch in loader:                                  # dict of torch tensors, see below
            loss = F.cross_entropy(model(batch["input_ids"]...).flatten(0, 1), batch["labels"].flatten())
    ckpt["data"] = loader.state_dict(); ...; loader.load_state_dict(ckpt["data"])

Batches (`Loader`), every tensor int64:
    input_ids     [R, T]  right padded with `pad_id`
    labels        [R, T]  already shifted: labels[:, t] is the target of logits[:, t], i.e. input_ids[:, t + 1]
                          when that token is trained, else -100 (prompt, padding, last position, and the
                          boundary between two packed documents)
    position_ids  [R, T]  0, 1, 2, ... restarting at every packed document
    document_ids  [R, T]  index of the document within its row, -1 on padding
    segments      [S, 5]  packed batches only: (row, start, end, prefix_start, prefix_end) per document, the
                          layout model.segment_attention takes (a document sees itself causally, and a shared
                          prompt's tokens row[prefix_start:prefix_end] before it). Padded batches need none:
                          right padding never precedes a real token under causal attention.
    response_ids  [R, T]  preference: which response a token belongs to (chosen of the batch's pair k = k,
                          rejected = P + k; -1 elsewhere), so s = the sum of log-probs where labels != -100
                          grouped by it, [2P] chosen then rejected
    sample_ids    [P]     dataset indices of the samples in this batch (pair indices for preference)
    tokens        []      the batch's tokens as the samples have them (a shared prompt counted in both sides)
SFT padded: R = batch_size rows, T = the longest sample. Packed: R = batch_size rows of up to max_seq_len
tokens, documents never split, T = the fullest row. Preference padded: R = 2 * batch_size, rows [0, B) chosen
and [B, 2B) rejected, so one forward serves both. Preference packed: rows of up to 2 * max_seq_len tokens (room
for any pair), whole pairs, each as its chosen then its rejected document; with `share_prompt` the rejected
document drops the prompt it shares with the chosen one (`shared_prefix_length`) and attends to the chosen
document's copy, with positions continuing from the prompt's end, so each response sees exactly its unshared
context. An epoch's last step may hold fewer rows (one filler row with no trained token where a rank has none).
With `fixed_shape` (packed batches through compiled code: --compile, FlexAttention), every packed batch is
[batch_size, row capacity] instead, the missing rows empty, so compiled code sees one shape, never a new one to
recompile for (padding has label -100 and lies in no segment: the losses are those of the batch without it).
"""

import argparse
import array
import bisect
import functools
import hashlib
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import IGNORE_INDEX
from tokenize_chat import (ConversationError, TemplateError, TokenizerError, checkpoint_dir, empty_reply,
                           find_template, load_template, load_tokenizer, record_conversations, record_tools,
                           tokenize_conversation, tokenize_response)

FORMAT_VERSION = 3  # 2: loss masks from sentencepiece's own byte spans (a typed U+2581 moved them); 3: empty
#                    replies dropped (an older cache holds them, trained as a lone end-of-turn token)
DEFAULT_CACHE_DIR = Path(os.environ.get("LLM_DATA_CACHE", Path(__file__).resolve().parent / ".cache" / "data"))
CHUNK = 256  # records per worker task: big enough to amortise pickling, small enough for a smooth progress bar
PACK_WINDOW = 1024  # documents packed together: ~1% padding on ultrachat-like lengths, and still shuffled


class DataError(ValueError):
    """Bad data or a bad data argument. The message names the file / line / key and the likely fix."""


# -- sources: jsonl:PATH, text:PATH (one sample per line), local:PATH (save_to_disk), a hub name, or a path --
@dataclass
class Source:
    spec: str                 # as given on the command line
    type: str                 # jsonl | text | local | hub
    path: str
    split: str | None
    num_samples: int | float | None
    # filled by _open_source
    fingerprint: str = ""
    n_total: int = 0
    rows: range | list = range(0)  # the record indices kept, sorted so reads stay sequential
    dataset: object = None         # datasets.Dataset for local / hub sources


def _per_source(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, n):
        raise DataError(f"--{name}: got {len(values)} values for {n} data paths; give one value for all "
                        f"paths or one per path")
    return values * n if len(values) == 1 else values


def parse_num_samples(value) -> int | float | None:
    """'all' / None -> None, '100' / 100 -> a count, '0.25' / 0.25 -> a fraction of the source."""
    text = str(value).strip().lower()  # numbers too: a float's repr has a dot or an exponent, an int's neither
    if text in ("all", "none", ""):
        return None
    try:
        number = float(text) if any(c in text for c in ".e") else int(text)
    except ValueError:
        raise DataError(f"num_samples {value!r}: expected a count (1000), a fraction (0.1) or 'all'") from None
    if isinstance(number, float):
        if not 0 < number <= 1:
            raise DataError(f"num_samples {value}: a fraction must be in (0, 1]; write a count without a dot")
        return None if number == 1 else number
    if number < 1:
        raise DataError(f"num_samples {value}: a count must be >= 1")
    return number


SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text"}


def source_type(path: str) -> str:
    """The source a path without a prefix is read as: a .jsonl or .json file as jsonl:, a .txt file as text:, a
    dir written by datasets' save_to_disk as local:, any other dir as datasets.load_dataset reads it (a hub
    dataset's files, downloaded); else an error naming the prefix it needs."""
    p = Path(path)
    if p.is_dir():
        saved = any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
        return "local" if saved else "hub"
    if p.suffix in SUFFIXES:
        if not p.exists():
            raise DataError(f"data path {path!r}: no such file")
        return SUFFIXES[p.suffix]
    raise DataError(f"data path {path!r}: cannot tell its format from {p.suffix or 'a name without a suffix'}; "
                    f"write jsonl:{path} (one JSON record per line) or text:{path} (one sample per line)")


def parse_sources(paths, splits=None, num_samples=None) -> list[Source]:
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise DataError("no data paths given")
    sources = []
    for spec, split, count in zip(paths, _per_source(splits, len(paths), "data_splits"),
                                  _per_source(num_samples, len(paths), "num_samples")):
        spec = str(spec)
        prefix, sep, path = spec.partition(":")
        if prefix not in ("jsonl", "text", "local") and (Path(spec).exists() or Path(spec).suffix in SUFFIXES):
            prefix, path = source_type(spec), spec  # a path without its prefix: read by what it is
            spec = spec if prefix == "hub" else f"{prefix}:{path}"
        elif not sep:
            prefix, path = "hub", spec
        elif prefix not in ("jsonl", "text", "local"):
            raise DataError(f"data path {spec!r}: unknown source prefix {prefix!r}; use jsonl:, text:, local: "
                            f"or a bare hub name such as HuggingFaceH4/ultrachat_200k")
        elif not Path(path).exists():
            raise DataError(f"data path {spec!r}: {path} does not exist")
        sources.append(Source(spec, prefix, path, split, parse_num_samples(count)))
    return sources


def _open_source(src: Source, kind: str, seed: int):
    """Count the records, fingerprint the content and draw the sub-sample."""
    h = hashlib.sha256()
    if src.type in ("jsonl", "text"):
        if Path(src.path).is_dir():
            raise DataError(f"data path {src.spec!r} is a directory; {src.type}: expects a file "
                            f"(local: is for datasets saved with save_to_disk)")
        if src.type == "text" and kind != "sft":
            raise DataError(f"{src.spec}: text: sources hold plain text, usable for SFT only, not {kind}")
        with open(src.path, "rb") as f:
            for line in f:
                h.update(line)
                src.n_total += bool(line.strip())
        if src.n_total == 0:
            raise DataError(f"{src.path}: the file is empty (no non-blank lines)")
    else:
        try:
            import datasets
        except ImportError:
            raise DataError("local: and hub data sources need the `datasets` package: pip install datasets "
                            "(jsonl: and text: sources work without it)") from None
        if src.type == "local":
            try:
                ds = datasets.load_from_disk(src.path)
            except FileNotFoundError as e:  # a plain file, an empty or foreign dir
                raise DataError(f"data path {src.spec!r}: not a dataset written by save_to_disk ({e})") from None
            for p in sorted(Path(src.path).rglob("*")):
                if p.is_file():
                    h.update(str(p.relative_to(src.path)).encode())
                    with open(p, "rb") as f:
                        while chunk := f.read(1 << 20):
                            h.update(chunk)
        else:
            try:
                ds = datasets.load_dataset(src.path, split=src.split or "train")
            except Exception as e:
                raise DataError(f"data path {src.spec!r}: datasets.load_dataset failed ({type(e).__name__}: {e}). "
                                f"Is the name right, the split right, and the dataset cached (HF_HUB_OFFLINE="
                                f"{os.environ.get('HF_HUB_OFFLINE', '0')})?") from e
            # The datasets fingerprint identifies the prepared cache files (it changes with the revision).
            h.update(str(getattr(ds, "_fingerprint", "")).encode())
            h.update(json.dumps([f["filename"] for f in ds.cache_files]).encode())
        if isinstance(ds, datasets.DatasetDict):
            split = src.split or "train"
            if split not in ds:
                raise DataError(f"{src.spec}: no split {split!r}; available: {sorted(ds)} (use --*_data_splits)")
            ds = ds[split]
        need = {"sft": ["messages"], "preference": ["chosen", "rejected"]}.get(kind)
        if kind == "prompt":  # GRPO's prompts, in any of the prompt record forms
            need = [next((c for c in ("prompt", "messages", "conversations") if c in ds.column_names), "prompt")]
        missing = [c for c in need if c not in ds.column_names]
        if missing:
            raise DataError(f"{src.spec}: missing column {missing[0]!r} for {kind} data (columns: "
                            f"{ds.column_names})" + ("; is this preference data? use kind='preference'"
                                                     if kind == "sft" and "chosen" in ds.column_names else ""))
        if len(ds) == 0:
            raise DataError(f"{src.spec}: the dataset is empty")
        keep = need + (["prompt"] if kind == "preference" and "prompt" in ds.column_names else [])
        if kind == "prompt":  # every column reaches the reward functions by name
            keep = ds.column_names
        src.dataset = ds.select_columns(keep)  # never decode columns we do not use
        src.n_total = len(ds)
    src.fingerprint = h.hexdigest()
    k = src.num_samples
    if isinstance(k, float):
        k = max(1, round(k * src.n_total))
    if k is not None and k > src.n_total:
        print(f"data: {src.spec} has {src.n_total} samples, fewer than the {k} asked for; using all", file=sys.stderr)
    if k is None or k >= src.n_total:
        src.rows = range(src.n_total)
    else:  # a fixed random subset: the same seed draws the same one
        src.rows = np.sort(np.random.default_rng(seed).choice(src.n_total, size=k, replace=False)).tolist()


def _tasks(sources: list[Source]):
    """Work items for the tokenizer pool: (source index, payload). File sources send their raw lines (the
    workers parse them); dataset sources send row indices, read by the workers from the forked dataset."""
    for si, src in enumerate(sources):
        if src.dataset is not None:
            for start in range(0, len(src.rows), CHUNK):
                yield si, src.rows[start:start + CHUNK]
            continue
        keep = None if len(src.rows) == src.n_total else set(src.rows)
        batch, record = [], -1
        with open(src.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    record += 1
                    if keep is None or record in keep:
                        batch.append((lineno, line))
                if len(batch) == CHUNK:
                    yield si, batch
                    batch = []
        if batch:
            yield si, batch


def _records(src: Source, payload):
    """(location, record) pairs of one task."""
    if src.dataset is not None:
        rows = src.dataset[payload]  # a range of indices reads as one slice
        for i, values in zip(payload, zip(*rows.values())):
            yield f"{src.spec} [{src.split or 'train'}] row {i}", dict(zip(rows, values))
        return
    for lineno, line in payload:
        loc = f"{src.path} line {lineno}"
        try:
            if src.type == "text":  # a byte-order mark opening the file is not text (json.loads drops it too)
                record = line.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            else:
                record = json.loads(line.rstrip(b"\r\n"))  # the line's end is not part of it: columns stay on it
        except UnicodeDecodeError as e:
            raise DataError(f"{loc}: not valid UTF-8 ({e})") from None
        except json.JSONDecodeError as e:
            hint = ("; a JSON array or a pretty-printed file? jsonl holds one object per line"
                    if lineno == 1 and line.strip() in (b"[", b"{") else
                    "; the line ends inside its JSON: cut short?" if e.pos >= len(e.doc.rstrip()) else
                    "; fix or delete the line")
            raise DataError(f"{loc}: malformed JSON ({e.msg} at column {e.colno}){hint}") from None
        except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, nesting deeper than the stack
            raise DataError(f"{loc}: JSON that Python cannot hold ({str(e).split(';')[0][:120]}); fix or "
                            f"delete the line") from None
        yield loc, record


def read_records(src: Source, kind: str, seed: int = 0):
    """Every (location, record) of one source, in order (its --*_num_samples subset), read in this process:
    for data that is not pretokenized into the cache (GRPO's prompts, kind 'prompt')."""
    _open_source(src, kind, seed)
    for _, payload in _tasks([src]):
        yield from _records(src, payload)


# -- records -> token ids and loss mask (runs inside the worker processes) ----------------------------------
def _tokenize_record(record, src_type: str, kind: str, tokenizer, template):
    """-> (docs, drop): (ids, mask) per document of the record (one for SFT, chosen then rejected for
    preference), and None or why the record is dropped whatever its length ('empty_reply')."""
    if src_type == "text":
        bos = [tokenizer.bos_id] if tokenizer.add_bos else []  # as the tokenizer opens plain text
        eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        ids = bos + tokenizer.encode(record) + eos
        return [(ids, [0] + [1] * (len(ids) - 1))], None  # the first token is never a target
    docs, convs = [], record_conversations(record, kind)
    tools = record_tools(record)  # the record's tool definitions, for every conversation in it
    for conv in convs:
        if not any(m["role"] in template.trained_roles for m in conv):
            docs.append(([], []))  # nothing to train: the length policy drops it and counts it
            continue
        tokenize = tokenize_response if kind == "preference" else tokenize_conversation
        docs.append(tokenize(conv, tokenizer, template, tools=tools))  # first, so a malformed record is an error, not a drop
    # A trained turn with nothing to say would teach the model to answer with its end-of-turn token alone.
    empty = any(empty_reply(conv, template, final_only=kind == "preference") is not None for conv in convs)
    return docs, "empty_reply" if empty else None


def _length_policy(ids: list, mask: list, max_seq_len: int):
    """-> (ids, mask, outcome): outcome is 'kept', 'truncated' (cut to max_seq_len, a trained token survives),
    'no_trained_tokens' or 'too_long' (dropped; a pair is dropped when either side is). Position 0 never
    counts: the first token of a document is never a target (nothing precedes it)."""
    try:
        first = mask.index(1, 1)  # plain lists on purpose: numpy per document costs more than it saves
    except ValueError:
        return None, None, "no_trained_tokens"
    if len(ids) <= max_seq_len:
        return ids, mask, "kept"
    if first >= max_seq_len:
        return None, None, "too_long"  # every trained token lies beyond max_seq_len
    return ids[:max_seq_len], mask[:max_seq_len], "truncated"


_WORKER = None  # (sources, kind, max_seq_len, tokenizer, template), set once per process by _init_worker


def _init_worker(state, in_pool: bool):
    global _WORKER
    _WORKER = state
    if in_pool:  # Ctrl-C and SIGTERM are the parent's business: it terminates the pool and cleans up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _tokenize_task(task):
    si, payload = task
    sources, kind, max_seq_len, tokenizer, template = _WORKER
    src = sources[si]
    ids, mask, lengths, raw_lengths, counts = [], [], [], [], Counter()
    for loc, record in _records(src, payload):
        counts["samples"] += 1
        try:
            docs, drop = _tokenize_record(record, src.type, kind, tokenizer, template)
        except ConversationError as e:
            raise DataError(f"{loc}: {e}") from None
        docs = [_length_policy(i, m, max_seq_len) + (len(i),) for i, m in docs]
        dropped = [drop] if drop else [d[2] for d in docs if d[0] is None]
        if dropped:
            counts[f"dropped:{dropped[0]}"] += 1
            continue
        counts["kept"] += 1
        counts["truncated"] += any(d[2] == "truncated" for d in docs)
        # chosen == rejected: no preference to learn (the DPO / SimPO gradient of such a pair is 0)
        counts["identical_pairs"] += kind == "preference" and docs[0][0] == docs[1][0]
        for d_ids, d_mask, _, raw in docs:
            ids += d_ids
            mask += d_mask
            lengths.append(len(d_ids))
            raw_lengths.append(raw)
    # array.array(list) is ~5x faster than np.array(list) (and than array.extend), and numpy takes its buffer;
    # "I" (C unsigned int) is 32 bits on every platform torch supports
    return (np.frombuffer(array.array("I", ids), np.uint32), np.frombuffer(array.array("B", mask), np.uint8),
            np.asarray(lengths, dtype=np.int64), np.asarray(raw_lengths, dtype=np.int64), counts)


# -- the cache: a dir per key holding ids.bin, mask.bin, offsets.bin (the arrays below) and meta.json -------
# The key hashes the format, the tokenizer and template fingerprints, the sources' contents, kind, splits,
# sub-sampling and max_seq_len: a change to anything the tokens depend on rebuilds.
@dataclass
class TokenizedDataset:
    """A built cache, memory-mapped. len() = samples; a preference pair i is two documents, chosen at 2i and
    rejected at 2i + 1."""
    path: Path
    meta: dict
    ids: np.ndarray       # uint32 [n_tokens]
    mask: np.ndarray      # uint8 [n_tokens], 1 = trained
    offsets: np.ndarray   # int64 [n_docs + 1]
    built: bool = False   # True when this call tokenized (False: served from the cache)

    @classmethod
    def open(cls, path, built: bool = False) -> "TokenizedDataset":
        path = Path(path)
        if problem := cache_problem(path):
            raise DataError(f"data cache {path} is damaged: {problem}; delete the dir and rerun (the cache is "
                            f"rebuilt from the sources)")
        return cls(path, json.loads((path / "meta.json").read_text()),
                   np.memmap(path / "ids.bin", dtype=np.uint32, mode="r"),
                   np.memmap(path / "mask.bin", dtype=np.uint8, mode="r"),
                   np.fromfile(path / "offsets.bin", dtype=np.int64), built)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def stats(self) -> dict:
        return self.meta["stats"]

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // (2 if self.kind == "preference" else 1)

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]

    def __getitem__(self, i: int):
        """SFT: (ids, mask). Preference: ((chosen ids, mask), (rejected ids, mask))."""
        return (self.doc(2 * i), self.doc(2 * i + 1)) if self.kind == "preference" else self.doc(i)

    @functools.cached_property
    def shared_prefix_lengths(self) -> np.ndarray:
        """Preference: shared_prefix_length of every pair, computed once per dataset (the training loader and
        the reference pass both lay the pairs out with it)."""
        return np.array([shared_prefix_length(self, i) for i in range(len(self))], dtype=np.int64)


KEY_FIELDS = ("format_version", "kind", "max_seq_len", "tokenizer", "template", "sources", "seed")  # key_info's


def cache_key(key_info: dict) -> str:
    return f"{key_info['kind']}-{hashlib.sha256(json.dumps(key_info, sort_keys=True).encode()).hexdigest()[:16]}"


def cache_problem(path: Path) -> str | None:
    """What is wrong with the cache dir at `path`, or None. A build only ever renames a complete dir into
    place, so this catches damage from outside (a disk, a copy, an edit): meta.json must parse, carry this
    format and the key the dir is named for, and the three files must have the sizes meta.json records."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        tokens, docs = int(meta["stats"]["tokens"]), int(meta["stats"]["docs"])
    except FileNotFoundError:
        return "meta.json is missing"
    except (ValueError, KeyError, TypeError) as e:
        return f"meta.json is not what a build writes ({type(e).__name__}: {str(e)[:100]})"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"cache format {meta.get('format_version')}, this code reads {FORMAT_VERSION}"
    if path.name.startswith(("sft-", "preference-")) and \
            cache_key({k: meta.get(k) for k in KEY_FIELDS}) != path.name:
        return "meta.json's key fields do not hash to the dir's name (edited?)"
    for name, size in (("ids.bin", 4 * tokens), ("mask.bin", tokens), ("offsets.bin", 8 * (docs + 1))):
        if not (path / name).is_file():
            return f"{name} is missing"
        if (path / name).stat().st_size != size:
            return f"{name} holds {(path / name).stat().st_size} bytes, meta.json implies {size} (truncated?)"
    offsets = np.fromfile(path / "offsets.bin", dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != tokens or (np.diff(offsets) < 0).any():
        return "offsets.bin does not describe the token files"
    return None


def _dist():
    """(rank, local rank, world size), or None outside torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    rank = torch.distributed.get_rank()
    return rank, int(os.environ.get("LOCAL_RANK", rank)), torch.distributed.get_world_size()


def _temp_path(final: Path) -> Path:
    """A fresh temp path beside `final`. It names our host and pid, so this first removes the temp dirs of
    this host's dead processes: those killed with SIGKILL, the only exit that skips our cleanup."""
    prefix = f".tmp-{final.name}-{socket.gethostname()}-"
    for p in final.parent.glob(prefix + "*"):
        try:
            os.kill(int(p.name[len(prefix):].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):  # not a pid, or another user's live process
            pass
    return final.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(3)}"


def _sigterm_raises():
    """torchrun stops workers with SIGTERM, whose default action skips `finally`; turn it into SystemExit
    so the temp dir is removed. Returns a function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers belong to the main thread
    old = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return lambda: signal.signal(signal.SIGTERM, old)


def _percentiles(x: np.ndarray) -> dict:
    q = np.percentile(x, [50, 90, 99])
    return {"mean": round(float(x.mean()), 1), "p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]),
            "max": int(x.max())}


def _progress(results, total: int, desc: str):
    """Pass the worker results through, drawing a one-line progress bar on stderr (redrawn in place on a
    terminal, a line every 10 s otherwise)."""
    tty, done, tokens = sys.stderr.isatty(), 0, 0
    t0 = last = time.perf_counter()
    for ids, mask, lengths, raw_lengths, counts in results:
        yield ids, mask, lengths, raw_lengths, counts
        done, tokens, now = done + counts["samples"], tokens + len(ids), time.perf_counter()
        if now - last > (0.2 if tty else 10) or done == total:
            last, elapsed = now, max(now - t0, 1e-9)
            eta = (total - done) / max(done / elapsed, 1e-9)
            line = (f"{desc}: {done}/{total} samples ({100 * done / max(total, 1):.0f}%) "
                    f"{tokens / elapsed / 1e3:.0f}k tok/s ETA {eta:.0f}s")
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)


def _build(final: Path, sources: list[Source], key_info: dict, tokenizer, template, num_proc, progress: bool):
    kind, max_seq_len = key_info["kind"], key_info["max_seq_len"]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(final)
    tmp.mkdir()
    restore = _sigterm_raises()
    pool = None
    try:
        state = (sources, kind, max_seq_len, tokenizer, template)
        total = sum(len(s.rows) for s in sources)
        num_proc = max(1, min(num_proc or os.cpu_count() or 1, -(-total // CHUNK)))
        if num_proc > 1 and "fork" in multiprocessing.get_all_start_methods():
            # fork: the workers inherit the tokenizer, template and open datasets without pickling them.
            pool = multiprocessing.get_context("fork").Pool(num_proc, _init_worker, (state, True))
            results = pool.imap(_tokenize_task, _tasks(sources))
        else:
            _init_worker(state, False)
            results = map(_tokenize_task, _tasks(sources))
        if progress:
            results = _progress(results, total, f"tokenizing {final.name}")
        counts, lengths, raw_lengths = Counter(), [], []
        with open(tmp / "ids.bin", "wb") as fi, open(tmp / "mask.bin", "wb") as fm:
            for ids, mask, lens, raw, c in results:
                fi.write(ids.tobytes())
                fm.write(mask.tobytes())
                lengths.append(lens)
                raw_lengths.append(raw)
                counts.update(c)
        dropped = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("dropped:")}
        if counts["kept"] == 0:
            raise DataError(f"every one of the {counts['samples']} samples in {[s.spec for s in sources]} was "
                            f"dropped: {dropped} (no_trained_tokens: no assistant turn to train; empty_reply: an "
                            f"assistant turn with no content and no tool call; too_long: all "
                            f"trained tokens lie beyond --max_seq_len {max_seq_len}; raise it?)")
        lengths = np.concatenate(lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        offsets.tofile(tmp / "offsets.bin")
        trained = int(np.memmap(tmp / "mask.bin", dtype=np.uint8, mode="r").sum(dtype=np.int64))
        stats = {"samples_in": counts["samples"], "samples": counts["kept"], "docs": len(lengths),
                 "tokens": int(offsets[-1]), "trained_tokens": trained, "truncated": counts["truncated"],
                 "dropped": dropped, "identical_pairs": counts["identical_pairs"], "length": _percentiles(lengths),
                 "length_before_truncation": _percentiles(np.concatenate(raw_lengths))}
        (tmp / "meta.json").write_text(json.dumps({**key_info, "stats": stats}, indent=1))
        try:
            os.rename(tmp, final)  # atomic: a reader sees a complete cache or none
        except OSError:
            if not (final / "meta.json").exists():
                raise  # anything but "another process finished the same cache first"
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        restore()
        shutil.rmtree(tmp, ignore_errors=True)


def _find_or_build(paths, tokenizer, template, max_seq_len, kind, splits, num_samples, seed, cache_dir, num_proc,
                   progress) -> tuple[Path, bool]:
    """-> (cache dir, whether this call built it)."""
    sources = parse_sources(paths, splits, num_samples)
    for src in sources:
        _open_source(src, kind, seed)
    key_info = {"format_version": FORMAT_VERSION, "kind": kind, "max_seq_len": max_seq_len,
                "tokenizer": tokenizer.fingerprint, "template": template.fingerprint,
                "sources": [{"spec": s.spec, "split": s.split, "num_samples": s.num_samples,
                             "fingerprint": s.fingerprint} for s in sources],
                "seed": seed if any(len(s.rows) < s.n_total for s in sources) else None}  # the seed drew a subset
    final = Path(cache_dir) / cache_key(key_info)
    if final.exists():
        problem = cache_problem(final)
        if problem is None:
            return final, False
        # Derived data: rebuild it. Renamed aside first, so a reader never sees it half deleted; a process
        # doing the same at the same moment loses the rename race and just builds.
        print(f"data: cache {final} is damaged ({problem}); rebuilding it", file=sys.stderr)
        trash = _temp_path(final)
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
    _build(final, sources, key_info, tokenizer, template, num_proc, progress)
    return final, True


def prepare_dataset(paths, tokenizer, template, max_seq_len: int, *, kind: str = "sft", splits=None,
                    num_samples=None, seed: int = 0, cache_dir=None, num_proc: int | None = None,
                    progress: bool = True) -> TokenizedDataset:
    """Tokenize `paths` into the cache once (or find it there) and memory-map it. `splits` and `num_samples`
    (a count, a fraction or 'all', drawn with `seed`) take one value for every path or one per path.

    Under torch.distributed, rank 0 builds and the others wait for it, outside any collective and without a
    deadline (parallel.wait_for_all: a build may outlast the process group's timeout), then all exchange the
    path (with NCCL, set the CUDA device first); a node that cannot see rank 0's cache (no shared filesystem)
    builds its own copy on its local rank 0."""
    if kind not in ("sft", "preference"):
        raise DataError(f"kind must be 'sft' or 'preference', got {kind!r}")
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be >= 2, got {max_seq_len}")
    args = (paths, tokenizer, template, max_seq_len, kind, splits, num_samples, seed,
            cache_dir or DEFAULT_CACHE_DIR, num_proc, progress)
    d = _dist()
    if d is None:
        return TokenizedDataset.open(*_find_or_build(*args))
    from parallel import wait_for_all  # the processes' plumbing; imported only when there are several

    rank, local_rank, world = d
    path, built = None, False
    for builds_here in (rank == 0, local_rank == 0):
        error = None
        if builds_here and (path is None or not (path / "meta.json").exists()):
            try:
                path, built = _find_or_build(*args)
            except Exception as e:
                error = e
        message = None if error is None else f"{type(error).__name__}: {error}"
        wait_for_all()
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (path, message))
        if error is not None:
            raise error
        failed = [(r, m) for r, (_, m) in enumerate(gathered) if m is not None]
        if failed:
            raise DataError(f"rank {failed[0][0]} failed to build the data cache: {failed[0][1]}")
        path = path or gathered[0][0]
    return TokenizedDataset.open(path, built=built)


# -- batches ----------------------------------------------------------------------------------------------
def shared_prefix_length(ds: TokenizedDataset, i: int) -> int:
    """How many leading tokens pair i's two sides can compute once: identical in both, and none of them the
    position that predicts a trained token (that prediction differs between the sides). At most the first
    trained position - 1, so the prompt's last token starts each response again."""
    (c, cm), (r, rm) = ds[i]
    n = min(len(c), len(r))
    differ = np.flatnonzero(c[:n] != r[:n])
    common = int(differ[0]) if len(differ) else n
    first_trained = min(int(np.argmax(cm)) if cm.any() else len(c), int(np.argmax(rm)) if rm.any() else len(r))
    return max(0, min(common, first_trained - 1))


def pack_rows(order: np.ndarray, lengths: np.ndarray, capacity: int, window: int, rng) -> list[list[int]]:
    """Pack samples into rows of `capacity` tokens, never splitting one: each window of `window` samples of
    `order` is packed best-fit decreasing (the longest first, each into the fullest row it fits), then its
    rows are shuffled. Rows depend only on the order, not on batch size or ranks."""
    rows, lengths = [], lengths.tolist()
    for w in range(0, len(order), window):
        docs = sorted(order[w:w + window].tolist(), key=lambda d: -lengths[d])
        bins, free = [], []  # free: sorted (room left, bin index)
        for d in docs:
            k = bisect.bisect_left(free, (lengths[d], -1))
            if k == len(free):
                bins.append([d])
                bisect.insort(free, (capacity - lengths[d], len(bins) - 1))
            else:
                room, b = free.pop(k)
                bins[b].append(d)
                bisect.insort(free, (room - lengths[d], b))
        rows += [bins[i] for i in rng.permutation(len(bins))]
    return rows


class Loader:
    """Batches of a TokenizedDataset for one rank; iterating serves the rest of the current epoch, then moves
    to the next. An epoch's rows (one sample each, or packed) depend only on (seed, epoch), not on the world
    size, and each step deals the next batch_size * world_size of them round-robin to the ranks. So every rank
    runs the same steps (an epoch's last may have fewer rows, or one filler row with no trained token), and
    state_dict() = (epoch, rows consumed) resumes, on any number of ranks, with exactly the samples not yet seen."""

    def __init__(self, dataset: TokenizedDataset, batch_size: int, *, pack: bool = False, share_prompt: bool = False,
                 seed: int = 0, shuffle: bool = True, rank: int | None = None, world_size: int | None = None,
                 pad_id: int = 0, fixed_shape: bool = False):
        d = _dist()
        self.rank = rank if rank is not None else (d[0] if d else 0)
        self.world_size = world_size if world_size is not None else (d[2] if d else 1)
        self.pairs = dataset.kind == "preference"
        if share_prompt and not (pack and self.pairs):
            raise DataError("share_prompt lays a preference pair out as prompt | chosen | rejected in a packed row: "
                            "it needs packing and preference data")
        if batch_size < 1 or not 0 <= self.rank < self.world_size:
            raise DataError(f"bad batch_size {batch_size} / rank {self.rank} / world size {self.world_size}")
        self.ds, self.batch_size, self.pack, self.share, self.seed = dataset, batch_size, pack, share_prompt, seed
        self.shuffle, self.pad_id, self.fixed_shape = shuffle, pad_id, fixed_shape and pack
        self.seq_len = dataset.meta["max_seq_len"]
        # A packed preference row holds 2 * max_seq_len tokens: room for any pair the length policy kept, and
        # the token budget of a padded micro-batch's chosen + rejected rows.
        self.capacity = self.seq_len * (2 if self.pairs else 1)
        self.shared = dataset.shared_prefix_lengths if share_prompt else np.zeros(len(dataset), dtype=np.int64)
        lengths = dataset.doc_lengths
        self.lengths = lengths[0::2] + lengths[1::2] - self.shared if self.pairs else lengths  # as laid out in a row
        self.epoch, self.consumed = 0, 0
        self._rows = (None, None)  # (epoch, rows) cache

    def rows(self, epoch: int) -> list[list[int]]:
        if self._rows[0] != epoch:
            n = len(self.ds)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if self.pack:
                rows = pack_rows(order, self.lengths, self.capacity, PACK_WINDOW,
                                 np.random.default_rng([self.seed, epoch, 1]))
            else:
                rows = [[s] for s in order.tolist()]
            self._rows = (epoch, rows)
        return self._rows[1]

    def _steps(self, epoch: int, start: int, rank: int):
        """(rows consumed after the step, `rank`'s rows) for each step from row `start`."""
        rows, size = self.rows(epoch), self.batch_size * self.world_size
        for a in range(start, len(rows), size):
            mine = rows[a:a + size][rank::self.world_size]
            # A rank with no rows left still runs the step (its collectives must match): one filler row, [].
            yield min(a + size, len(rows)), mine or [[]]

    def num_steps(self, epoch: int | None = None) -> int:
        """Steps in a whole epoch, the same on every rank (packed epochs vary a little with the order)."""
        n, size = len(self.rows(self.epoch if epoch is None else epoch)), self.batch_size * self.world_size
        return -(-n // size)

    def epoch_summary(self, epoch: int = 0) -> tuple[int, int, int]:
        """(rows, samples or pairs, tokens as the samples have them) of one epoch, all ranks: what a step holds on
        average, for packed rows too, from the lengths alone."""
        return len(self.rows(epoch)), len(self.ds), int(self.ds.doc_lengths.sum())

    def epoch_done(self) -> bool:
        """Whether the current epoch has served all its batches (iterating further starts the next)."""
        return self.consumed >= len(self.rows(self.epoch))

    def __iter__(self):
        for end, mine in self._steps(self.epoch, self.consumed, self.rank):
            batch = self.collate(mine)
            self.consumed = end  # before the yield: a state_dict taken after this step includes it
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "num_samples": len(self.ds),
                "shuffle": self.shuffle, "pack": self.pack, "seq_len": self.seq_len, "pack_window": PACK_WINDOW,
                "share_prompt": self.share}

    def load_state_dict(self, state: dict):
        state = {"share_prompt": False, **state}  # checkpoints from before prompt sharing
        for k, mine in self.state_dict().items():
            if k not in ("epoch", "consumed") and state[k] != mine:
                raise DataError(f"loader state has {k}={state[k]} but this run has {mine}; resuming would "
                                f"not continue the same sample order (same data, --seed and packing needed)")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def layout(self, rows: list[list[int]]) -> list[list[tuple[int, int]]]:
        """Rows of sample ids -> rows of pieces (document, skip) as they sit in the batch: a piece is tokens
        [skip, end) of the document, and sees the first `skip` tokens of the piece before it as its prompt (a
        rejected response after prompt + chosen). Padded preference batches are B chosen rows, then B rejected."""
        if not self.pairs:
            return [[(d, 0) for d in row] for row in rows]
        if not self.pack:
            return [[(2 * r[0] + side, 0)] if r else [] for side in (0, 1) for r in rows]
        return [[p for i in row for p in ((2 * i, 0), (2 * i + 1, int(self.shared[i])))] for row in rows]

    def _width(self, pieces: list[list[tuple[int, int]]]) -> int:
        """The longest row's tokens: padding after it would be computed and thrown away (packed rows hold at
        most `capacity`)."""
        used = [sum(int(self.ds.offsets[d + 1] - self.ds.offsets[d]) - skip for d, skip in row) for row in pieces]
        return max(used + [1])

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Rows of sample ids ([] = a filler row) -> the batch dict of the module doc."""
        if self.fixed_shape:  # compiled runs: [batch_size, capacity] whatever the rows hold (module doc)
            rows = rows + [[]] * (self.batch_size - len(rows))
        pieces = self.layout(rows)
        offsets, ids_mm, mask_mm = self.ds.offsets, self.ds.ids, self.ds.mask
        R, T = len(pieces), self.capacity if self.fixed_shape else self._width(pieces)
        input_ids = np.full((R, T), self.pad_id, dtype=np.int64)
        labels = np.full((R, T), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros((R, T), dtype=np.int64)
        document_ids = np.full((R, T), -1, dtype=np.int64)
        response_ids = np.full((R, T), -1, dtype=np.int64)
        sample_ids = [s for r in rows for s in r]
        slot = {s: k for k, s in enumerate(sample_ids)}  # response k: chosen of pair k, rejected at P + k
        segments, tokens = [], 0
        for r, row in enumerate(pieces):
            p = previous = 0
            for j, (d, skip) in enumerate(row):
                a, b = offsets[d] + skip, offsets[d + 1]
                n = b - a
                ids = ids_mm[a:b].astype(np.int64)  # before np.where: uint32 would wrap -100
                input_ids[r, p:p + n] = ids
                # the target of position t is token t + 1 of the same document, if trained
                labels[r, p:p + n - 1] = np.where(mask_mm[a + 1:b] != 0, ids[1:], IGNORE_INDEX)
                position_ids[r, p:p + n] = np.arange(skip, skip + n)
                document_ids[r, p:p + n] = j
                if self.pairs:
                    response_ids[r, p:p + n] = slot[d // 2] + (len(sample_ids) if d % 2 else 0)
                segments.append((r, p, p + n, previous, previous + skip))
                tokens += n + skip
                previous, p = p, p + n
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids,
                 "response_ids": response_ids, "sample_ids": np.array(sample_ids, dtype=np.int64),
                 "tokens": np.array(tokens, dtype=np.int64)}
        if self.pack:
            batch["segments"] = np.array(segments, dtype=np.int64).reshape(-1, 5)
        return {k: torch.from_numpy(v) for k, v in batch.items()}


def padding_fraction(loader: Loader, epoch: int = 0) -> float:
    """Share of the positions of one epoch's batches (all ranks) that hold no token, from the lengths
    alone (no batch is built)."""
    lengths, real, total = loader.ds.doc_lengths, 0, 0
    for rank in range(loader.world_size):
        for _, mine in loader._steps(epoch, 0, rank):
            pieces = loader.layout(mine)
            real += sum(int(lengths[d]) - skip for row in pieces for d, skip in row)
            total += len(pieces) * loader._width(pieces)
    return 1 - real / max(total, 1)


# -- CLI: prepare the cache ahead of training and print statistics -----------------------------------------
def format_stats(name: str, ds: TokenizedDataset) -> str:
    s = ds.stats
    unit = "pairs" if ds.kind == "preference" else "samples"
    lines = [f"{name}: {ds.path} ({'built' if ds.built else 'from cache'})",
             f"  {unit}: {s['samples']} kept of {s['samples_in']}; truncated {s['truncated']}; "
             f"dropped {sum(s['dropped'].values())} {s['dropped'] or ''}".rstrip(),
             f"  tokens: {s['tokens']:,} ({s['trained_tokens']:,} trained, "
             f"{100 * s['trained_tokens'] / max(s['tokens'], 1):.1f}%) in {s['docs']} documents",
             f"  length before truncation: {s['length_before_truncation']}",
             *([f"  warning: {s['identical_pairs']} pairs have identical chosen and rejected responses (they "
                f"teach nothing and only dilute the batch; fix or drop them)"] if s.get("identical_pairs") else []),
             f"  length stored:            {s['length']}"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Pretokenize training data into the memmap cache and print "
                                            "statistics (the trainers do the same on start-up).", allow_abbrev=False)
    p.add_argument("--ckpt_paths", "--ckpt_dir", dest="ckpt_paths", nargs="+", required=True, metavar="PATH",
                   help="checkpoint dir with the tokenizer files (native or HF), as the trainers take it")
    p.add_argument("--template_config", default=None, metavar="NAME",
                   help="chat template name (templates/NAME.yaml) or path (default: the *.yaml beside --ckpt_paths)")
    for name in ("train", "val"):
        p.add_argument(f"--{name}_data_paths", nargs="+", required=name == "train", default=[],
                       help="jsonl:PATH, text:PATH, local:PATH (save_to_disk) or a hub dataset name")
        p.add_argument(f"--{name}_data_splits", nargs="+", default=[None], help="split per path (local: / hub)")
        p.add_argument(f"--{name}_num_samples", nargs="+", default=[None], help="per path: a count, a fraction or all")
    p.add_argument("--max_seq_len", type=int, required=True)
    p.add_argument("--kind", choices=["sft", "preference"], default="sft")
    p.add_argument("--seed", type=int, default=0, help="sub-sampling seed (and shuffling seed for the stats)")
    p.add_argument("--data_cache_dir", default=None, help=f"default {DEFAULT_CACHE_DIR} ($LLM_DATA_CACHE)")
    p.add_argument("--num_proc", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--micro_batch_size_per_gpu", type=int, default=None,
                   help="also report steps per epoch (one rank) and the padding of batches of this size")
    p.add_argument("--pack_samples", action="store_true", help="steps per epoch of packed batches")
    args = p.parse_args(argv)

    tokenizer = load_tokenizer(checkpoint_dir(args.ckpt_paths[0]))
    # load_template checks the template's tokens exist in the tokenizer
    template = load_template(args.template_config or find_template(args.ckpt_paths), tokenizer)
    out = {}
    for name in ("train", "val"):
        paths = getattr(args, f"{name}_data_paths")
        if not paths:
            continue
        ds = prepare_dataset(paths, tokenizer, template, args.max_seq_len, kind=args.kind, seed=args.seed,
                             splits=getattr(args, f"{name}_data_splits"), cache_dir=args.data_cache_dir,
                             num_samples=getattr(args, f"{name}_num_samples"), num_proc=args.num_proc)
        print(format_stats(name, ds))
        if args.micro_batch_size_per_gpu:
            loaders = {m: Loader(ds, args.micro_batch_size_per_gpu, pack=m, seed=args.seed, rank=0, world_size=1)
                       for m in (False, True)}
            chosen = loaders[args.pack_samples]
            print(f"  micro batch {chosen.batch_size}, {'packed' if chosen.pack else 'padded'}: "
                  f"{chosen.num_steps()} steps per epoch on one rank; padding fraction: " +
                  ", ".join(f"{'packed' if m else 'padded'} {100 * padding_fraction(lo):.1f}%"
                            for m, lo in loaders.items()))
        out[name] = ds
    return out


if __name__ == "__main__":
    try:
        main()
    except (DataError, TemplateError, TokenizerError) as e:
        sys.exit(f"error: {e}")
