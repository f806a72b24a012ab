"""From a validated chat request to the model's input: decoding its media parts, reading a run of
`[12.0 second]` text parts each followed by an image as one video, the thinking switch's system prompt,
and the ChatML prompt ids (the training template, `components.vlm.conversation`) with image patches.

Message layout: system messages (after the thinking mode's system prompt) form the system block;
consecutive messages of one role are joined with newlines; each user message becomes its parts in
order, joined with newlines, an image part as `<image>` and a video (a `video_url` part, or timestamped
frames) as `<video>`. Client text cannot inject structure: the chat and vision special tokens and the
`<image>`/`<video>` media tokens are removed from it (box, point and think tags stay; they are answer text).
A conversation carries at most one video, as the training template does.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from PIL import Image

from components.serve.config import MediaConfig, ThinkingConfig
from components.generation.engine import GenerationInput, SamplingParams
from components.serve.media import MediaError, decode_image_url, decode_video_url
from components.serve.protocol import ApiError, ChatMessage, ChatRequest, ImagePart, TextPart, VideoPart
from components.vit.config import SeedViTConfig
from components.vlm.conversation import BadSample, prompt_ids
from components.vlm.data import image_token_count, images_to_vit_input
from components.vlm.tokenizer import ANSWER_SPECIAL_TOKENS, IMAGE_PLACEHOLDER, SPECIAL_TOKENS, VIDEO_PLACEHOLDER

FRAME_STAMP = re.compile(r"^\s*\[\s*(\d+(?:\.\d+)?)\s*seconds?\s*\]\s*$")
STRUCTURAL_TOKENS = tuple(sorted((t for t in SPECIAL_TOKENS if t not in ANSWER_SPECIAL_TOKENS), key=len, reverse=True))

Media = dict[str, Any]  # part param -> PIL image (image part) or (frames, timestamps) (video part)


@dataclasses.dataclass(frozen=True)
class Video:
    frames: list[Image.Image]
    timestamps: list[float]


def user_part_groups(request: ChatRequest) -> list[tuple[Any, ...]]:
    """The parts of each run of consecutive user messages (one user turn of the prompt)."""
    groups = _merged(tuple(m for m in request.messages if m.role != "system"))
    return [tuple(part for message in group for part in message.parts) for role, group in groups if role == "user"]


def check_media_counts(request: ChatRequest, cfg: MediaConfig) -> None:
    """The image, video and frame limits, checked before anything is decoded."""
    images = videos = 0
    for parts in user_part_groups(request):
        for item in _frame_runs(parts):
            if isinstance(item, list):
                videos += 1
                if len(item) > cfg.max_video_frames:
                    raise ApiError(400, f"a video of {len(item)} frames; at most {cfg.max_video_frames} are accepted "
                                   "(serve.media.max_video_frames)", param=item[0][1].param, code="too_many_frames")
            elif isinstance(item, VideoPart):
                videos += 1
            elif isinstance(item, ImagePart):
                images += 1
            if videos > 1:
                param = item[0][1].param if isinstance(item, list) else getattr(item, "param", "messages")
                raise ApiError(400, "a conversation may carry one video (a video_url part or one run of timestamped "
                               "frames)", param=param, code="too_many_videos")
    if images > cfg.max_images:
        raise ApiError(400, f"the request has {images} images; at most {cfg.max_images} are accepted "
                       "(serve.media.max_images)", param="messages", code="too_many_images")


def decode_media(request: ChatRequest, cfg: MediaConfig) -> Media:
    """Every image and video part of the request decoded (remote URLs only as config allows), after the
    count limits pass and while the decoded pixels stay within `max_request_pixels`; the first refusal
    becomes an ApiError naming the part."""
    check_media_counts(request, cfg)
    decoded: Media = {}
    pixels = 0
    for message in request.messages:
        for part in message.parts:
            try:
                if isinstance(part, ImagePart):
                    image = decode_image_url(part.url, cfg, part.param)
                    decoded[part.param] = image
                    pixels += image.width * image.height
                elif isinstance(part, VideoPart):
                    frames, stamps = decode_video_url(part.url, cfg, part.param)
                    decoded[part.param] = Video(frames, stamps)
                    pixels += sum(frame.width * frame.height for frame in frames)
            except MediaError as error:
                raise ApiError(error.status, error.message, param=error.param, code=error.code) from error
            if pixels > cfg.max_request_pixels:
                raise ApiError(413, f"the request's images and frames decode to over {cfg.max_request_pixels} pixels "
                               "(serve.media.max_request_pixels); send fewer or smaller images",
                               param=getattr(part, "param", "messages"), code="media_too_large")
    return decoded


def clean_text(text: str) -> str:
    """Client text with the structural special tokens and `<image>`/`<video>` removed, repeated until none
    is left (removing an inner token must not assemble an outer one, as in `<|im_<image>start|>`)."""
    previous = None
    while previous != text:
        previous = text
        for token in STRUCTURAL_TOKENS:
            text = text.replace(token, "")
    return text


def _frame_runs(parts: tuple[Any, ...]) -> list[Any]:
    """The parts with every run of (`[t second]` text, image) pairs grouped into one list of
    (timestamp, image part) pairs."""
    grouped: list[Any] = []
    index = 0
    while index < len(parts):
        run: list[tuple[float, ImagePart]] = []
        while (index + 1 < len(parts) and isinstance(parts[index], TextPart)
               and isinstance(parts[index + 1], ImagePart) and FRAME_STAMP.match(parts[index].text)):
            run.append((float(FRAME_STAMP.match(parts[index].text).group(1)), parts[index + 1]))
            index += 2
        if run:
            grouped.append(run)
        else:
            grouped.append(parts[index])
            index += 1
    return grouped


@dataclasses.dataclass
class _UserTurn:
    text: str
    images: list[Image.Image]  # in the order of their media tokens, a video's frames at its `<video>`
    videos: list[Video]


def _user_turn(message: ChatMessage, media: Media) -> _UserTurn:
    pieces: list[str] = []
    images: list[Image.Image] = []
    videos: list[Video] = []
    for item in _frame_runs(message.parts):
        if isinstance(item, (list, VideoPart)):  # timestamped frames sent as images, or a video file
            video = (Video([media[part.param] for _, part in item], [t for t, _ in item]) if isinstance(item, list)
                     else media[item.param])
            videos.append(video)
            pieces.append(VIDEO_PLACEHOLDER)
            images += video.frames
        elif isinstance(item, ImagePart):
            pieces.append(IMAGE_PLACEHOLDER)
            images.append(media[item.param])
        else:
            pieces.append(clean_text(item.text))
    return _UserTurn("\n".join(piece for piece in pieces if piece), images, videos)


def _merged(messages: tuple[ChatMessage, ...]) -> list[tuple[str, list[ChatMessage]]]:
    """Consecutive messages of one role as one group."""
    groups: list[tuple[str, list[ChatMessage]]] = []
    for message in messages:
        if groups and groups[-1][0] == message.role:
            groups[-1][1].append(message)
        else:
            groups.append((message.role, [message]))
    return groups


def system_text(request: ChatRequest, thinking: ThinkingConfig) -> str | None:
    mode = thinking.thinking_system_prompt if request.thinking else thinking.non_thinking_system_prompt
    given = [clean_text(p.text) for m in request.messages if m.role == "system" for p in m.parts
             if isinstance(p, TextPart)]
    text = "\n\n".join(piece for piece in (mode, *given) if piece)
    return text or None


def build_input(request: ChatRequest, media: Media, tokenizer: Any, vit_cfg: SeedViTConfig, thinking: ThinkingConfig,
                max_context_tokens: int, tokenizer_lock: AbstractContextManager[Any] | None = None) -> GenerationInput:
    """The generation input of a request: prompt ids with image runs expanded, and the images' patches.
    `media` comes from `decode_media`, which has enforced the image, frame and video limits.
    `tokenizer_lock` guards the tokenizer when several threads build inputs (a fast tokenizer must not
    encode in two threads at once)."""
    history: list[tuple[str, str]] = []
    pending: _UserTurn | None = None
    turns: list[_UserTurn] = []
    for role, group in _merged(tuple(m for m in request.messages if m.role != "system")):
        if role == "user":
            parts = tuple(part for message in group for part in message.parts)
            pending = _user_turn(ChatMessage("user", parts), media)
            turns.append(pending)
        else:
            answer = "\n".join(clean_text(p.text) for m in group for p in m.parts if isinstance(p, TextPart))
            history.append((pending.text if pending is not None else "", answer))
            pending = None
    if pending is None:
        raise ApiError(400, "the last message must be from the user", param="messages", code="last_message_not_user")
    videos = [video for turn in turns for video in turn.videos]
    if len(videos) > 1:
        raise ValueError("build_input takes the media of decode_media, which allows one video per conversation")
    images = [image for turn in turns for image in turn.images]
    try:
        with tokenizer_lock or nullcontext():
            ids, used = prompt_ids(tokenizer=tokenizer, question=pending.text,
                                   image_token_counts=[image_token_count(image, vit_cfg) for image in images],
                                   frame_timestamps=videos[0].timestamps if videos else None,
                                   system=system_text(request, thinking), history=history)
    except BadSample as error:
        raise ApiError(400, f"the messages and their media do not match: {error}", param="messages",
                       code="invalid_messages") from error
    if len(ids) + request.max_tokens > max_context_tokens:
        raise ApiError(400, f"the prompt is {len(ids)} tokens (images included) and max_tokens is "
                       f"{request.max_tokens}: together over the {max_context_tokens}-token context; send fewer or "
                       "smaller images, a shorter conversation, or a lower max_tokens", param="messages",
                       code="context_length_exceeded")
    packed = images_to_vit_input(images[:len(used)], vit_cfg)
    return GenerationInput(
        prompt_ids=ids, pixel_values=packed.pixel_values if packed else None, grid_hw=packed.grid_hw if packed else None,
        sampling=SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                                stop=request.stop, seed=request.seed))
