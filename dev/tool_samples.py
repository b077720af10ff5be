"""Seeded random tool-use conversations for the tool-format parity tests (tests/test_tool_templates.py).

`tool_conversations(n, seed, ...)` yields (tools, messages) in OpenAI form: 0-3 tool definitions with nested
JSON-schema parameters; a user turn (with or without a system prompt before it); then rounds of an assistant
message with 1-3 parallel calls ({"id", "type": "function", "function": {"name", "arguments"}}), one `tool`
message per call (JSON or text results), and sometimes a later user turn; the last message an assistant
answer. Arguments and results hold unicode, quotes, backslashes and newlines. Options shape the records for
references that restrict them (mistral-common: 9-character call ids, no content beside calls; Meta / HF
Llama: one call per message, trimmed text).
"""

import json
import random
import string

TEXTS = ["Paris", "the weather in Tokyo", "café naïve résumé", "你好，世界", "Привет", "emoji 👍🏽 and 🇫🇷",
         'a "quoted" word', "it's O'Brien's", "back\\slash", "line one\nline two", "tab\tseparated",
         "{\"looks\": \"like json\"}", "<tool_call> in text", "50% off & <b>bold</b>", "naïve — dash – en",
         "😀", "x", "", "  padded  ", "trailing newline\n", "ẞtraße", "C:\\path\\to\\file.txt",
         "مرحبا", "1e-5", "null", "[1, 2, 3]"]
NAMES = ["get_weather", "search", "lookup_user", "convert_units", "send_email", "calc", "translate",
         "book_flight", "read_file", "list_items"]
WORDS = "the a of to check find please now then what is it for my with and result value next".split()


def _text(rng, words=(3, 12), clean=False):
    out = []
    for _ in range(rng.randint(*words)):
        out.append(rng.choice(TEXTS) if rng.random() < 0.3 else rng.choice(WORDS))
    s = " ".join(out)
    return s.strip() if clean else s


def _schema(rng, depth=0):
    kind = rng.choice(["string", "integer", "number", "boolean", "array", "object", "enum"] if depth < 2
                      else ["string", "integer", "boolean", "enum"])
    desc = {"description": _text(rng, (1, 6), clean=True)} if rng.random() < 0.7 else {}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["c", "f", "k", "é", "a b", 'q"'], rng.randint(1, 3)), **desc}
    if kind == "array":
        return {"type": "array", "items": _schema(rng, depth + 1), **desc}
    if kind == "object":
        props = {f"p{k}_{rng.choice(['a', 'b', 'x'])}": _schema(rng, depth + 1) for k in range(rng.randint(1, 3))}
        return {"type": "object", "properties": props, "required": sorted(rng.sample(list(props), 1)), **desc}
    return {"type": kind, **desc}


def _value(rng, schema):
    t = schema["type"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if t == "string":
        return rng.choice(TEXTS) if rng.random() < 0.7 else _text(rng, (1, 5))
    if t == "integer":
        return rng.choice([0, -3, 42, 10 ** 12])
    if t == "number":
        return rng.choice([0.5, -1.25, 3.0, 1e-7, 2.5e20])
    if t == "boolean":
        return rng.random() < 0.5
    if t == "array":
        return [_value(rng, schema["items"]) for _ in range(rng.randint(0, 3))]
    return {k: _value(rng, s) for k, s in schema["properties"].items() if k in schema["required"] or rng.random() < 0.6}


def _tool(rng, name):
    params = {"type": "object", "properties": {}, "required": []}
    for k in range(rng.randint(0, 4)):
        key = rng.choice(["location", "query", "unit", "options", "items", "n", "filters", "when"]) + str(k)
        params["properties"][key] = _schema(rng)
        if rng.random() < 0.5:
            params["required"].append(key)
    return {"type": "function", "function": {"name": name, "description": _text(rng, (2, 10), clean=True),
                                             "parameters": params}}


def _result(rng, clean):
    r = rng.random()
    if r < 0.4:  # JSON, as a tool returns it (compact or spaced, unicode unescaped or escaped)
        obj = {"status": rng.choice(["ok", "error", "é"]), "value": rng.choice(TEXTS),
               "n": rng.randint(-5, 10 ** 6), "nested": {"list": [1, 2.5, None, True], "s": rng.choice(TEXTS)}}
        return json.dumps(obj, ensure_ascii=rng.random() < 0.3, separators=rng.choice([None, (",", ":")]))
    if r < 0.5:
        return rng.choice(["42", "true", "null", "[1, 2]", '"a string"', "3.5"])  # JSON scalars and lists
    return _text(rng, (1, 15), clean=clean)


CODE = ["print(1 + 1)", "import math\nprint(math.pi)", "def f(x):\n    return x * 2\n\nprint(f(\"é\"))"]


def tool_conversations(n: int, seed: int = 0, *, call_ids: str = "any", content_with_calls: bool = True,
                       max_calls: int = 3, clean: bool = False, reasoning: bool = False, builtin: bool = False):
    """n (tools, messages) pairs. call_ids: "any" (random strings, sometimes none), "mistral" (9 alphanumeric
    characters, always). clean: no leading/trailing whitespace in any text (the HF Llama template trims).
    reasoning: assistant messages sometimes carry `reasoning_content` (Qwen3). builtin: some assistant messages
    are one call of a Llama 3.1 built-in tool (brave_search, wolfram_alpha, photogen: {"query"};
    code_interpreter: {"code"}) with no content."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tools = [_tool(rng, name) for name in rng.sample(NAMES, rng.randint(0, 3))]
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": _text(rng, (0, 8), clean=clean)})
        messages.append({"role": "user", "content": _text(rng, clean=clean) or "hi"})
        for _round in range(rng.randint(1, 3)):
            calls = []
            for _k in range(rng.randint(1, max_calls)):
                name = rng.choice(list(schemas) or NAMES)
                schema = schemas.get(name) or _tool(rng, name)["function"]["parameters"]
                args = _value(rng, schema)
                call = {"type": "function", "function": {
                    "name": name, "arguments": args if rng.random() < 0.7 else json.dumps(args, ensure_ascii=False)}}
                if call_ids == "mistral":
                    call["id"] = "".join(rng.choices(string.ascii_letters + string.digits, k=9))
                elif rng.random() < 0.8:
                    call["id"] = "call_" + "".join(rng.choices(string.ascii_lowercase + string.digits, k=12))
                calls.append(call)
            content = _text(rng, (1, 8), clean=clean) if content_with_calls and rng.random() < 0.4 else ""
            if builtin and rng.random() < 0.3:
                name = rng.choice(["brave_search", "wolfram_alpha", "photogen", "code_interpreter"])
                args = {"code": rng.choice(CODE)} if name == "code_interpreter" else {"query": _text(rng, (1, 6), clean=True)}
                calls, content = [{"id": f"call_{rng.randint(0, 999)}", "type": "function",
                                   "function": {"name": name, "arguments": args}}], ""
            msg = {"role": "assistant", "content": content, "tool_calls": calls}
            if reasoning and rng.random() < 0.5:
                msg["reasoning_content"] = _text(rng, (1, 10), clean=True)
            messages.append(msg)
            for call in calls:
                res = {"role": "tool", "content": _result(rng, clean), "name": call["function"]["name"]}
                if "id" in call:
                    res["tool_call_id"] = call["id"]
                messages.append(res)
            if rng.random() < 0.3:  # the model answers, the user asks again
                messages.append({"role": "assistant", "content": _text(rng, clean=clean) or "ok"})
                messages.append({"role": "user", "content": _text(rng, clean=clean) or "more"})
        final = {"role": "assistant", "content": _text(rng, clean=clean) or "done"}
        if reasoning and rng.random() < 0.5:
            final["reasoning_content"] = _text(rng, (1, 10), clean=True)
        messages.append(final)
        out.append((tools, messages))
    return out
