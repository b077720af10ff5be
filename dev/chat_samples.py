"""Deterministic test text and conversations for tokenizer and chat-template parity (and bench.py).

`mixed_text()` is >= 50 KB of prose, code, numbers, CJK and other scripts, emoji, runs of spaces and
newlines, and strings that look like special tokens. `conversations()` covers the template cases of
issue 3: single and multi-turn, with and without system, empty system, unicode, code blocks,
leading/trailing whitespace, user text containing special-token strings.
"""

import random

WORDS = ("the of and to in is was for on that with as by at from it be this which or an are not have "
         "model token train data loss learning rate batch weight gradient attention layer norm value "
         "Paris London Tokyo Alice Bob quick brown fox jumps over lazy dog").split()
CONTRACTIONS = ["don't", "I'm", "it's", "we've", "they'll", "she'd", "you're", "DON'T", "It's", "o'clock"]
CODE = [
    "def f(x):\n    return x ** 2 + 1\n",
    "for (let i = 0; i < n; i++) {\n\tconsole.log(`i=${i}`);\n}\n",
    '{"name": "llama", "layers": 32, "rope_theta": 500000.0, "tags": ["a", "b"]}\n',
    "class A:\n    def __init__(self):\n        self.x = [1, 2, 3]  # comment\n\n\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;\n",
    "    if a != b and not (c <= d):\n        raise ValueError('bad')\n",
    "x = {k: v for k, v in zip(range(10), 'abcdefghij')}\r\n",
]
NUMBERS = ["3.14159", "2,718,281", "1234567890123", "0x1F", "1e-5", "-42", "2024-01-31", "+1 (555) 010-9999",
           "99.9%", "$1,000.00", "10^9", "1/3", "007", "١٢٣", "Ⅻ", "½"]
SCRIPTS = ["你好，世界！今天天气很好。", "日本語のテキストです。カタカナ、ひらがな。", "한국어 문장입니다.",
           "Привет, мир! Как дела?", "مرحبا بالعالم", "Ελληνικά γράμματα", "עברית", "हिन्दी पाठ",
           "café naïve résumé façade", "e\u0301 combining accent", "ẞtraße", "ﬁligature"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🤖💬", "❤️", "🧑‍💻", "✅", "🎉🎉🎉"]
SPACES = ["  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", " \n", "\n ", "\r\n", "  \n\n  ", " \t ", "        "]
SPECIAL_LOOKING = ["<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>", "<|im_end|>",
                   "<|im_start|>assistant", "<|endoftext|>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>",
                   "<</SYS>>", "<unk>", "<|reserved_special_token_5|>", "[TOOL_CALLS]", "<0x0A>", "▁"]


def _chunk(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        words = [rng.choice(WORDS + CONTRACTIONS) for _ in range(rng.randint(3, 14))]
        words[0] = words[0].capitalize()
        return " ".join(words) + rng.choice([".", "!", "?", ",", ";", ":", "..."]) + " "
    if kind < 0.5:
        return rng.choice(CODE)
    if kind < 0.6:
        return rng.choice(NUMBERS) + rng.choice([" ", "", ", "])
    if kind < 0.72:
        return rng.choice(SCRIPTS) + rng.choice([" ", "", "\n"])
    if kind < 0.8:
        return rng.choice(EMOJI) + rng.choice([" ", ""])
    if kind < 0.92:
        return rng.choice(SPACES)
    return rng.choice(SPECIAL_LOOKING) + rng.choice([" ", "", "\n"])


def mixed_text(n_bytes: int = 50_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        parts.append(_chunk(rng))
        size += len(parts[-1].encode())
    return "".join(parts)


def mixed_lines(n_bytes: int = 50_000, seed: int = 0) -> list[str]:
    """The same kind of text as many short strings: every string start is a tokenizer edge case."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_bytes:
        out.append("".join(_chunk(rng) for _ in range(rng.randint(1, 4))))
        size += len(out[-1].encode())
    return out


def conversations() -> list[tuple[str, list[dict]]]:
    """(name, messages) cases; each is rendered with and without the generation prompt by the tests."""
    S = lambda c: {"role": "system", "content": c}  # noqa: E731
    U = lambda c: {"role": "user", "content": c}  # noqa: E731
    A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    rng = random.Random(1)
    cases = [
        ("single", [U("What is the capital of France?"), A("Paris.")]),
        ("system", [S("You are a terse assistant."), U("Hi!"), A("Hello.")]),
        ("empty_system", [S(""), U("Hi"), A("Hey")]),
        ("multi_turn", [U("Count to 3."), A("1, 2, 3."), U("Now backwards."), A("3, 2, 1."), U("Thanks"),
                        A("You're welcome!")]),
        ("multi_turn_system", [S("Answer in French."), U("Hello"), A("Bonjour"), U("Goodbye"), A("Au revoir")]),
        ("unicode", [U("Traduis: 你好，世界 🇫🇷 café"), A("Bonjour le monde 🌍 — «ça va?» 日本語も")]),
        ("emoji_only", [U("👍🏽👨‍👩‍👧‍👦"), A("🎉")]),
        ("code_block", [U("Write a function.\n\n```python\ndef f(x):\n    pass\n```"),
                        A("```python\ndef f(x):\n    return x * 2\n```\n\nThis doubles `x`.")]),
        ("leading_trailing_ws", [U("  padded question  "), A("  padded answer  ")]),
        ("newlines_edges", [U("\nstarts with newline"), A("\n\nanswer after blank lines\n")]),
        ("tabs_spaces", [U("a\tb    c"), A("x  y\t\tz   ")]),
        ("special_strings_user", [U("Ignore this: <|eot_id|><|start_header_id|>assistant<|end_header_id|> [INST] "
                                    "</s><s> <|im_end|><|im_start|>system <<SYS>>"), A("I see special-looking text.")]),
        ("special_strings_assistant", [U("Echo tokens"), A("<|eot_id|> [/INST] <|im_end|> </s>")]),
        ("system_special", [S("<<SYS>> is not a tag here <|im_start|>"), U("ok?"), A("ok.")]),
        ("long_system_multiline", [S("Rules:\n1. Be kind.\n2. Be brief.\n\n3. Cite sources."),
                                   U("Tell me about Tokyo."), A("Tokyo is the capital of Japan.")]),
        ("numbers", [U("Compute 1234567 * 89 = ?"), A("1234567 * 89 = 109876463")]),
        ("json", [U('Return JSON for {"a": 1}'), A('{"a": 1, "b": [true, false, null]}')]),
        ("multi_turn_unicode_system", [S("Réponds en 日本語."), U("Bonjour"), A("こんにちは"), U("Merci"),
                                       A("どういたしまして")]),
        ("mid_space_answer", [U("Why?"), A(" Because.")]),
        ("long_mixed", [U(mixed_text(600, seed=7)), A(mixed_text(800, seed=8))]),
        ("whitespace_only", [U("   "), A(" \n ")]),
        ("prompt_only", [U("Only a question, no answer yet.")]),
        ("system_prompt_only", [S("Be helpful."), U("What now?")]),
        ("multi_turn_open", [U("First"), A("One"), U("Second")]),
        # sentencepiece writes a space as "\u2581" (3 bytes in UTF-8): the mask must not mistake one for the other
        ("u2581_text", [S("rules\u2581\u2581one"), U("a\u2581\u2581\u2581\u2581b"), A("Hello\u2581world, nice day")]),
        ("byte_not_in_vocab", [U("q"), A("\x04hi")]),  # SmolLM2's vocabulary has no 0x04 byte: dropped
    ]
    for k in range(4):  # random multi-turn conversations over the mixed text
        msgs = [S(mixed_text(rng.randint(20, 200), seed=100 + k))] if k % 2 else []
        for t in range(rng.randint(1, 3)):
            msgs += [U(mixed_text(rng.randint(10, 300), seed=200 + 10 * k + t).strip() or "?")]
            msgs += [A(mixed_text(rng.randint(10, 300), seed=300 + 10 * k + t).strip() or "!")]
        cases.append((f"random_{k}", msgs))
    return cases
