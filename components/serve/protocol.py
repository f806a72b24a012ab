"""The OpenAI chat-completions wire format: requests validated into typed dataclasses, OpenAI-shaped
errors, and the builders of responses, stream chunks, server-sent events and the model list."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

ROLE_ALIASES: dict[str, str] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED_ROLES: tuple[str, ...] = ("tool", "function")
MEDIA_PART_TYPES: tuple[str, ...] = ("image_url", "video_url")
IMAGE_DETAILS: tuple[str, ...] = ("auto", "low", "high")
THINKING_TYPES: tuple[str, ...] = ("enabled", "disabled")
FINISH_REASONS: tuple[str, ...] = ("stop", "length")
MAX_STOP_STRINGS = 4
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SSE_DONE: bytes = b"data: [DONE]\n\n"


class ApiError(Exception):
    """A request the endpoint refuses, carried to the client as an OpenAI error body with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, as OpenAI's API answers errors."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    url: str
    param: str  # the JSON path of the part's image_url, e.g. "messages[1].content[2].image_url"


@dataclass(frozen=True)
class VideoPart:
    url: str
    param: str  # the JSON path of the part's video_url


ContentPart = TextPart | ImagePart | VideoPart


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant (a request's "developer" role arrives as system)
    parts: tuple[ContentPart, ...]


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request: everything the model replica needs, defaults filled in."""

    model: str
    messages: tuple[ChatMessage, ...]
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    thinking: bool


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------

def _invalid(param: str | None, code: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value)


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _show(value: object, limit: int = 60) -> str:
    """A short JSON rendering of a value for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------------
# Request parsing
# ---------------------------------------------------------------------------------------------------

def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> object:
    """The parsed JSON of a request body; ApiError 400 (code invalid_json) when it is not UTF-8 JSON."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not valid UTF-8 ({err.reason} at byte {err.start}); send a JSON "
                            "object encoded as UTF-8", code="invalid_json") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"request body is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                            "send a JSON object", code="invalid_json") from None
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"request body is not valid JSON ({err}); send a JSON object without NaN/Infinity "
                            "and without extreme nesting", code="invalid_json") from None


def parse_chat_request(body: object, *, served_model: str, default_max_tokens: int, max_tokens_limit: int,
                       default_thinking: bool) -> ChatRequest:
    """A parsed `POST /v1/chat/completions` body as a ChatRequest; ApiError 400 naming the first field
    that is wrong (its JSON path in `param`) and what it accepts. Unknown top-level fields are ignored."""
    if not isinstance(body, dict):
        raise _invalid(None, "invalid_request", f"the request body must be a JSON object (a chat completion "
                                                f"request with model and messages), got {_json_type(body)}")
    model = _parse_model(body, served_model)
    messages = _parse_messages(body.get("messages"))
    _refuse_unsupported_features(body)
    stream = _parse_stream(body)
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=_parse_stream_options(body, stream),
        max_tokens=_parse_max_tokens(body, default_max_tokens, max_tokens_limit),
        temperature=_parse_temperature(body),
        top_p=_parse_top_p(body),
        stop=_parse_stop(body),
        seed=_parse_seed(body),
        thinking=_parse_thinking(body, default_thinking),
    )


def _parse_model(body: dict[str, Any], served_model: str) -> str:
    value = body.get("model")
    if not isinstance(value, str) or not value:
        raise _invalid("model", "invalid_model", f"model is required: a string naming the served model "
                                                 f"{served_model!r}, got {_show(value)}")
    if value != served_model:
        raise _invalid("model", "model_not_found", f"model {_show(value)} is not served here; this endpoint "
                                                   f"serves {served_model!r} (GET /v1/models lists it)")
    return value


def _parse_messages(value: object) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise _invalid("messages", "invalid_messages", "messages is required: a non-empty array of "
                                                       f"{{role, content}} objects, got {_show(value)}")
    messages = tuple(_parse_message(message, f"messages[{i}]") for i, message in enumerate(value))
    _check_message_order(messages)
    return messages


def _check_message_order(messages: tuple[ChatMessage, ...]) -> None:
    """System messages only before the first user message; the conversation ends with a user message."""
    seen_user = False
    for i, message in enumerate(messages):
        if message.role == "user":
            seen_user = True
        elif message.role == "system" and seen_user:
            raise _invalid(f"messages[{i}].role", "misplaced_system_message",
                           f"messages[{i}] is a system message after a user message; system (and developer) "
                           "messages are accepted only before the first user message")
    last = len(messages) - 1
    if messages[last].role != "user":
        raise _invalid(f"messages[{last}].role", "last_message_not_user",
                       f"the last message must be from the user (the model answers it), got role "
                       f"{messages[last].role!r}")


def _parse_message(message: object, path: str) -> ChatMessage:
    if not isinstance(message, dict):
        raise _invalid(path, "invalid_message", f"{path} must be an object with role and content, got "
                                                f"{_json_type(message)}")
    role = message.get("role")
    if role in UNSUPPORTED_ROLES:
        raise _invalid(f"{path}.role", "unsupported_role", f"{path} has role {role!r}: tool and function "
                                                           "messages are not supported (no tool calling); use "
                                                           "system, developer, user or assistant")
    if not isinstance(role, str) or role not in ROLE_ALIASES:
        raise _invalid(f"{path}.role", "invalid_role", f"{path}.role must be one of system, developer, user, "
                                                       f"assistant, got {_show(role)}")
    for key in ("tool_calls", "function_call"):
        if message.get(key):
            raise _invalid(f"{path}.{key}", "unsupported_tools",
                           f"{path}.{key} is not supported: this model does not call tools")
    canonical = ROLE_ALIASES[role]
    return ChatMessage(role=canonical, parts=_parse_content(message.get("content"), canonical, f"{path}.content"))


def _parse_content(content: object, role: str, path: str) -> tuple[ContentPart, ...]:
    if isinstance(content, str):
        return (TextPart(content),)
    if content is None:
        hint = " (assistant tool calls are not supported)" if role == "assistant" else ""
        raise _invalid(path, "invalid_content", f"{path} is required: a string or a non-empty array of content "
                                                f"parts{hint}")
    if not isinstance(content, list) or not content:
        raise _invalid(path, "invalid_content", f"{path} must be a string or a non-empty array of content parts, "
                                                f"got {_show(content)}")
    return tuple(_parse_part(part, role, f"{path}[{j}]") for j, part in enumerate(content))


def _parse_part(part: object, role: str, path: str) -> ContentPart:
    if not isinstance(part, dict):
        raise _invalid(path, "invalid_content_part", f"{path} must be an object with a type, got "
                                                     f"{_json_type(part)}")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise _invalid(f"{path}.text", "invalid_content_part", f"{path}.text must be a string, got "
                                                                   f"{_show(text)}")
        return TextPart(text)
    if kind in MEDIA_PART_TYPES:
        if role != "user":
            raise _invalid(path, "media_not_allowed", f"{path} is a {kind} part in a {role} message; images and "
                                                      "videos are accepted only in user messages")
        url = _media_url(part.get(kind), f"{path}.{kind}", kind)
        return ImagePart(url, f"{path}.{kind}") if kind == "image_url" else VideoPart(url, f"{path}.{kind}")
    raise _invalid(f"{path}.type", "unsupported_content_part", f"{path}.type {_show(kind)} is not supported; "
                                                               "use text, image_url or video_url")


def _media_url(value: object, path: str, kind: str) -> str:
    """The url of an image_url/video_url value: a string, or an object with `url` (and, for images, an
    optional `detail`, accepted and not used)."""
    code = f"invalid_{kind}"
    if isinstance(value, str):
        url, url_path = value, path
    elif isinstance(value, dict):
        url, url_path = value.get("url"), f"{path}.url"
        detail = value.get("detail")
        if kind == "image_url" and detail is not None and detail not in IMAGE_DETAILS:
            raise _invalid(f"{path}.detail", "invalid_image_detail", f"{path}.detail must be one of "
                                                                     f"{', '.join(IMAGE_DETAILS)}, got {_show(detail)}")
    else:
        raise _invalid(path, code, f"{path} must be an object {{\"url\": ...}} or a URL string, got "
                                   f"{_json_type(value)}")
    if not isinstance(url, str) or not url.strip():
        raise _invalid(url_path, code, f"{url_path} must be a non-empty URL (a data: URL with base64 content, or "
                                       f"an http(s) URL), got {_show(url)}")
    return url


def _refuse_unsupported_features(body: dict[str, Any]) -> None:
    """OpenAI features this endpoint does not have: several choices, tools, log-probs, JSON modes."""
    n = body.get("n")
    if n is not None and not (_is_int(n) and n == 1):
        raise _invalid("n", "unsupported_n", f"n must be 1 (one choice per request), got {_show(n)}")
    for key in ("tools", "functions"):
        if body.get(key):
            raise _invalid(key, "unsupported_tools", f"{key} is not supported: this model does not call tools; "
                                                     "leave it out or send an empty array")
    for key in ("tool_choice", "function_call"):
        value = body.get(key)
        if value and value != "none":
            raise _invalid(key, "unsupported_tools", f"{key} {_show(value)} is not supported: this model does not "
                                                     "call tools; leave it out or send \"none\"")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:
        raise _invalid("logprobs", "unsupported_logprobs", "logprobs are not supported; leave logprobs out or "
                                                           "send false")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and not (_is_int(top_logprobs) and top_logprobs == 0):
        raise _invalid("top_logprobs", "unsupported_logprobs", "top_logprobs is not supported; leave it out")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _invalid("response_format", "unsupported_response_format",
                       f"response_format {_show(response_format)} is not supported; only {{\"type\": \"text\"}} "
                       "(the default) is")


def _parse_stream(body: dict[str, Any]) -> bool:
    value = body.get("stream")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid("stream", "invalid_stream", f"stream must be true or false, got {_show(value)}")
    return value


def _parse_stream_options(body: dict[str, Any], stream: bool) -> bool:
    """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
    value = body.get("stream_options")
    if value is None:
        return False
    if not stream:
        raise _invalid("stream_options", "invalid_stream_options", "stream_options is only allowed when stream "
                                                                   "is true")
    if not isinstance(value, dict):
        raise _invalid("stream_options", "invalid_stream_options", "stream_options must be an object "
                                                                   f"{{\"include_usage\": bool}}, got {_show(value)}")
    include_usage = value.get("include_usage")
    if include_usage is None:
        return False
    if not isinstance(include_usage, bool):
        raise _invalid("stream_options.include_usage", "invalid_stream_options",
                       f"stream_options.include_usage must be true or false, got {_show(include_usage)}")
    return include_usage


def _parse_max_tokens(body: dict[str, Any], default: int, limit: int) -> int:
    """max_completion_tokens, else max_tokens, else the default."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        return default
    if not _is_int(value) or not 1 <= value <= limit:
        raise _invalid(key, "invalid_max_tokens", f"{key} must be an integer in [1, {limit}], got {_show(value)}")
    return value


def _parse_temperature(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return 1.0
    if not _is_number(value) or not 0 <= value <= 2:
        raise _invalid("temperature", "invalid_temperature", f"temperature must be a number in [0, 2], got "
                                                             f"{_show(value)}")
    return float(value)


def _parse_top_p(body: dict[str, Any]) -> float:
    value = body.get("top_p")
    if value is None:
        return 1.0
    if not _is_number(value) or not 0 < value <= 1:
        raise _invalid("top_p", "invalid_top_p", f"top_p must be a number in (0, 1], got {_show(value)}")
    return float(value)


def _parse_seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not _is_int(value) or not INT64_MIN <= value <= INT64_MAX:
        raise _invalid("seed", "invalid_seed", f"seed must be a 64-bit integer or null, got {_show(value)}")
    return value


def _parse_stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
        paths = ["stop"]
    elif isinstance(value, list) and len(value) <= MAX_STOP_STRINGS:
        paths = [f"stop[{i}]" for i in range(len(value))]
    else:
        raise _invalid("stop", "invalid_stop", f"stop must be null, a string or an array of at most "
                                               f"{MAX_STOP_STRINGS} non-empty strings, got {_show(value)}")
    for stop, path in zip(value, paths):
        if not isinstance(stop, str) or not stop:
            raise _invalid(path, "invalid_stop", f"{path} must be a non-empty string, got {_show(stop)}")
    return tuple(value)


def _parse_thinking(body: dict[str, Any], default: bool) -> bool:
    value = body.get("thinking")
    if value is None:
        return default
    if not isinstance(value, dict) or set(value) != {"type"} or value["type"] not in THINKING_TYPES:
        raise _invalid("thinking", "invalid_thinking", "thinking must be null, {\"type\": \"enabled\"} or "
                                                       f"{{\"type\": \"disabled\"}}, got {_show(value)}")
    return value["type"] == "enabled"


# ---------------------------------------------------------------------------------------------------
# Response builders
# ---------------------------------------------------------------------------------------------------

def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _check_finish_reason(finish_reason: str | None, allow_none: bool) -> None:
    if finish_reason is None and allow_none:
        return
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")


def completion_response(*, request_id: str, model: str, created: int, content: str, reasoning: str | None,
                        finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A non-streaming `chat.completion` with one choice; the reasoning text rides as `reasoning_content`."""
    _check_finish_reason(finish_reason, allow_none=False)
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(*, request_id: str, model: str, created: int, delta: dict[str, Any],
                     finish_reason: str | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk` of a stream: a delta (role, content or reasoning_content) of choice 0."""
    _check_finish_reason(finish_reason, allow_none=True)
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(*, request_id: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the request's usage."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying `payload` as compact UTF-8 JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def models_response(model_ids: list[str], created: int, owned_by: str = "openseedvl") -> dict[str, Any]:
    """The `GET /v1/models` body."""
    return {"object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
                     for model_id in model_ids]}


def new_request_id() -> str:
    """A fresh completion id, `chatcmpl-` and 32 hex digits."""
    return "chatcmpl-" + uuid.uuid4().hex
