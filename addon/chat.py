"""Chat completions: OpenAI request -> Poe query, Poe answer -> OpenAI JSON and stream chunks.

Pure functions and plain data only; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi_poe.types import (
    Attachment,
    ProtocolMessage,
    QueryRequest,
    ToolCallDefinition,
    ToolDefinition,
    ToolResultDefinition,
)

from addon.answer import AnswerStream
from addon.bounds import check_bounds
from addon.errors import bad_request, not_found
from addon.files import FileInput, file_part, image_part
from addon.limits import check_json_schema, json_instruction
from addon.mappings import BOT_NAME, ModelMap
from addon.tools import (
    ToolCallAssembler,
    calls_as_text,
    parse_tool_calls,
    parse_tools,
    result_as_text,
    tool_result,
)

# OpenAI role -> Poe role. Poe has no "assistant" (it says "bot") and no "developer".
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "bot",
    "tool": "tool",
    "function": "tool",
}


DEFAULT_FILE_LIMIT = 50 * 1024 * 1024


@dataclass
class ChatRequest:
    model: str  # as the client named it; echoed back in answers
    bot: str  # the Poe bot that answers
    messages: list[ProtocolMessage]
    files: dict[int, list[FileInput]] = field(default_factory=dict)  # message index -> inputs
    tools: list[ToolDefinition] | None = None
    tool_calls: list[ToolCallDefinition] | None = None  # the latest round, answered by...
    tool_results: list[ToolResultDefinition] | None = None  # ...these results
    parallel_tool_calls: bool = True
    sampling: Sampling = field(default_factory=lambda: Sampling())
    json_mode: bool = False
    json_schema: dict[str, Any] | None = None  # the answer must validate (json_schema mode)

    # Shortcuts used all over.
    @property
    def stream(self) -> bool:
        return self.sampling.stream

    @property
    def stop(self) -> list[str]:
        return self.sampling.stop


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class _Turn:
    role: str
    text: str
    files: list[FileInput] = field(default_factory=list)
    tool_calls: list[ToolCallDefinition] | None = None
    tool_call_id: str = ""
    name: str = ""


def _content(
    content: object, param: str, role: str, file_limit: int
) -> tuple[str, list[FileInput]]:
    """Message content as Poe text plus the pictures and files to upload with it."""
    if content is None:
        if role in ("assistant", "function"):
            return "", []
        raise bad_request(f"{param} is required for a {role} message.", param)
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or an array of content parts.", param)
    texts: list[str] = []
    files: list[FileInput] = []
    for i, part in enumerate(content):
        where = f"{param}[{i}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f"{where} must be an object with a 'type'.", where)
        kind = part["type"]
        if kind in ("text", "input_text", "output_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}.text must be a string.", f"{where}.text")
            texts.append(text)
        elif kind == "refusal":
            texts.append(str(part.get("refusal") or ""))
        elif kind == "image_url":
            files.append(image_part(part, where, file_limit))
        elif kind == "file":
            files.append(file_part(part, where, file_limit))
        else:
            raise bad_request(
                f"{where}: content part type {kind!r} is not supported through Poe.",
                f"{where}.type",
                "unsupported_content",
            )
    return "\n".join(texts), files


def _turns(messages: object, file_limit: int) -> list[_Turn]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array.", "messages")
    turns: list[_Turn] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object.", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(
                f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}.", f"{where}.role"
            )
        text, files = _content(message.get("content"), f"{where}.content", role, file_limit)
        turn = _Turn(role, text, files)
        if role == "assistant" and message.get("tool_calls"):
            turn.tool_calls = parse_tool_calls(message["tool_calls"], f"{where}.tool_calls")
        elif role == "assistant" and isinstance(message.get("function_call"), dict):
            turn.tool_calls = parse_tool_calls(
                [{"id": "", "function": message["function_call"]}], f"{where}.function_call"
            )
        if role in ("tool", "function"):
            turn.tool_call_id = str(message.get("tool_call_id") or "")
            turn.name = str(message.get("name") or "")
        turns.append(turn)
    return turns


def parse_messages(
    messages: object, file_limit: int = DEFAULT_FILE_LIMIT
) -> tuple[
    list[ProtocolMessage],
    dict[int, list[FileInput]],
    list[ToolCallDefinition] | None,
    list[ToolResultDefinition] | None,
]:
    """Poe history, files by message index, and the latest tool round (see tools.py)."""
    turns = _turns(messages, file_limit)
    names = {c.id: c.function.name for t in turns for c in t.tool_calls or []}
    for turn in turns:
        if turn.role in ("tool", "function") and not turn.name:
            turn.name = names.get(turn.tool_call_id, "")

    latest_calls: list[ToolCallDefinition] | None = None
    latest_results: list[ToolResultDefinition] | None = None
    first_result = len(turns)
    while first_result > 0 and turns[first_result - 1].role == "tool":
        first_result -= 1
    if first_result < len(turns) and first_result > 0 and turns[first_result - 1].tool_calls:
        latest_calls = turns[first_result - 1].tool_calls
        latest_results = [tool_result(t.tool_call_id, t.name, t.text) for t in turns[first_result:]]
        turns = turns[: first_result - 1]

    history: list[ProtocolMessage] = []
    files: dict[int, list[FileInput]] = {}
    for turn in turns:
        text = turn.text
        if turn.tool_calls:
            text = calls_as_text(text, turn.tool_calls)
        elif turn.role in ("tool", "function"):
            text = result_as_text(turn.tool_call_id, turn.name, text)
        if turn.files:
            files[len(history)] = turn.files
        history.append(ProtocolMessage(role=ROLES[turn.role], content=text))
    if not history:
        raise bad_request(
            "messages must contain something before the latest tool round.", "messages"
        )
    return history, files, latest_calls, latest_results


MAX_STOP = 4  # OpenAI's bound; each one is looked for in every piece of the answer


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOP:
            raise bad_request(f"stop takes at most {MAX_STOP} sequences.", "stop")
        return list(value)
    raise bad_request("stop must be a string or an array of strings.", "stop")


MAX_CHOICES = 10


def model_name(body: dict[str, Any]) -> str:
    """The ``model`` field as sent (400 if it is not a name at all)."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("model is required: the OpenAI model or Poe bot name.", "model")
    return model


def bot_for(model: str, model_map: ModelMap) -> str:
    """The Poe bot that answers ``model`` (404 if there can be none). Checked after every
    field: a request is judged auth -> body -> fields -> model -> key."""
    bot = model_map.bot_for(model.strip())
    if not BOT_NAME.match(bot):
        raise not_found(
            f"The model `{model}` does not exist: it is neither in the model map nor a "
            "valid Poe bot name.",
            "model_not_found",
        )
    return bot


def parse_model(body: dict[str, Any], model_map: ModelMap) -> tuple[str, str]:
    """(the model name as sent, the Poe bot that answers it)."""
    model = model_name(body)
    return model, bot_for(model, model_map)


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad_request(f"{name} must be a positive integer.", name)
    return value


@dataclass
class Sampling:
    """The request fields chat and legacy completions share."""

    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[str, float] = field(default_factory=dict)
    n: int = 1
    max_tokens: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def parse_sampling(body: dict[str, Any], *limit_names: str) -> Sampling:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean.", "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object.", "stream_options")
        include_usage = options.get("include_usage") is True
    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise bad_request("temperature must be a number between 0 and 2.", "temperature")
    n = _positive_int(body, "n") or 1
    if n > MAX_CHOICES:
        raise bad_request(
            f"n must be at most {MAX_CHOICES}: each choice is a Poe query of its own.", "n"
        )
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and not (
        isinstance(logit_bias, dict) and all(_is_number(v) for v in logit_bias.values())
    ):
        raise bad_request("logit_bias must map token ids to numbers.", "logit_bias")
    limits = [v for v in (_positive_int(body, name) for name in limit_names) if v is not None]
    return Sampling(
        stream=stream,
        include_usage=include_usage,
        temperature=None if temperature is None else float(temperature),
        stop=_stop(body.get("stop")),
        logit_bias={str(k): float(v) for k, v in (logit_bias or {}).items()},
        n=n,
        max_tokens=min(limits) if limits else None,
        parameters=parse_parameters(body.get("poe_parameters")),
    )


def with_instruction(messages: list[ProtocolMessage], instruction: str | None) -> None:
    """Add an instruction to the system prompt (a new one if there is none)."""
    if not instruction:
        return
    if messages and messages[0].role == "system":
        messages[0] = messages[0].model_copy(
            update={"content": f"{messages[0].content}\n\n{instruction}"}
        )
    else:
        messages.insert(0, ProtocolMessage(role="system", content=instruction))


def parse_chat_request(
    body: object, model_map: ModelMap, file_limit: int = DEFAULT_FILE_LIMIT
) -> ChatRequest:
    """Validate an OpenAI chat completion request; OpenAIError(400, param=...) if it is bad."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model = model_name(body)
    messages, files, tool_calls, tool_results = parse_messages(body.get("messages"), file_limit)
    sampling = parse_sampling(body, "max_tokens", "max_completion_tokens")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls must be a boolean.", "parallel_tool_calls")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict)
        or response_format.get("type") not in ("text", "json_object", "json_schema")
    ):
        raise bad_request(
            "response_format must be {'type': 'text' | 'json_object' | 'json_schema'}.",
            "response_format",
        )
    json_schema = _json_schema(response_format)
    tools = parse_tools(body.get("tools"), body.get("tool_choice"))
    bot = bot_for(model, model_map)
    instruction = json_instruction(response_format)
    if instruction:
        shift = 0 if messages and messages[0].role == "system" else 1
        with_instruction(messages, instruction)
        files = {i + shift: f for i, f in files.items()}
    return ChatRequest(
        model=model,
        bot=bot,
        messages=messages,
        files=files,
        tools=tools,
        tool_calls=tool_calls,
        tool_results=tool_results,
        parallel_tool_calls=parallel is not False,
        sampling=sampling,
        json_mode=instruction is not None,
        json_schema=json_schema,
    )


def _json_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """response_format's schema, checked before any key is spent on an answer it would veto."""
    if response_format is None or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema", {}) if isinstance(spec, dict) else {}
    problem = check_json_schema(schema)
    if problem:
        raise bad_request(f"response_format.json_schema.schema {problem}.", "response_format")
    return dict(schema) or None  # {} allows anything: the same as json_object


def parse_parameters(value: object) -> dict[str, Any]:
    """``poe_parameters``: Poe bot parameters (thinking budget, aspect ratio, web search...),
    sent in the client's ``extra_body``; they go on the last user message."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(
            "poe_parameters must be an object of Poe bot parameters.", "poe_parameters"
        )
    check_bounds(value, "poe_parameters")
    return dict(value)


def with_parameters(messages: list[ProtocolMessage], parameters: dict[str, Any]) -> None:
    if not parameters:
        return
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            messages[i] = messages[i].model_copy(
                update={"parameters": {**messages[i].parameters, **parameters}}
            )
            return


def to_query(chat: ChatRequest, new_id: Callable[[], str]) -> QueryRequest:
    """The Poe query for a chat request; ids come from ``new_id`` so this stays pure.
    Attachments are added by the caller once uploaded (see with_attachments)."""
    messages = list(chat.messages)
    with_parameters(messages, chat.sampling.parameters)
    return QueryRequest(
        version="1.2",
        type="query",
        query=messages,
        tools=chat.tools,
        tool_calls=chat.tool_calls,
        tool_results=chat.tool_results,
        user_id=new_id(),
        conversation_id=new_id(),
        message_id=new_id(),
        temperature=chat.sampling.temperature,
        stop_sequences=chat.sampling.stop,
        logit_bias=chat.sampling.logit_bias,
    )


# --- usage ----------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# --- responses ------------------------------------------------------------------------------


def with_attachments(query: QueryRequest, attachments: dict[int, list[Attachment]]) -> QueryRequest:
    if not attachments:
        return query
    messages = list(query.query)
    for index, items in attachments.items():
        messages[index] = messages[index].model_copy(
            update={"attachments": [*messages[index].attachments, *items]}
        )
    return query.model_copy(update={"query": messages})


@dataclass
class Choice:
    """One finished choice of a non-streamed answer."""

    text: str
    finish_reason: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def completion(
    completion_id: str, created: int, model: str, choices: list[Choice], usage_: dict[str, int]
) -> dict[str, Any]:
    out = []
    for index, choice in enumerate(choices):
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        if choice.tool_calls:
            message["tool_calls"] = choice.tool_calls
            message["content"] = choice.text or None
        out.append(
            {
                "index": index,
                "message": message,
                "logprobs": None,
                "finish_reason": choice.finish_reason,
            }
        )
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage_,
    }


@dataclass(frozen=True)
class ChunkFactory:
    """Builds the chunks of one stream: the same id, created and model on every chunk."""

    completion_id: str
    created: int
    model: str
    include_usage: bool = False

    def _chunk(self, choices: list[dict[str, Any]], usage_: Any = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage_
        return chunk

    def delta(
        self, delta: dict[str, Any], finish_reason: str | None = None, index: int = 0
    ) -> dict[str, Any]:
        return self._chunk(
            [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def role(self, index: int = 0) -> dict[str, Any]:
        return self.delta({"role": "assistant", "content": ""}, index=index)

    def content(self, text: str, index: int = 0) -> dict[str, Any]:
        return self.delta({"content": text}, index=index)

    def tool_calls(self, deltas: list[dict[str, Any]], index: int = 0) -> dict[str, Any]:
        return self.delta({"tool_calls": deltas}, index=index)

    def finish(self, reason: str = "stop", index: int = 0) -> dict[str, Any]:
        return self.delta({}, reason, index)

    def usage(self, usage_: dict[str, int]) -> dict[str, Any]:
        return self._chunk([], usage_)


class ChatReply:
    """One answer being assembled: its text (answer.py) and its tool calls (tools.py)."""

    def __init__(self, parallel_tool_calls: bool = True) -> None:
        self.answer = AnswerStream()
        self.tools = ToolCallAssembler(parallel=parallel_tool_calls)

    def feed(
        self,
        kind: str,
        text: str = "",
        attachment: Attachment | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[str, list[dict[str, Any]]]:
        """Text safe to send now and tool-call deltas, for one Poe event."""
        if kind == "text":
            return self.answer.text(text), []
        if kind == "replace":
            return self.answer.replace(text), []
        if kind == "file" and attachment is not None:
            return self.answer.file(attachment), []
        if kind == "data" and data is not None:
            content, deltas = self.tools.feed(data)
            return (self.answer.text(content) if content else ""), deltas
        return "", []  # meta and suggested replies are not part of the answer

    def finish(self) -> str:
        return self.answer.finish()

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tools.merged() else "stop"
