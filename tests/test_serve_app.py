"""The chat endpoint for real: a tiny random-weight VLM export deployed on Ray Serve (local Ray, HTTP proxy
on 127.0.0.1), called with the unchanged `openai` client (plain and streamed, images, video frames and a
video file, thinking on and off), every kind of bad request answered with its OpenAI-shaped 4xx while the
server keeps serving, an API-key-protected second app, and the model deployment through its handle."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from test_pipeline_e2e import free_port
from vlm_exports import THINK_ANSWER, THINK_QUESTION, THINK_REASONING, write_random_export, write_two_mode_export

pytestmark = pytest.mark.e2e
MODEL = "seedvl-test"
KEY_ENV = "SEEDVL_TEST_SERVE_KEY"
KEY = "test-key-123"


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def picture(color: tuple[int, int, int], size: tuple[int, int] = (84, 56)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], 255 - color[1], 255 - color[2]), (10, 10, 40, 40))
    return image


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    from components.schema import load_config
    from components.serve.deploy import deploy

    folder = write_random_export(tmp_path_factory.mktemp("serve") / "model")
    port = free_port()
    overrides = [f"serve.port={port}", f"serve.model_name={MODEL}", "serve.max_request_bytes=300000",
                 "serve.max_pending_requests=3", "serve.batching.max_batch_size=4",
                 "serve.batching.batch_wait_timeout_s=0.05", "serve.resources.num_cpus=0.5",
                 "serve.health_check_period_s=2"]
    config, _ = load_config("tiny", [], overrides)
    monkeypatch_module.setenv(KEY_ENV, KEY)
    keyed, _ = load_config("tiny", [], [*overrides, "serve.app_name=keyed", "serve.route_prefix=/keyed",
                                        f"serve.api_key_env={KEY_ENV}"])
    trained, _ = load_config("tiny", [], [*overrides, "serve.app_name=sft", "serve.route_prefix=/sft"])
    sft_folder = write_two_mode_export(tmp_path_factory.mktemp("serve_sft") / "model")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        url = deploy(folder, config.serve, MODEL)
        keyed_url = deploy(folder, keyed.serve, MODEL)
        sft_url = deploy(sft_folder, trained.serve, MODEL)
        yield {"url": url, "keyed_url": keyed_url, "sft_url": sft_url, "folder": folder, "config": config.serve}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="module")
def client(server: dict[str, Any]) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0, timeout=120)


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def chat_body(**fields: Any) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Describe the image."}], "max_tokens": 4,
            "temperature": 0} | fields
    return json.dumps(body).encode()


def assert_still_serving(client: Any) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=2, temperature=0)
    assert answer.usage.completion_tokens >= 1


def image_message(text: str, *images: Image.Image) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_models_and_health(server: dict[str, Any], client: Any) -> None:
    assert [model.id for model in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(f"{server['url']}/health", timeout=30) as response:
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"


def test_plain_and_streamed_answers_agree_with_an_image(client: Any) -> None:
    messages = image_message("What is shown in this picture?", picture((200, 30, 30)))
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens > 16  # the image's tokens are counted
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content
    assert finishes == [choice.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_video_as_timestamped_frames_and_as_a_file(client: Any) -> None:
    from components.data.synthesis.avi_writer import encode_mjpeg_avi

    frames = [picture((40 * i, 100, 200 - 40 * i)) for i in range(4)]
    parts: list[dict[str, Any]] = []
    for second, frame in enumerate(frames):
        parts += [{"type": "text", "text": f"[{float(second):.1f} second]"},
                  {"type": "image_url", "image_url": {"url": data_url(frame, "JPEG")}}]
    as_frames = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "Describe the video."}]}])
    one_image = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0,
                                               messages=image_message("Describe the video.", frames[0]))
    assert as_frames.usage.prompt_tokens > 3 * one_image.usage.prompt_tokens // 2
    clip = encode_mjpeg_avi([picture((10 * i, 80, 120)) for i in range(12)], fps=2.0)
    video_url = "data:video/x-msvideo;base64," + base64.b64encode(clip).decode()
    as_file = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                               {"type": "text", "text": "Describe the video."}]}])
    assert as_file.usage.prompt_tokens > one_image.usage.prompt_tokens
    assert as_file.choices[0].finish_reason in ("stop", "length")


def test_thinking_switch(client: Any) -> None:
    messages = [{"role": "user", "content": "How many circles are there?"}]
    off = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"thinking": {"type": "disabled"}})
    on = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                        extra_body={"thinking": {"type": "enabled"}})
    assert on.usage.prompt_tokens > off.usage.prompt_tokens + 10  # the thinking system prompt
    reasoning = getattr(on.choices[0].message, "reasoning_content", None)
    assert reasoning is not None  # present in thinking mode (possibly empty when the model skips <think>)
    assert getattr(off.choices[0].message, "reasoning_content", None) in (None, "")
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
                                            extra_body={"thinking": {"type": "enabled"}})
    streamed_reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in stream
                                 if c.choices)
    assert streamed_reasoning == reasoning


def test_thinking_is_trained_behaviour_streamed_reasoning_then_content(server: dict[str, Any]) -> None:
    """An export trained in both modes (as the SFT steps export): thinking on streams the model's own reasoning
    as `reasoning_content` deltas, then the answer as `content`; thinking off answers directly."""
    import openai

    sft = openai.OpenAI(base_url=f"{server['sft_url']}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": THINK_QUESTION}]
    stream = sft.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0, stream=True,
                                         extra_body={"thinking": {"type": "enabled"}})
    kinds, reasoning, content = [], "", ""
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if getattr(delta, "reasoning_content", None):
            kinds.append("reasoning")
            reasoning += delta.reasoning_content
        if delta.content:
            kinds.append("content")
            content += delta.content
    assert reasoning.strip() == THINK_REASONING and content.strip() == THINK_ANSWER
    assert "content" in kinds and "reasoning" not in kinds[kinds.index("content"):]  # reasoning first, then content
    direct = sft.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0,
                                         extra_body={"thinking": {"type": "disabled"}})
    assert direct.choices[0].message.content.strip() == THINK_ANSWER
    assert getattr(direct.choices[0].message, "reasoning_content", None) in (None, "")


def test_sampling_seed_stop_and_length(client: Any) -> None:
    messages = [{"role": "user", "content": "Describe the image."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=1.0, top_p=0.9,
                                           seed=7)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=1.0, top_p=0.9,
                                           seed=7)
    assert first.choices[0].message.content == again.choices[0].message.content
    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    text = greedy.choices[0].message.content
    if len(text) >= 4:
        stop = text[2:4]
        cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stop=[stop])
        assert cut.choices[0].message.content == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens <= 3
    if short.usage.completion_tokens == 3:
        assert short.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (json.dumps({"model": MODEL}).encode(), 400, None),
    (chat_body(model="gpt-4o"), 400, "model_not_found"),
    (chat_body(max_tokens=0), 400, None),
    (chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,@@@not-base64@@@"}}]}]), 400, "invalid_base64"),
    (chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()}}]}]), 400, None),
    (chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://example.com/cat.png"}}]}]), 400, "remote_fetch_disabled"),
    (chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "file:///etc/passwd"}}]}]), 400, None),
    (chat_body(pad="x" * 400_000), 413, "request_too_large"),
])
def test_bad_requests_get_openai_shaped_errors_and_the_server_keeps_serving(
        server: dict[str, Any], client: Any, body: bytes, status: int, code: str | None) -> None:
    got, answer = post(f"{server['url']}/v1/chat/completions", body)
    assert got == status
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    if code is not None:
        assert answer["error"]["code"] == code
    assert_still_serving(client)


def test_unknown_route_and_openai_client_errors(server: dict[str, Any], client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 400
    request = urllib.request.Request(f"{server['url']}/v1/nothing-here")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request, timeout=30)
    assert missing.value.code == 404 and "error" in json.loads(missing.value.read())


def test_overload_gets_429_not_a_crash(server: dict[str, Any], client: Any) -> None:
    body = chat_body(max_tokens=48, stream=False, messages=image_message("Describe the image.", picture((1, 2, 3))))
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = [status for status, _ in pool.map(lambda _: post(f"{server['url']}/v1/chat/completions", body),
                                                    range(12))]
    assert 429 in statuses and 200 in statuses
    assert set(statuses) <= {200, 429}
    assert_still_serving(client)


def test_api_key(server: dict[str, Any]) -> None:
    import openai

    keyed = f"{server['keyed_url']}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed, api_key="wrong", max_retries=0).models.list()
    status, answer = post(f"{keyed}/chat/completions", chat_body())
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=keyed, api_key=KEY, max_retries=0)
    assert good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=2).usage.completion_tokens >= 1


def test_model_deployment_through_its_handle_batches_requests(server: dict[str, Any]) -> None:
    import asyncio

    from ray import serve

    from components.generation.engine import GenerationInput, SamplingParams
    from components.vlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(server["folder"]) / "llm")
    handle = serve.get_deployment_handle("VlmModel", app_name=server["config"].app_name)
    before = handle.stats.remote().result()

    async def one(text: str) -> str:
        ids = tokenizer(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                        add_special_tokens=False)["input_ids"]
        item = GenerationInput(ids, None, None, SamplingParams(max_tokens=12, temperature=0))
        pieces = [delta.content async for delta in handle.options(stream=True).stream.remote(item)]
        return "".join(pieces)

    async def many() -> list[str]:
        return await asyncio.gather(*(one(f"question {i}") for i in range(4)))

    answers = asyncio.run(many())
    after = handle.stats.remote().result()
    assert len(answers) == 4
    assert after["rows"] - before["rows"] == 4
    assert after["batches"] - before["batches"] < 4  # at least two requests shared a batch


def test_a_client_that_leaves_mid_stream_frees_its_place_and_its_row(server: dict[str, Any], client: Any) -> None:
    import http.client
    import time

    from ray import serve

    handle = serve.get_deployment_handle("VlmModel", app_name=server["config"].app_name)
    before = handle.stats.remote().result()["cancelled"]
    host, port = server["url"].removeprefix("http://").split(":")
    for _ in range(4):  # more than serve.max_pending_requests (3): a leaked place would show as a 429
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("POST", "/v1/chat/completions", chat_body(max_tokens=256, temperature=1.0, stream=True),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        assert response.read(6) == b"data: "  # the stream has started
        connection.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 60
    while handle.stats.remote().result()["cancelled"] < before + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert handle.stats.remote().result()["cancelled"] >= before + 1
    assert_still_serving(client)
