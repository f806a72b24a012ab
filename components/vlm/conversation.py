"""Turning a training sample's conversation into the token sequence the VLM learns from: ChatML
blocks (as Qwen-VL and InternVL write them) with the `<image>` and `<video>` media tokens expanded into runs of
vision tokens, and loss only on the answers.

The layout of one sample::

    [<|im_start|>system\\n{system}<|im_end|>\\n]                 (only with a system prompt)
    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n
    ...                                                          (one such block per turn)

`<image>` in a question becomes `<|vision_start|>` + `<|image_pad|>` * n + `<|vision_end|>` with n the
image's visual token count; `<video>` becomes, for every frame, the text `[{t:.1f} second]` followed by
such a run. Labels are -100 everywhere except the answer tokens and the `<|im_end|>\\n` that closes each
answer. Samples too long for the budget lose whole trailing turns (never part of an image run); samples
that cannot be encoded raise `BadSample` with a short snake_case reason that the caller counts drops by.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from components.vlm.tokenizer import (
    ANSWER_SPECIAL_TOKENS,
    END_OF_TEXT,
    IM_END,
    IM_START,
    IMAGE_PLACEHOLDER,
    PAD,
    SPECIAL_TOKENS,
    VIDEO_PLACEHOLDER,
    SpecialIds,
)

IGNORE_INDEX = -100

CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "What is shown in this picture?",
    "Write a short caption for the image.",
    "Describe this image briefly.",
    "What does this image show?",
    "Give a one-sentence description of the picture.",
)
VIDEO_CAPTION_PROMPT = "Describe the video."

HUMAN_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant"})
SYSTEM_ROLES = frozenset({"system"})

_MEDIA_TOKEN_PATTERN = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


class BadSample(Exception):
    """A sample that cannot be turned into training tokens; `reason` is a short snake_case label
    (bad_conversation, empty_answer, no_turns, image_count_mismatch, too_long)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------------
# Reading a sample's json into (question, answer) turns
# ---------------------------------------------------------------------------------------------------


def caption_prompt_for(key: str) -> str:
    """The caption prompt of a sample: chosen by a stable hash of its key, so the same key gets the
    same prompt in every run and every process."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return CAPTION_PROMPTS[int.from_bytes(digest[:8], "big") % len(CAPTION_PROMPTS)]


def is_video_sample(info: Mapping[str, Any]) -> bool:
    """Whether the sample's media is a video (its task says so)."""
    return info.get("task") == "video"


def _raw_conversation(info: Mapping[str, Any]) -> Any:
    """The conversation list under `conversations` (LLaVA/ShareGPT) or `messages` (chat style)."""
    if "conversations" in info:
        return info["conversations"]
    return info.get("messages")


def _message_of(turn: Any) -> tuple[str, str]:
    """(role, text) of one turn dict in either {"from", "value"} or {"role", "content"} style."""
    if not isinstance(turn, Mapping):
        raise BadSample("bad_conversation", f"turn is a {type(turn).__name__}, not a dict")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if not isinstance(role, str) or not isinstance(text, str):
        raise BadSample("bad_conversation", "turn lacks a string role or text")
    role = role.strip().lower()
    if role not in HUMAN_ROLES | ASSISTANT_ROLES | SYSTEM_ROLES:
        raise BadSample("bad_conversation", f"unknown role {role!r}")
    return role, text


def _messages_of(conversation: Any) -> list[tuple[str, str]]:
    if not isinstance(conversation, list):
        raise BadSample("bad_conversation", f"conversation is a {type(conversation).__name__}, not a list")
    return [_message_of(turn) for turn in conversation]


def system_prompt_of(info: Mapping[str, Any]) -> str | None:
    """The text of the sample's system turns (joined by newlines), or None when it has none.
    `turns_of` skips system turns; a caller that wants them passes this as `encode_sample`'s system."""
    conversation = _raw_conversation(info)
    if not conversation:
        return None
    texts = [text for role, text in _messages_of(conversation) if role in SYSTEM_ROLES]
    return "\n".join(texts) if texts else None


def _paired_turns(messages: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Strictly alternating human, assistant, human, ... messages as (question, answer) pairs."""
    if len(messages) % 2:
        raise BadSample("bad_conversation", f"odd number of human/assistant turns ({len(messages)})")
    pairs = []
    for (question_role, question), (answer_role, answer) in zip(messages[0::2], messages[1::2]):
        if question_role not in HUMAN_ROLES or answer_role not in ASSISTANT_ROLES:
            raise BadSample("bad_conversation", "turns do not alternate human/assistant")
        if not answer.strip():
            raise BadSample("empty_answer")
        pairs.append((question, answer))
    return pairs


def _caption_turns(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The single caption turn of a sample without a conversation."""
    caption = info.get("caption")
    if not isinstance(caption, str):
        raise BadSample("no_turns", "neither a conversation nor a caption")
    if not caption.strip():
        raise BadSample("empty_answer", "empty caption")
    if is_video_sample(info):
        return [(f"{VIDEO_PLACEHOLDER}\n{VIDEO_CAPTION_PROMPT}", caption)]
    return [(f"{IMAGE_PLACEHOLDER}\n{caption_prompt_for(str(info.get('key', '')))}", caption)]


def _with_media_token(pairs: list[tuple[str, str]], media_token: str) -> list[tuple[str, str]]:
    """The turns with `media_token` + "\\n" put in front of the first question when no question
    carries a media token at all."""
    if any(_MEDIA_TOKEN_PATTERN.search(question) for question, _ in pairs):
        return pairs
    first_question, first_answer = pairs[0]
    return [(f"{media_token}\n{first_question}", first_answer), *pairs[1:]]


def turns_of(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (question, answer) turns of a sample's json. System turns are skipped (see
    `system_prompt_of`); samples without a conversation become one caption turn; the first question
    gets the sample's media token when no question has one. Raises BadSample."""
    conversation = _raw_conversation(info)
    if conversation is None or (isinstance(conversation, list) and not conversation):
        return _caption_turns(info)
    messages = [(role, text) for role, text in _messages_of(conversation) if role not in SYSTEM_ROLES]
    if not messages:
        raise BadSample("no_turns", "the conversation has only system turns")
    media_token = VIDEO_PLACEHOLDER if is_video_sample(info) else IMAGE_PLACEHOLDER
    return _with_media_token(_paired_turns(messages), media_token)


# ---------------------------------------------------------------------------------------------------
# Encoding turns into ids and labels
# ---------------------------------------------------------------------------------------------------


@dataclass
class EncodedSample:
    """One sample as tokens: ids, labels (-100 where no loss), the visual token count of every image
    or video frame in order of appearance, and the caller's media for the images kept."""

    key: str
    task: str
    input_ids: list[int]
    labels: list[int]
    image_token_counts: list[int]
    media: list[Any] = field(default_factory=list)
    num_turns: int = 0  # turns kept
    truncated_turns: int = 0  # turns cut to fit max_tokens

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def num_images(self) -> int:
        return len(self.image_token_counts)


@dataclass
class _TurnTokens:
    """The tokens of one user/assistant turn and the image token counts its question consumed."""

    input_ids: list[int]
    labels: list[int]
    image_token_counts: list[int]


def _system_text(system: str) -> str:
    return f"{IM_START}system\n{system}{IM_END}\n"


def _user_text(question: str) -> str:
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"


def _answer_text(answer: str) -> str:
    return f"{answer}{IM_END}\n"


def _frame_prefix(timestamp: float) -> str:
    return f"[{timestamp:.1f} second]"


class _Expander:
    """Tokenizes ChatML text and expands the `<image>`/`<video>` media tokens, consuming image token counts in order."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token_counts: Sequence[int],
                 frame_timestamps: Sequence[float] | None) -> None:
        self.tokenizer = tokenizer
        self.ids = SpecialIds.of(tokenizer)
        self.counts = list(image_token_counts)
        self.frame_timestamps = None if frame_timestamps is None else list(frame_timestamps)
        self.cursor = 0

    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def vision_run(self, num_tokens: int) -> list[int]:
        return [self.ids.vision_start, *[self.ids.image_pad] * num_tokens, self.ids.vision_end]

    def take_counts(self, how_many: int) -> list[int]:
        """The next `how_many` image token counts; BadSample when fewer are left."""
        if self.cursor + how_many > len(self.counts):
            raise BadSample("image_count_mismatch", "more media tokens than image token counts")
        taken = self.counts[self.cursor:self.cursor + how_many]
        self.cursor += how_many
        return taken

    def media_token_ids(self, media_token: str) -> tuple[list[int], list[int]]:
        """The ids one `<image>` or `<video>` expands to and the image token counts it consumed."""
        if media_token == IMAGE_PLACEHOLDER:
            counts = self.take_counts(1)
            return self.vision_run(counts[0]), counts
        if self.frame_timestamps is None:
            raise ValueError("a <video> media token needs frame_timestamps")
        counts = self.take_counts(len(self.frame_timestamps))
        ids: list[int] = []
        for timestamp, count in zip(self.frame_timestamps, counts):
            ids += self.text_ids(_frame_prefix(timestamp)) + self.vision_run(count)
        return ids, counts

    def expanded_ids(self, text: str) -> tuple[list[int], list[int]]:
        """The ids of `text` with every media token expanded, and the counts consumed."""
        ids: list[int] = []
        consumed: list[int] = []
        for piece in _MEDIA_TOKEN_PATTERN.split(text):
            if piece in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                piece_ids, counts = self.media_token_ids(piece)
                ids += piece_ids
                consumed += counts
            else:
                ids += self.text_ids(piece)
        return ids, consumed

    def turn(self, question: str, answer: str) -> _TurnTokens:
        prompt, counts = self.expanded_ids(_user_text(question))
        answer_ids = self.text_ids(_answer_text(answer))
        return _TurnTokens(prompt + answer_ids, [IGNORE_INDEX] * len(prompt) + answer_ids, counts)


def _media_token_counts(turns: Sequence[tuple[str, str]]) -> tuple[int, int]:
    """How many <image> and <video> media tokens the questions hold."""
    pieces = [piece for question, _ in turns for piece in _MEDIA_TOKEN_PATTERN.findall(question)]
    return pieces.count(IMAGE_PLACEHOLDER), pieces.count(VIDEO_PLACEHOLDER)


def _check_media_counts(turns: Sequence[tuple[str, str]], image_token_counts: Sequence[int],
                        frame_timestamps: Sequence[float] | None) -> None:
    """BadSample("image_count_mismatch") unless the media tokens consume exactly the given counts
    (a <video> consumes one count per frame timestamp; at most one <video> per sample)."""
    if any(count < 1 for count in image_token_counts):
        raise ValueError(f"image token counts must be >= 1, got {list(image_token_counts)}")
    num_images, num_videos = _media_token_counts(turns)
    if num_videos > 1:
        raise BadSample("image_count_mismatch", f"{num_videos} <video> media tokens")
    if num_videos and frame_timestamps is None:
        raise ValueError("a <video> media token needs frame_timestamps")
    expected = num_images + (len(frame_timestamps) if num_videos and frame_timestamps is not None else 0)
    if expected != len(image_token_counts):
        raise BadSample("image_count_mismatch",
                        f"media tokens need {expected} image token counts, got {len(image_token_counts)}")


def _turns_that_fit(prefix_length: int, turns: Sequence[_TurnTokens], max_tokens: int) -> int:
    """How many leading turns fit in max_tokens after a prefix of `prefix_length` tokens."""
    total = prefix_length
    for kept, turn in enumerate(turns):
        total += len(turn.input_ids)
        if total > max_tokens:
            return kept
    return len(turns)


def encode_sample(*, key: str, task: str, turns: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase,
                  image_token_counts: list[int], media: list[Any] | None = None,
                  frame_timestamps: list[float] | None = None, max_tokens: int,
                  system: str | None = None) -> EncodedSample:
    """The sample's ChatML tokens with loss on the answers, cut to the longest prefix of whole turns
    within max_tokens. `media` (opaque, one entry per image token count) is cut to the images kept.
    Raises BadSample (no_turns, image_count_mismatch, too_long) and ValueError for caller errors."""
    if not turns:
        raise BadSample("no_turns")
    if media is not None and len(media) != len(image_token_counts):
        raise ValueError(f"media has {len(media)} entries for {len(image_token_counts)} image token counts")
    _check_media_counts(turns, image_token_counts, frame_timestamps)
    expander = _Expander(tokenizer, image_token_counts, frame_timestamps)
    prefix = expander.text_ids(_system_text(system)) if system is not None else []
    encoded_turns = [expander.turn(question, answer) for question, answer in turns]
    kept = _turns_that_fit(len(prefix), encoded_turns, max_tokens)
    if kept == 0:
        length = len(prefix) + len(encoded_turns[0].input_ids)
        raise BadSample("too_long", f"the first turn needs {length} tokens, max_tokens is {max_tokens}")
    input_ids, labels, counts = list(prefix), [IGNORE_INDEX] * len(prefix), []
    for turn in encoded_turns[:kept]:
        input_ids += turn.input_ids
        labels += turn.labels
        counts += turn.image_token_counts
    return EncodedSample(key=key, task=task, input_ids=input_ids, labels=labels, image_token_counts=counts,
                         media=list(media[:len(counts)]) if media is not None else [],
                         num_turns=kept, truncated_turns=len(turns) - kept)


# ---------------------------------------------------------------------------------------------------
# Inference: the prompt for one question, and the text of a generated answer
# ---------------------------------------------------------------------------------------------------


def prompt_ids(*, tokenizer: PreTrainedTokenizerBase, question: str, image_token_counts: list[int],
               frame_timestamps: list[float] | None = None, system: str | None = None,
               history: Sequence[tuple[str, str]] = ()) -> tuple[list[int], list[int]]:
    """The ids of the conversation up to and including the `<|im_start|>assistant\\n` header that
    asks `question` (after the optional system prompt and earlier (question, answer) turns), and the
    image token counts its media tokens consumed (a prefix of `image_token_counts`; unused trailing
    counts are allowed). BadSample("image_count_mismatch") when the media tokens need more counts."""
    expander = _Expander(tokenizer, image_token_counts, frame_timestamps)
    ids = expander.text_ids(_system_text(system)) if system is not None else []
    consumed: list[int] = []
    for past_question, past_answer in history:
        turn = expander.turn(past_question, past_answer)
        ids += turn.input_ids
        consumed += turn.image_token_counts
    question_ids, counts = expander.expanded_ids(_user_text(question))
    return ids + question_ids, consumed + counts


def _ids_of_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> set[int]:
    """The ids of those `tokens` the tokenizer has as added tokens."""
    added = tokenizer.get_added_vocab()
    return {added[token] for token in tokens if token in added}


def answer_text(tokenizer: PreTrainedTokenizerBase, generated_ids: Sequence[int]) -> str:
    """The text of a generated answer: the ids up to the first end token (`<|im_end|>`, or
    `<|endoftext|>`/pad), decoded without special tokens except the box/point/think ones, which
    grounding and reasoning answers need."""
    ids = [int(token_id) for token_id in generated_ids]
    stops = _ids_of_tokens(tokenizer, (IM_END, END_OF_TEXT, PAD))
    if tokenizer.pad_token_id is not None:
        stops.add(tokenizer.pad_token_id)
    end = next((position for position, token_id in enumerate(ids) if token_id in stops), len(ids))
    keep = _ids_of_tokens(tokenizer, ANSWER_SPECIAL_TOKENS)
    drop = (set(tokenizer.all_special_ids) | _ids_of_tokens(tokenizer, SPECIAL_TOKENS)) - keep
    kept_ids = [token_id for token_id in ids[:end] if token_id not in drop]
    return tokenizer.decode(kept_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
