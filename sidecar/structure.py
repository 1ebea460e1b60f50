"""Output tokens that a stream never shows as text, per model family, and how they are learned.

A model's output is more than the text a stream carries: an answer is framed by special tokens
(OpenAI's harmony channels on gpt-5, turn markers), a tool call is rendered in the model's own
call syntax around the name and arguments the stream shows, and parallel calls are wrapped
(OpenAI's ``multi_tool_use.parallel``). These overheads are additive: a number of tokens per
answer, per tool call, and per call of a parallel set. Seeds come from the published call
formats where a vendor published one and from reported usage otherwise (each row says which);
each deployment then learns its own per model, and per family for models not seen yet, from
reported usage, the way the multiplicative tokenizer factors are learned (calibration.py).

Sans-IO: no clock, no I/O; the proxy and ``sidecar replay`` call the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .calibration import OFFSET_MAX_SAMPLES, Calibration


@dataclass(frozen=True, slots=True)
class Overheads:
    """Tokens per answer, per tool call, extra per call when a response makes several, and
    once for a reasoning block the stream shows (its delimiters and what a summary leaves out:
    Claude 4 bills full thinking and streams a summary of long thinking)."""

    answer: float = 0.0
    call: float = 0.0
    parallel: float = 0.0
    reasoning: float = 0.0

    def tokens(self, answers: int, calls: int, reasoning: bool = False) -> float:
        return (answers * self.answer + calls * self.call
                + (calls * self.parallel if calls > 1 else 0.0)
                + (self.reasoning if reasoning else 0.0))


# Model-name prefixes (of the name's last path segment, lowercase) -> family. Longest first.
_FAMILIES: tuple[tuple[str, str], ...] = tuple(sorted((
    ("gpt-5", "gpt-5"), ("gpt-oss", "gpt-oss"), ("gpt-4", "gpt-4"), ("gpt-3.5", "gpt-4"),
    ("gpt-35", "gpt-4"), ("chatgpt", "gpt-4"), ("ft:gpt", "gpt-4"), ("o1", "o-series"),
    ("o3", "o-series"), ("o4", "o-series"), ("claude", "claude"), ("anthropic.claude", "claude"),
    ("gemini", "gemini"), ("deepseek", "deepseek"), ("qwen", "qwen"), ("qwq", "qwen"),
    ("mistral", "mistral"), ("magistral", "mistral"), ("ministral", "mistral"),
    ("codestral", "mistral"), ("devstral", "mistral"), ("pixtral", "mistral"),
    ("llama", "llama"), ("meta-llama", "llama"), ("glm", "glm"), ("chatglm", "glm"),
    ("ernie", "ernie"), ("grok", "grok"), ("sonar", "sonar"), ("nova", "nova"),
    ("amazon.nova", "nova"), ("command", "cohere"), ("c4ai", "cohere"), ("cohere", "cohere"),
    ("phi", "phi"),
    ("kimi", "kimi"), ("moonshot", "kimi"), ("minimax", "minimax"),
), key=lambda p: -len(p[0])))

# Seeds per family (answer, call, parallel). Where they come from:
#   gpt-4      answer 0: plain text is exact on the gpt-4o/4.1 captures. call 7: reported minus
#              name and arguments on the gpt-4o-mini capture. parallel 9: the o200k tokens of
#              '{"recipient_name":"functions.","parameters":}' that each call costs inside the
#              multi_tool_use.parallel wrapper (OpenAI's published tool namespace).
#   gpt-5      answer 10: harmony framing of the analysis and final channels (<|channel|>,
#              <|message|>, <|end|>, <|return|> and the channel names), 9-10 on every gpt-5
#              capture. call 6: the commentary channel's 'to=functions.NAME <|constrain|>json'.
#   gpt-oss    answer 5, call 10: the harmony format as published with gpt-oss.
#   o-series   answer 1 (o3-mini capture), call 7 as gpt-4.
#   qwen       call 13: Qwen's chat template '<tool_call>\n{"name": "", "arguments": }\n
#              </tool_call>' (special tokens one each).
#   mistral    call 14: mistral-common's '[TOOL_CALLS][{"name": "", "arguments": , "id": ""}]'
#              with its 9-character call id.
#   llama      call 12: Llama 3's '<|python_tag|>{"name": "", "parameters": }<|eom_id|>'.
#   deepseek   answer 2, call 30: DeepSeek V3.2's DSML call markup ('<|DSML|invoke name=..>',
#              a parameter element per argument), as its published template renders it.
#   glm        answer 2, call 10: GLM-4's '<tool_call>NAME<arg_key>..<arg_value>..</tool_call>'.
#   claude     answer 2, call 33; cohere answer 3, call 24; nova answer 2, call 24; gemini
#              answer 1, call 7: no published output format; reported minus visible text on
#              the recorded captures (docs/ACCURACY.md marks these as in-sample).
#   ernie      0, 0: the visible text accounts for ERNIE's reported output on its captures.
#   grok       answer 0: grok-3-mini's visible answer is its reported output net of reasoning.
SEEDS: dict[str, Overheads] = {
    "gpt-4": Overheads(0, 7, 9),
    "gpt-5": Overheads(10, 6, 0),
    "gpt-oss": Overheads(5, 10, 0),
    "o-series": Overheads(1, 7, 9),
    "qwen": Overheads(0, 13, 0),
    "mistral": Overheads(1, 14, 0),
    "llama": Overheads(1, 12, 0),
    "deepseek": Overheads(2, 30, 0),
    "glm": Overheads(2, 10, 0),
    "claude": Overheads(2, 33, 0),
    "cohere": Overheads(3, 24, 0),
    "nova": Overheads(2, 24, 0),
    "gemini": Overheads(1, 7, 0),
    "ernie": Overheads(0, 0, 0),
    "grok": Overheads(0, 10, 0),
}
DEFAULT = Overheads(1, 10, 0)

# Learned values are kept within these bounds (tokens): beyond them an observation says more
# about hidden reasoning or server-side work than about framing, and is not learned from.
ANSWER_BOUNDS = (0.0, 64.0)
CALL_BOUNDS = (0.0, 128.0)
REASONING_BOUNDS = (0.0, 256.0)
# The answer overhead is only learned where the text's own count cannot swamp it: exact
# tokenizers, or answers this short.
ANSWER_LEARN_MAX_TEXT = 100


@lru_cache(maxsize=4096)
def family_of(model: str | None) -> str:
    """The model family a name belongs to ("other" when unknown)."""
    name = (model or "").strip().lower()
    if not name:
        return "other"
    last = name.rsplit("/", 1)[-1]
    for candidate in (last, name.rsplit(":", 1)[0]):
        for prefix, family in _FAMILIES:
            if candidate.startswith(prefix):
                if prefix in ("o1", "o3", "o4") and candidate[len(prefix):][:1] not in ("", "-"):
                    continue
                return family
    for prefix, family in _FAMILIES:  # region or vendor qualified: "us.anthropic.claude-..."
        if f".{prefix}" in last:
            return family
    return "other"


def _family_key(model: str | None) -> str | None:
    """Where a family's learned values live; None for models of no known family (what one
    unknown model teaches must not apply to every other)."""
    family = family_of(model)
    return None if family == "other" else "family:" + family


# The seed counts as this many observations beside what a deployment learns: one answer cannot
# overrule a published format, fifty can.
SEED_WEIGHT = 1


def overheads(calibration: Calibration | None, model: str | None) -> Overheads:
    """What the model (else its family) learned, with the family's seed counted as
    SEED_WEIGHT observations among them; the seed alone before any."""
    seed = SEEDS.get(family_of(model), DEFAULT)
    if calibration is None:
        return seed
    # (the reasoning block has no seed: nothing to weigh what is learned against)
    return Overheads(_learned(calibration, model, "output_answer", seed.answer, SEED_WEIGHT),
                     _learned(calibration, model, "output_call", seed.call, SEED_WEIGHT),
                     seed.parallel,
                     _learned(calibration, model, "output_reasoning", seed.reasoning, 0))


def _learned(calibration: Calibration, model: str | None, kind: str, seed: float,
             seed_weight: int) -> float:
    """What the model learned of ``kind``, else its family, else the seed; with the seed
    counted as ``seed_weight`` observations beside the learned ones."""
    for key in (model, _family_key(model)):
        learned = calibration.offset(key, kind)
        if learned is not None:
            n = min(calibration.samples(key, kind), OFFSET_MAX_SAMPLES)
            return (seed * seed_weight + learned * n) / (seed_weight + n)
    return seed


def scale(calibration: Calibration | None, model: str | None, token_type: str) -> float:
    """The learned tokenizer factor of a model, else of its family, else 1."""
    if calibration is None:
        return 1.0
    for key in (model, _family_key(model)):
        if calibration.learned(key, token_type):
            return calibration.factor(key, token_type)
    return 1.0


# Hidden reasoning (reported, never shown as text) is learned per model and reasoning effort as
# a mean per answer; it is used for live counts and for streams that end without usage only once
# it is stable: this many answers seen, and a mean deviation within this share of the mean.
HIDDEN_SETTLED = 5
HIDDEN_MAX_SPREAD = 0.5


def effort_of(body: object) -> str:
    """The reasoning effort a request asks for ("default" when it names none)."""
    if isinstance(body, dict) and ("reasoning" in body or "reasoning_effort" in body):
        reasoning = body.get("reasoning")
        effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
        effort = effort or body.get("reasoning_effort")
        if isinstance(effort, str) and effort:
            return effort[:16]
    return "default"


def hidden_reasoning(calibration: Calibration | None, model: str | None, effort: str) -> float:
    """The hidden reasoning tokens per answer this model has shown steadily at this effort,
    else 0 (unknown, or too variable to use)."""
    if calibration is None or not model:
        return 0.0
    mean = calibration.offset(model, "output_hidden@" + effort)
    spread = calibration.offset(model, "output_hidden_dev@" + effort)
    if not mean or spread is None or calibration.samples(model, "output_hidden@" + effort) \
            < HIDDEN_SETTLED or spread > HIDDEN_MAX_SPREAD * mean:
        return 0.0
    return mean


def learn_hidden(calibration: Calibration, model: str | None, effort: str,
                 per_answer: float) -> None:
    deviation = calibration.observe_mean(model, "output_hidden@" + effort, per_answer)
    if deviation is not None:
        calibration.observe_mean(model, "output_hidden_dev@" + effort, deviation)


@dataclass(frozen=True, slots=True)
class Observation:
    """What one settled response showed: the visible text's raw estimate and its structure,
    and the output the provider reported for what the stream showed (reasoning the stream
    never showed, or showed only as a summary, taken out)."""

    model: str | None
    raw_text: float  # the visible text by the tokenizer profile, before any learned factor
    exact: bool  # the text was counted by the model's own tokenizer
    answers: int
    calls: int
    visible_output: int
    plain: bool = True  # text only: no reasoning shown or reported, no tool calls
    reasoning: bool = False  # the stream showed reasoning that was billed (not a mere summary)


def learn(calibration: Calibration, obs: Observation) -> bool:
    """Learn from one response: the tokenizer factor (profiles without a public tokenizer,
    on the text net of structure), then the answer or call overhead; per model and family."""
    if not obs.model or obs.answers <= 0:
        return False
    current = overheads(calibration, obs.model)
    moved = False
    if not obs.exact and obs.plain:  # reasoning and calls carry overheads of their own
        net = round(obs.visible_output - current.tokens(obs.answers, obs.calls))
        for key in (obs.model, _family_key(obs.model)):
            moved = calibration.observe(key, "output", obs.raw_text, net) or moved
    text_tokens = obs.raw_text * scale(calibration, obs.model, "output")
    residual = obs.visible_output - text_tokens
    if obs.calls == 0:
        if not obs.exact and text_tokens > ANSWER_LEARN_MAX_TEXT:
            return moved
        if obs.reasoning:
            kind, bounds = "reasoning", REASONING_BOUNDS
            value = residual - obs.answers * current.answer
        else:
            kind, value, bounds = "answer", residual / obs.answers, ANSWER_BOUNDS
    else:
        rest = residual - obs.answers * current.answer - (
            obs.calls * current.parallel if obs.calls > 1 else 0.0) - (
            current.reasoning if obs.reasoning else 0.0)
        kind, value, bounds = "call", rest / obs.calls, CALL_BOUNDS
    for key in (obs.model, _family_key(obs.model)):
        moved = calibration.observe_offset(key, "output_" + kind, value, bounds) or moved
    return moved


def estimate(calibration: Calibration | None, obs: Observation) -> int:
    """The output estimate of a response's visible part with what ``calibration`` learned."""
    over = overheads(calibration, obs.model)
    return round(obs.raw_text * scale(calibration, obs.model, "output")
                 + over.tokens(obs.answers, obs.calls, obs.reasoning))


# -- the input side ---------------------------------------------------------------------------
#
# A prompt is billed for more than its messages: tool definitions rendered into the model's
# own preamble, a tool-use system prompt, and preambles some APIs add to every request
# (Responses on gpt-4o, thinking modes). The dialects count what the request carries; what it
# never shows is an additive overhead per request, once when tools are defined, and per tool,
# seeded where the vendor published it and learned per (model, API) and family otherwise.


@dataclass(frozen=True, slots=True)
class InputOverheads:
    request: float = 0.0  # every request
    tools: float = 0.0  # once, when the request defines tools (a tool-use system prompt)
    tool: float = 0.0  # per tool definition
    thinking: float = 0.0  # once, when the request turns extended thinking on

    def tokens(self, n_tools: int, thinking: bool = False) -> float:
        return self.request + ((self.tools + n_tools * self.tool) if n_tools else 0.0) + (
            self.thinking if thinking else 0.0)


# Anthropic publishes the tool-use system prompt it adds when tools are defined: 346 tokens
# for tool_choice auto or none, 313 for any or a named tool, on the Claude 4 and 3.7 models
# (docs.claude.com, "Tool use: pricing"); the tool_choice split is applied by tool_prompt().
INPUT_SEEDS: dict[str, InputOverheads] = {
    "claude": InputOverheads(0, 346, 0),
}
_NO_INPUT_SEED = InputOverheads()
# A request's overhead may be negative: the framing assumed per message (OpenAI's 3) is more
# than some APIs count (Bedrock's Nova counts the texts alone).
REQUEST_BOUNDS = (-64.0, 4096.0)
THINKING_BOUNDS = (0.0, 4096.0)
TOOL_BOUNDS = (0.0, 1024.0)
# A request's own overhead is learned only where the text's count cannot swamp it.
REQUEST_LEARN_MAX_TEXT = 200


def tool_prompt(family: str, tool_choice: object) -> float | None:
    """A published tool-use preamble for a named tool_choice, or None (use the seed)."""
    if family == "claude" and isinstance(tool_choice, dict) and \
            tool_choice.get("type") in ("any", "tool"):
        return 313.0
    return None


def input_overheads(calibration: Calibration | None, model: str | None,
                    api: str, tool_choice: object = None) -> InputOverheads:
    family = family_of(model)
    seed = INPUT_SEEDS.get(family, _NO_INPUT_SEED)
    tools = tool_prompt(family, tool_choice)
    if tools is not None:
        seed = InputOverheads(seed.request, tools, seed.tool)
    if calibration is None:
        return seed
    # the thinking preamble is the model's, whatever the API it is reached by; input seeds
    # are mostly "unknown" (0): what is learned replaces them
    return InputOverheads(_learned(calibration, model, "input_request@" + api, seed.request, 0),
                          seed.tools,
                          _learned(calibration, model, "input_tool@" + api, seed.tool, 0),
                          _learned(calibration, model, "input_thinking", seed.thinking, 0))


def thinking_requested(body: object) -> bool:
    """The request turns a model's extended thinking on: Anthropic, DeepSeek and Zhipu
    ``thinking``, OpenRouter ``reasoning``, Bedrock's additional model fields, Gemini's
    thinkingConfig with thoughts included."""
    if not isinstance(body, dict):
        return False
    for holder in (body, body.get("additionalModelRequestFields")):
        if isinstance(holder, dict):
            thinking = holder.get("thinking")
            if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
                return True
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("enabled") is not False and (
            reasoning.get("enabled") or reasoning.get("max_tokens")) and "effort" not in reasoning:
        return True  # OpenRouter's switch (OpenAI's own "reasoning" carries an effort)
    config = body.get("generationConfig")
    thinking_config = config.get("thinkingConfig") if isinstance(config, dict) else None
    return isinstance(thinking_config, dict) and bool(thinking_config.get("includeThoughts"))


_CLIENT_TOOL_TYPES = frozenset({None, "function", "custom", "tool"})


def _tool_type(tool: dict[str, object]) -> object:
    """A tool's "type", or a marker for one that is not a string (never unhashable)."""
    kind = tool.get("type")
    return kind if kind is None or isinstance(kind, str) else "?"


def tool_definitions(body: object) -> list[dict[str, object]]:
    """The request's client-side tool definitions, whatever the format: OpenAI chat and
    Responses, Anthropic, Gemini functionDeclarations, Bedrock toolConfig, ERNIE and legacy
    OpenAI ``functions``, DashScope ``parameters.tools``."""
    if not isinstance(body, dict):
        return []
    found: list[object] = []
    for holder in (body, body.get("parameters"), body.get("toolConfig")):
        if isinstance(holder, dict):
            for key in ("tools", "functions"):
                if isinstance(holder.get(key), list):
                    found += holder[key]
    out: list[dict[str, object]] = []
    for tool in found:
        if not isinstance(tool, dict):
            continue
        decls = tool.get("functionDeclarations") or tool.get("function_declarations")
        if isinstance(decls, list):
            out += [d for d in decls if isinstance(d, dict)]
        elif isinstance(tool.get("function"), dict):
            out.append(tool["function"])
        elif isinstance(tool.get("toolSpec"), dict):
            out.append(tool["toolSpec"])
        elif _tool_type(tool) in _CLIENT_TOOL_TYPES and isinstance(tool.get("name"), str):
            out.append(tool)
    return out


def server_tools(body: object) -> list[str]:
    """Server-side tools the request enables (web search, code execution, file search, MCP,
    Gemini grounding): their results enter the prompt on the provider's side, unseen."""
    if not isinstance(body, dict):
        return []
    names: list[str] = []
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        kind = _tool_type(tool)
        if kind not in _CLIENT_TOOL_TYPES:
            names.append(str(kind))
        for key in ("googleSearch", "google_search", "googleSearchRetrieval", "codeExecution",
                    "code_execution", "urlContext", "url_context"):
            if key in tool:
                names.append(key)
    return names


@dataclass(frozen=True, slots=True)
class InputObservation:
    model: str | None
    api: str  # the dialect: the same model has other preambles behind other APIs
    raw_text: float  # the dialect's count of what the request carries, before any factor
    exact: bool
    tools: int
    tool_choice: object
    reported: int
    thinking: bool = False
    media: bool = False  # images, audio or files the estimate may not have counted


_MEDIA_TYPES = frozenset({"image_url", "input_image", "image", "file", "input_file",
                          "input_audio", "audio", "document", "video", "video_url"})
_MEDIA_KEYS = ("image_url", "input_audio", "fileData", "file_data", "inlineData", "inline_data",
               "image", "images", "document", "video")  # images: Ollama's base64 list


_MEDIA_KEY_SET = frozenset(_MEDIA_KEYS)
# Top-level fields that hold JSON schemas, never media: a tool parameter named "image" is a
# parameter (and the walk through every tool definition cost more than the rest of settling).
_SCHEMA_FIELDS = frozenset({"tools", "functions", "toolConfig", "response_format",
                            "tool_choice", "text", "generationConfig", "parameters"})


def has_media(body: object) -> bool:
    """Whether a request carries media parts (images, audio, files, video) anywhere in its
    messages: their tokens are counted only where a published formula and their size are
    known, so such requests do not teach the prompt's overheads."""
    stack: list[tuple[object, int]] = [(body, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str) and kind in _MEDIA_TYPES:
                return True
            if not _MEDIA_KEY_SET.isdisjoint(node):
                return True
            if depth < 8:
                stack.extend((v, depth + 1) for k, v in node.items()
                             if isinstance(v, dict | list)
                             and not (depth == 0 and k in _SCHEMA_FIELDS))
        elif isinstance(node, list) and depth < 8:
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


def learn_input(calibration: Calibration, obs: InputObservation) -> bool:
    """Learn the tokenizer factor (large plain prompts of profiles without a public tokenizer),
    else the per-request overhead (no tools) or the per-tool overhead (with tools). Requests
    with media teach nothing (their parts may have gone uncounted)."""
    if not obs.model or obs.media:
        return False
    current = input_overheads(calibration, obs.model, obs.api, obs.tool_choice)
    moved = False
    if not obs.exact and not obs.tools and obs.raw_text > REQUEST_LEARN_MAX_TEXT:
        net = round(obs.reported - current.request
                    - (current.thinking if obs.thinking else 0.0))
        for key in (obs.model, _family_key(obs.model)):
            moved = calibration.observe(key, "input", obs.raw_text, net) or moved
        return moved
    residual = obs.reported - obs.raw_text * scale(calibration, obs.model, "input")
    if obs.tools:
        kind, bounds = "tool@" + obs.api, TOOL_BOUNDS
        value = (residual - current.request - current.tools
                 - (current.thinking if obs.thinking else 0.0)) / obs.tools
    elif obs.thinking:
        kind, value, bounds = "thinking", residual - current.request, THINKING_BOUNDS
    else:
        kind, value, bounds = "request@" + obs.api, residual, REQUEST_BOUNDS
    for key in (obs.model, _family_key(obs.model)):
        moved = calibration.observe_offset(key, "input_" + kind, value, bounds) or moved
    return moved


def estimate_input(calibration: Calibration | None, obs: InputObservation) -> int:
    over = input_overheads(calibration, obs.model, obs.api, obs.tool_choice)
    return max(0, round(obs.raw_text * scale(calibration, obs.model, "input")
                        + over.tokens(obs.tools, obs.thinking)))
