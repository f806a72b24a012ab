"""Tests of the OpenAI wire format (components/serve/protocol.py): request validation (defaults, every
accepted form, every refusal with its param and code), the response/chunk/SSE/model-list builders,
and that the installed `openai` client parses what we build and its requests pass our validation."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from components.serve.protocol import (
    SSE_DONE,
    ApiError,
    ChatMessage,
    ChatRequest,
    ImagePart,
    TextPart,
    VideoPart,
    completion_chunk,
    completion_response,
    models_response,
    new_request_id,
    parse_chat_request,
    parse_json_body,
    sse_event,
    usage_chunk,
)

MODEL = "seedvl"
DATA_URL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
            "AAAABJRU5ErkJggg==")
LIMITS: dict[str, Any] = {"served_model": MODEL, "default_max_tokens": 64, "max_tokens_limit": 512,
                          "default_thinking": False}
_ABSENT = object()


def _parse(**fields: Any) -> ChatRequest:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat_request(body, **LIMITS)


def _refusal(body: object) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_chat_request(body, **LIMITS)
    error = caught.value
    assert error.status == 400 and error.type == "invalid_request_error" and error.message
    return error


def _refused(**fields: Any) -> tuple[str | None, str | None]:
    """(param, code) of the refusal of a minimal request with `fields` (an _ABSENT value removes the key)."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    error = _refusal({key: value for key, value in body.items() if value is not _ABSENT})
    return error.param, error.code


# ---------------------------------------------------------------------------------------------------
# Valid requests
# ---------------------------------------------------------------------------------------------------

def test_minimal_request_gets_the_defaults() -> None:
    assert _parse() == ChatRequest(model=MODEL, messages=(ChatMessage("user", (TextPart("hi"),)),), stream=False,
                                   include_usage=False, max_tokens=64, temperature=1.0, top_p=1.0, stop=(),
                                   seed=None, thinking=False)


def test_every_field_set() -> None:
    request = _parse(stream=True, stream_options={"include_usage": True}, max_tokens=100, temperature=0,
                     top_p=0.5, stop=["\n\n", "END"], seed=7, thinking={"type": "enabled"}, n=1)
    assert (request.stream, request.include_usage, request.max_tokens, request.temperature, request.top_p,
            request.stop, request.seed, request.thinking) == (True, True, 100, 0.0, 0.5, ("\n\n", "END"), 7, True)
    assert isinstance(request.temperature, float)


def test_nulls_mean_defaults() -> None:
    request = _parse(stream=None, stream_options=None, max_tokens=None, temperature=None, top_p=None, stop=None,
                     seed=None, thinking=None, n=None, tools=None, tool_choice=None, logprobs=None,
                     response_format=None)
    assert request == _parse()


def test_multimodal_user_message_with_data_url_string_form_and_video() -> None:
    content = [{"type": "text", "text": "Compare"},
               {"type": "image_url", "image_url": {"url": DATA_URL, "detail": "high"}},
               {"type": "image_url", "image_url": "https://images.example.org/a.jpg"},
               {"type": "video_url", "video_url": {"url": "file:///videos/clip.mp4"}},
               {"type": "video_url", "video_url": "https://videos.example.org/b.mp4"}]
    request = _parse(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}])
    assert request.messages[1].parts == (
        TextPart("Compare"),
        ImagePart(DATA_URL, "messages[1].content[1].image_url"),
        ImagePart("https://images.example.org/a.jpg", "messages[1].content[2].image_url"),
        VideoPart("file:///videos/clip.mp4", "messages[1].content[3].video_url"),
        VideoPart("https://videos.example.org/b.mp4", "messages[1].content[4].video_url"),
    )


def test_developer_role_is_system_and_conversation_is_kept() -> None:
    messages = [{"role": "developer", "content": "Answer in French."},
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Bonjour"}]},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "user", "content": "And 3+3?", "name": "bob"}]
    request = _parse(messages=messages)
    assert [m.role for m in request.messages] == ["system", "system", "user", "assistant", "user", "user"]
    assert request.messages[3].parts == (TextPart("Bonjour"),)


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert _parse(max_tokens=10, max_completion_tokens=20).max_tokens == 20
    assert _parse(max_completion_tokens=30).max_tokens == 30
    assert _parse(max_tokens=10, max_completion_tokens=None).max_tokens == 10
    assert _parse(max_tokens=512).max_tokens == 512


def test_stop_as_a_string_and_default_thinking() -> None:
    assert _parse(stop="###").stop == ("###",)
    assert _parse(stop=[]).stop == ()
    assert parse_chat_request({"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                              **{**LIMITS, "default_thinking": True}).thinking is True
    assert _parse(thinking={"type": "disabled"}).thinking is False


def test_unknown_and_harmless_fields_are_ignored() -> None:
    request = _parse(presence_penalty=0.5, frequency_penalty=0, user="u-1", metadata={"a": "b"}, tools=[],
                     tool_choice="none", logprobs=False, response_format={"type": "text"}, parallel_tool_calls=False,
                     stream=True, stream_options={"include_usage": False, "include_obfuscation": False})
    assert request.stream and not request.include_usage


# ---------------------------------------------------------------------------------------------------
# Refusals: each with the offending field's path and a specific code
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [[], "x", None, 3])
def test_body_must_be_an_object(body: object) -> None:
    error = _refusal(body)
    assert (error.param, error.code) == (None, "invalid_request")


def test_model_must_be_the_served_one() -> None:
    assert _refused(model=_ABSENT) == ("model", "invalid_model")
    assert _refused(model=3) == ("model", "invalid_model")
    error = _refusal({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert (error.param, error.code) == ("model", "model_not_found") and MODEL in error.message


@pytest.mark.parametrize(("messages", "param", "code"), [
    (_ABSENT, "messages", "invalid_messages"),
    ([], "messages", "invalid_messages"),
    ({"role": "user"}, "messages", "invalid_messages"),
    (["hi"], "messages[0]", "invalid_message"),
    ([{"content": "hi"}], "messages[0].role", "invalid_role"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role", "invalid_role"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "t"}],
     "messages[1].role", "unsupported_role"),
    ([{"role": "function", "name": "f", "content": "42"}], "messages[0].role", "unsupported_role"),
    ([{"role": "user"}], "messages[0].content", "invalid_content"),
    ([{"role": "user", "content": None}], "messages[0].content", "invalid_content"),
    ([{"role": "user", "content": []}], "messages[0].content", "invalid_content"),
    ([{"role": "user", "content": 5}], "messages[0].content", "invalid_content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "x"}],
     "messages[1].content", "invalid_content"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
      {"role": "user", "content": "x"}], "messages[1].tool_calls", "unsupported_tools"),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]", "invalid_content_part"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text",
     "invalid_content_part"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "messages[0].content[0].type",
     "unsupported_content_part"),
    ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content[0].type", "unsupported_content_part"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}]},
      {"role": "user", "content": "hi"}], "messages[0].content[0]", "media_not_allowed"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": [{"type": "video_url", "video_url": "https://v.example.org/a.mp4"}]},
      {"role": "user", "content": "x"}], "messages[1].content[0]", "media_not_allowed"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}],
     "messages[0].content[0].image_url.url", "invalid_image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     "messages[0].content[0].image_url.url", "invalid_image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "  "}]}],
     "messages[0].content[0].image_url", "invalid_image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": 7}]}],
     "messages[0].content[0].image_url", "invalid_image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL, "detail": "max"}}]}],
     "messages[0].content[0].image_url.detail", "invalid_image_detail"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": ""}}]}],
     "messages[0].content[0].video_url.url", "invalid_video_url"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     "messages[1].role", "last_message_not_user"),
    ([{"role": "system", "content": "sys"}], "messages[0].role", "last_message_not_user"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}, {"role": "user", "content": "x"}],
     "messages[1].role", "misplaced_system_message"),
    ([{"role": "user", "content": "hi"}, {"role": "developer", "content": "late"}, {"role": "user", "content": "x"}],
     "messages[1].role", "misplaced_system_message"),
])
def test_bad_messages(messages: object, param: str, code: str) -> None:
    assert _refused(messages=messages) == (param, code)


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"max_tokens": 0}, "max_tokens", "invalid_max_tokens"),
    ({"max_tokens": 513}, "max_tokens", "invalid_max_tokens"),
    ({"max_tokens": True}, "max_tokens", "invalid_max_tokens"),
    ({"max_tokens": 10.0}, "max_tokens", "invalid_max_tokens"),
    ({"max_tokens": "10"}, "max_tokens", "invalid_max_tokens"),
    ({"max_tokens": 10, "max_completion_tokens": 0}, "max_completion_tokens", "invalid_max_tokens"),
    ({"temperature": -0.1}, "temperature", "invalid_temperature"),
    ({"temperature": 2.5}, "temperature", "invalid_temperature"),
    ({"temperature": "hot"}, "temperature", "invalid_temperature"),
    ({"temperature": True}, "temperature", "invalid_temperature"),
    ({"temperature": float("nan")}, "temperature", "invalid_temperature"),
    ({"top_p": 0}, "top_p", "invalid_top_p"),
    ({"top_p": 1.01}, "top_p", "invalid_top_p"),
    ({"seed": 1.5}, "seed", "invalid_seed"),
    ({"seed": "7"}, "seed", "invalid_seed"),
    ({"seed": 2**64}, "seed", "invalid_seed"),
    ({"stop": ""}, "stop", "invalid_stop"),
    ({"stop": 3}, "stop", "invalid_stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_stop"),
    ({"stop": ["a", ""]}, "stop[1]", "invalid_stop"),
    ({"stop": ["a", 1]}, "stop[1]", "invalid_stop"),
    ({"stream": "yes"}, "stream", "invalid_stream"),
    ({"stream": 1}, "stream", "invalid_stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options", "invalid_stream_options"),
    ({"stream": True, "stream_options": True}, "stream_options", "invalid_stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
     "invalid_stream_options"),
    ({"n": 2}, "n", "unsupported_n"),
    ({"n": True}, "n", "unsupported_n"),
    ({"n": 0}, "n", "unsupported_n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_tools"),
    ({"tool_choice": "auto"}, "tool_choice", "unsupported_tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "unsupported_tools"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_tools"),
    ({"function_call": "auto"}, "function_call", "unsupported_tools"),
    ({"logprobs": True}, "logprobs", "unsupported_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs", "unsupported_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "unsupported_response_format"),
    ({"thinking": True}, "thinking", "invalid_thinking"),
    ({"thinking": {"type": "auto"}}, "thinking", "invalid_thinking"),
    ({"thinking": {}}, "thinking", "invalid_thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "thinking", "invalid_thinking"),
])
def test_bad_sampling_and_feature_fields(fields: dict[str, Any], param: str, code: str) -> None:
    assert _refused(**fields) == (param, code)


def test_messages_say_what_is_accepted() -> None:
    error = _refusal({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9999})
    assert "[1, 512]" in error.message and "9999" in error.message
    error = _refusal({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]})
    assert "system, developer, user or assistant" in error.message


def test_error_body_has_exactly_the_openai_keys() -> None:
    body = ApiError(400, "bad top_p", param="top_p", code="invalid_top_p").body()
    assert body == {"error": {"message": "bad top_p", "type": "invalid_request_error", "param": "top_p",
                              "code": "invalid_top_p"}}
    assert ApiError(503, "busy", type="server_error").body()["error"] == {
        "message": "busy", "type": "server_error", "param": None, "code": None}


# ---------------------------------------------------------------------------------------------------
# parse_json_body
# ---------------------------------------------------------------------------------------------------

def test_json_body_parses() -> None:
    assert parse_json_body('{"a": "中"}'.encode()) == {"a": "中"}
    assert parse_json_body(b"[1, 2]") == [1, 2]  # any JSON; parse_chat_request refuses non-objects


@pytest.mark.parametrize("raw", [b"", b"{", b"{'a': 1}", b"\xff\xfe{}", b'{"a": NaN}', b'{"t": Infinity}',
                                 b"[" * 100_000 + b"]" * 100_000])
def test_bad_json_body_is_invalid_json(raw: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        parse_json_body(raw)
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")


# ---------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------

def _completion(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"request_id": "chatcmpl-1", "model": MODEL, "created": 1700000000,
                              "content": "The answer is <box>[1, 2, 3, 4]</box>.", "reasoning": "Look left.",
                              "finish_reason": "stop", "prompt_tokens": 11, "completion_tokens": 7}
    return completion_response(**{**fields, **overrides})


def test_completion_response_shape() -> None:
    assert _completion() == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": "The answer is <box>[1, 2, 3, 4]</box>.",
                                 "reasoning_content": "Look left."}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }
    assert _completion(reasoning=None, finish_reason="length")["choices"][0]["message"]["reasoning_content"] is None


def test_chunk_and_usage_chunk_shapes() -> None:
    chunk = completion_chunk(request_id="chatcmpl-1", model=MODEL, created=5, delta={"content": "Hi"})
    assert chunk == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": MODEL,
                     "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None, "logprobs": None}]}
    last = completion_chunk(request_id="chatcmpl-1", model=MODEL, created=5, delta={}, finish_reason="length")
    assert last["choices"][0]["finish_reason"] == "length"
    usage = usage_chunk(request_id="chatcmpl-1", model=MODEL, created=5, prompt_tokens=3, completion_tokens=4)
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                                         "total_tokens": 7}
    assert usage["object"] == "chat.completion.chunk"


def test_unknown_finish_reason_is_a_bug() -> None:
    with pytest.raises(ValueError, match="finish_reason"):
        _completion(finish_reason="tool_calls")
    with pytest.raises(ValueError, match="finish_reason"):
        completion_chunk(request_id="x", model=MODEL, created=1, delta={}, finish_reason="eos")


def test_sse_event_is_one_compact_utf8_data_line() -> None:
    event = sse_event({"a": "中\nb", "n": [1, 2]})
    assert event == 'data: {"a":"中\\nb","n":[1,2]}\n\n'.encode()
    assert event.count(b"\n") == 2
    assert json.loads(event[len(b"data: "):]) == {"a": "中\nb", "n": [1, 2]}
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_models_response_and_request_ids() -> None:
    assert models_response([MODEL], created=9) == {
        "object": "list", "data": [{"id": MODEL, "object": "model", "created": 9, "owned_by": "openseedvl"}]}
    first, second = new_request_id(), new_request_id()
    assert first.startswith("chatcmpl-") and len(first) == len("chatcmpl-") + 32 and first != second


# ---------------------------------------------------------------------------------------------------
# The installed openai package reads what we build
# ---------------------------------------------------------------------------------------------------

def test_openai_types_parse_completion_with_reasoning_content() -> None:
    parsed = ChatCompletion.model_validate(_completion())
    message = parsed.choices[0].message
    assert message.content == "The answer is <box>[1, 2, 3, 4]</box>." and message.role == "assistant"
    assert message.reasoning_content == "Look left."  # type: ignore[attr-defined]
    assert (message.model_extra or {})["reasoning_content"] == "Look left."
    assert parsed.usage is not None and parsed.usage.total_tokens == 18
    assert parsed.choices[0].finish_reason == "stop"


def test_openai_types_parse_chunks() -> None:
    chunk = ChatCompletionChunk.model_validate(completion_chunk(
        request_id="chatcmpl-1", model=MODEL, created=5, delta={"role": "assistant", "reasoning_content": "hm"}))
    assert chunk.choices[0].delta.role == "assistant"
    assert (chunk.choices[0].delta.model_extra or {})["reasoning_content"] == "hm"
    usage = ChatCompletionChunk.model_validate(usage_chunk(request_id="chatcmpl-1", model=MODEL, created=5,
                                                           prompt_tokens=3, completion_tokens=4))
    assert usage.choices == [] and usage.usage is not None and usage.usage.total_tokens == 7
    assert Model.model_validate(models_response([MODEL], created=9)["data"][0]).id == MODEL


class _FakeEndpoint:
    """A stand-in server for the real openai client: our parsing and builders over an httpx2 mock."""

    def __init__(self) -> None:
        self.requests: list[ChatRequest] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/v1/models":
            return httpx2.Response(200, json=models_response([MODEL], created=9))
        try:
            chat = parse_chat_request(parse_json_body(request.content), **LIMITS)
        except ApiError as error:
            return httpx2.Response(error.status, json=error.body())
        self.requests.append(chat)
        if not chat.stream:
            return httpx2.Response(200, json=_completion())
        return httpx2.Response(200, content=self._stream(chat), headers={"content-type": "text/event-stream"})

    @staticmethod
    def _stream(chat: ChatRequest) -> bytes:
        ids = {"request_id": "chatcmpl-2", "model": MODEL, "created": 5}
        deltas = [{"role": "assistant", "content": ""}, {"reasoning_content": "Look"}, {"content": "Hel"},
                  {"content": "lo 中"}]
        events = [sse_event(completion_chunk(**ids, delta=delta)) for delta in deltas]
        events.append(sse_event(completion_chunk(**ids, delta={}, finish_reason="stop")))
        if chat.include_usage:
            events.append(sse_event(usage_chunk(**ids, prompt_tokens=3, completion_tokens=4)))
        return b"".join(events) + SSE_DONE


@pytest.fixture()
def fake() -> tuple[openai.OpenAI, _FakeEndpoint]:
    endpoint = _FakeEndpoint()
    client = openai.OpenAI(api_key="unused", base_url="http://serve.test/v1", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(endpoint)))
    return client, endpoint


def test_openai_client_round_trip(fake: tuple[openai.OpenAI, _FakeEndpoint]) -> None:
    client, endpoint = fake
    assert [model.id for model in client.models.list()] == [MODEL]
    response = client.chat.completions.create(
        model=MODEL, max_completion_tokens=32, temperature=0.2, stop=["END"], seed=3,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "What is here?"},
                                               {"type": "image_url", "image_url": {"url": DATA_URL}}]}],
        extra_body={"thinking": {"type": "enabled"}})
    assert response.choices[0].message.model_extra == {"reasoning_content": "Look left."}
    request = endpoint.requests[0]
    assert (request.max_tokens, request.temperature, request.stop, request.seed, request.thinking) == (
        32, 0.2, ("END",), 3, True)
    assert request.messages[1].parts[1] == ImagePart(DATA_URL, "messages[1].content[1].image_url")


def test_openai_client_streams_our_events(fake: tuple[openai.OpenAI, _FakeEndpoint]) -> None:
    client, _ = fake
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content", "")
                        for c in chunks if c.choices)
    assert (content, reasoning) == ("Hello 中", "Look")
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7


def test_openai_client_raises_our_errors(fake: tuple[openai.OpenAI, _FakeEndpoint]) -> None:
    client, _ = fake
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert (caught.value.status_code, caught.value.code, caught.value.param) == (400, "unsupported_n", "n")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
