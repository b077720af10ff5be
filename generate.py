"""Sample or chat from a native checkpoint dir with its chat template, streaming tokens as they come.

    python generate.py --ckpt_paths outputs/sft --prompt "What is 12 plus 30?"
    python generate.py --ckpt_paths checkpoints/base outputs/sft_lora/adapter --chat
    python generate.py --ckpt_paths outputs/sft --prompts_file prompts.jsonl --output_file out.jsonl

The template defaults to the YAML beside the checkpoint (convert.py writes the family's; a training run copies
its own). Generation stops at the template's stop tokens, never printed (model.generate and generate_batch, the
Python API, return them: split_stop gives the ids printed here and the finish reason). `--temperature 0` is
greedy; `--prompts_file` runs left-padded batches through the KV cache and writes one line per input line, in
input order.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import lora
from model import DTYPES, Transformer, generate, sample_rows
from tokenize_chat import (ConversationError, find_template, load_template, load_tokenizer, record_conversations,
                           record_tools, stop_token_ids, tokenize_conversation)


# -- batched generation -------------------------------------------------------------------------------------
@torch.no_grad()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, stop_ids=(), generator: torch.Generator | None = None,
                   pad_id: int = 0, num_generations: int = 1) -> list[list[int]]:
    """Continue several prompts at once: left-padded into one [B, T] batch, one KV cache.

    Returns each row's new ids, as `list(model.generate(...))` would for that prompt alone: a stop id, when
    reached, is included and ends that row. Left padding keeps every row's last prompt token in the same
    column, so one decoding step serves all rows; each row's positions start at 0 at its first real token
    and a mask hides the pad keys. Sampling is vectorised over the rows (model.sample_rows).

    num_generations G > 1 (GRPO's rollouts): G continuations of each prompt, prompt i's at rows [i G, (i + 1) G)
    of the result. Each prompt is prefilled once; its KV cache is then copied to its G rows, which decode
    together, and sample exactly what G separate prefills would (same generator, same tokens).
    """
    device = model.output.weight.device
    P, T, G = len(prompts), max(len(p) for p in prompts), num_generations
    B = P * G
    pads = torch.tensor([T - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], device=device)
    stop_ids = set(stop_ids)
    out, done = [[] for _ in range(B)], [False] * B

    def attention_mask(pos, n):
        """[B, 1, n, pos + n]: query column i sees key column j <= i that is not padding. Pad columns see
        themselves, so no softmax row is empty (an all-masked row gives NaN, and NaN * 0 poisons real rows)."""
        q, k = torch.arange(pos, pos + n, device=device), torch.arange(pos + n, device=device)
        real = k[None, None, :] >= pads[:, None, None]
        return ((k[None, :] <= q[:, None]) & (real | (k[None, :] == q[:, None])))[:, None]

    model.setup_cache(P, T + max_new_tokens)
    try:
        pos = 0
        for step in range(max_new_tokens):
            n = tokens.shape[1]
            positions = (torch.arange(pos, pos + n, device=device)[None, :] - pads[:, None]).clamp(min=0)
            mask = attention_mask(pos, n)
            # Sliding-window layers (Mistral, Gemma 3's local ones) also hide keys a window or more back: with
            # left padding, columns and positions differ by the row's padding alone, so column distance will do.
            window = model.args.sliding_window
            local = mask & (torch.arange(pos, pos + n, device=device)[:, None]
                            - torch.arange(pos + n, device=device)[None, :] < window) if window else None
            h = model.hidden_states(tokens, positions, mask, pos, mask_local=local)
            logits = model.output(h[:, -1]).float()  # only the last column: no [B, T, V] logits at prefill
            pos += n
            if step == 0 and G > 1:  # the prompts are in the cache: each becomes its G rows
                for layer in model.layers:
                    cache = layer.attention.cache
                    cache.k, cache.v = cache.k.repeat_interleave(G, 0), cache.v.repeat_interleave(G, 0)
                pads, logits = pads.repeat_interleave(G), logits.repeat_interleave(G, 0)
            next_ids = sample_rows(logits, temperature, top_p, top_k, generator).tolist()  # one device sync
            for b, i in enumerate(next_ids):
                if done[b]:
                    next_ids[b] = pad_id
                else:
                    out[b].append(i)
                    done[b] = i in stop_ids
            if all(done):
                break
            tokens = torch.tensor(next_ids, device=device)[:, None]
    finally:
        model.clear_cache()
    return out


# -- streaming text ---------------------------------------------------------------------------------------
class StreamDecoder:
    """Turns ids into printable text one token at a time. A multi-byte character split across tokens decodes
    to U+FFFD until its last byte arrives, so text ending in one is held back; the whole reply is decoded each
    time (a few hundred tokens: cheap) so a tokenizer's context-dependent spacing comes out as in `decode`."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new

    def text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def flush(self) -> str:
        text = self.text()
        new, self.shown = text[self.shown:], len(text)
        return new


def split_stop(ids: list[int], stop_ids) -> tuple[list[int], str]:
    """A reply's ids as model.generate and generate_batch return them (the stop token included, when reached) ->
    (the ids the CLI decodes and prints, without it; the finish reason: "stop" or "length"). Python callers that
    want the CLI's text decode the first."""
    stopped = bool(ids) and ids[-1] in stop_ids
    return (ids[:-1] if stopped else list(ids)), "stop" if stopped else "length"


def stream_reply(model, tokenizer, prompt_ids, args, stops, generator) -> tuple[str, int]:
    """Generate one reply, printing it as it comes. Returns (text without the stop token, tokens produced)."""
    decoder, n = StreamDecoder(tokenizer), 0
    for token_id in generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                             stops, generator):
        n += 1
        if token_id in stops:  # split_stop, as the tokens come
            break
        print(decoder.push(token_id), end="", flush=True)
    print(decoder.flush(), flush=True)
    return decoder.text(), n


# -- inputs -------------------------------------------------------------------------------------------------
def prompt_ids(record, where: str, system: str | None, tokenizer, template, enable_thinking: bool = True) -> list:
    """One prompt record -> the token ids that end with the template's generation prompt: {"prompt": str | [...]},
    {"messages": [...]} or ShareGPT {"conversations": [...]} (read as training records are: OpenAI messages, text
    parts), ending with a user turn (or tool results), the record's `tools` rendered as the template does. An
    error names `where` (file:line, a dataset's row)."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")  # what an output line will need
    except UnicodeEncodeError:
        raise ValueError(f"{where}: holds an unpaired surrogate escape (such as \"\\ud83d\"): not valid Unicode "
                         f"text") from None
    try:
        messages = record_conversations(record, "prompt")[0]
        if system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        ids, _ = tokenize_conversation(messages, tokenizer, template, add_generation_prompt=True,
                                       enable_thinking=enable_thinking, tools=record_tools(record))
    except ConversationError as e:
        raise ValueError(f"{where}: {e}") from None
    if messages[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"{where}: the last message is {messages[-1]['role']!r}; generation continues a "
                         f"conversation that ends with a user turn (or tool results)")
    return ids


def read_prompts_file(path: Path, system: str | None, tokenizer, template,
                      enable_thinking: bool = True) -> tuple[list[dict], list[list[int]]]:
    """Each non-empty line a prompt record (see prompt_ids). Every line is checked before anything is generated;
    an error names the file and line."""
    records, ids = [], []
    if not path.is_file():
        raise ValueError(f"--prompts_file {path} not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # columns on the line itself, not past its end
            except json.JSONDecodeError as e:
                cut = "; the line ends inside its JSON: cut short?" if e.pos >= len(e.doc.rstrip()) else ""
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}){cut}") from None
            ids.append(prompt_ids(record, where, system, tokenizer, template, enable_thinking))
            records.append(record)
    if not records:
        raise ValueError(f"--prompts_file {path} has no prompts")
    return records, ids


# -- the three modes ------------------------------------------------------------------------------------------
def run_prompts_file(model, tokenizer, template, args, stops, generator):
    records, prompts = read_prompts_file(args.prompts_file, args.system, tokenizer, template,
                                         not args.no_thinking)
    if args.output_file.is_dir():  # found now, not after generating
        raise ValueError(f"--output_file {args.output_file} is a directory; give the jsonl file to write")
    args.output_file.parent.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    results, start, n_tokens = [None] * len(prompts), time.perf_counter(), 0
    for k in range(0, len(order), args.batch_size):
        rows = order[k:k + args.batch_size]
        outs = generate_batch(model, [prompts[i] for i in rows], args.max_new_tokens, args.temperature,
                              args.top_p, args.top_k, stops, generator)
        for i, ids in zip(rows, outs):
            n_tokens += len(ids)
            shown, reason = split_stop(ids, stops)
            results[i] = {**records[i], "completion": tokenizer.decode(shown), "finish_reason": reason}
        elapsed = time.perf_counter() - start
        print(f"{min(k + args.batch_size, len(order))}/{len(order)} prompts | {n_tokens} tokens | "
              f"{n_tokens / elapsed:.1f} tok/s", file=sys.stderr, flush=True)
    tmp = args.output_file.with_name(f".{args.output_file.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, args.output_file)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {args.output_file} ({len(results)} lines)", file=sys.stderr)


def run_prompts(model, tokenizer, template, args, stops, generator):
    for k, prompt in enumerate(args.prompt):
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
                   [{"role": "user", "content": prompt}]
        ids, _ = tokenize_conversation(messages, tokenizer, template, add_generation_prompt=True,
                                       enable_thinking=not args.no_thinking)
        if len(args.prompt) > 1:
            print(f"{'' if k == 0 else chr(10)}>>> {prompt}", flush=True)
        start = time.perf_counter()
        _, n = stream_reply(model, tokenizer, ids, args, stops, generator)
        print(f"[{n} tokens, {n / (time.perf_counter() - start):.1f} tok/s]", file=sys.stderr, flush=True)


def run_chat(model, tokenizer, template, args, stops, generator):
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history = []
    print("chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        history.append({"role": "user", "content": line})
        ids, _ = tokenize_conversation(system + history, tokenizer, template, add_generation_prompt=True,
                                       enable_thinking=not args.no_thinking)
        # Too long for the model: forget the oldest exchanges, keep the system prompt and the last message.
        while len(ids) + args.max_new_tokens > model.args.max_seq_len and len(history) > 1:
            history = history[2:]
            ids, _ = tokenize_conversation(system + history, tokenizer, template, add_generation_prompt=True,
                                           enable_thinking=not args.no_thinking)
            print("(dropped the oldest exchange: the conversation exceeds max_seq_len)", file=sys.stderr)
        try:
            reply, _ = stream_reply(model, tokenizer, ids, args, stops, generator)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print("\n(interrupted)", flush=True)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--ckpt_paths", nargs="+", type=Path, required=True,
                    help="a native dir (or its consolidated.00.pth); or the base then LoRA adapters "
                         "(an adapter dir holding adapter.pth + adapter_config.json, or the adapter.pth)")
    ap.add_argument("--template_config", default=None,
                    help="chat template: a name from templates/ or a YAML path (default: the *.yaml that a "
                         "training run copied into its output dir)")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", action="append", help="a user message to answer (repeatable)")
    mode.add_argument("--prompts_file", type=Path, help='jsonl of {"prompt": str} or {"messages": [...]} lines')
    mode.add_argument("--chat", action="store_true", help="interactive chat with history (reads stdin)")
    ap.add_argument("--output_file", type=Path, help="with --prompts_file: the jsonl to write (input + completion)")
    ap.add_argument("--system", default=None, help="system prompt (for a --prompts_file line without one)")
    ap.add_argument("--max_new_tokens", type=int, default=256, help="tokens to generate at most per reply")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: keep the smallest set with this mass")
    ap.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--batch_size", type=int, default=16, help="with --prompts_file: prompts per batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--no_thinking", action="store_true",
                    help="templates with a thinking block (qwen3): answer at once, the prompt ending in an empty "
                         "<think></think> (Qwen3's enable_thinking=False)")
    args = ap.parse_args(argv)
    if args.prompts_file and not args.output_file:
        ap.error("--prompts_file needs --output_file")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        ap.error("--max_new_tokens and --batch_size must be positive")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        ap.error("--temperature and --top_k must be >= 0 and --top_p in (0, 1]")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("generate.py: error: --device cuda, but this machine has no CUDA device (use --device cpu)")
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        paths = [lora.resolve(p) for p in args.ckpt_paths]  # fails early on a missing checkpoint
        tokenizer = load_tokenizer(paths[0].parent)
        template = load_template(args.template_config or find_template(paths), tokenizer)
        stops = set(stop_token_ids(tokenizer, template))
        model = lora.load_model(paths, dtype=dtype, device=device).eval()
        generator = torch.Generator(device=device).manual_seed(args.seed)
        run = run_chat if args.chat else run_prompts_file if args.prompts_file else run_prompts
        run(model, tokenizer, template, args, stops, generator)
    except (OSError, ValueError) as e:  # bad input (a file, a line, a template) named in one line
        print(f"generate.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
