"""Tests of the VLM's text side: the tokenizer (training, special tokens, save/load), the conversation
encoder (ChatML layout, placeholder expansion, answer-only labels, truncation, bad samples) and the
sequence packer (best-fit packs whose restarting position ids keep samples apart in a real model)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from components.vlm.conversation import (
    CAPTION_PROMPTS,
    IGNORE_INDEX,
    BadSample,
    EncodedSample,
    answer_text,
    caption_prompt_for,
    encode_sample,
    prompt_ids,
    system_prompt_of,
    turns_of,
)
from components.vlm.packing import Pack, Packer, collate, pack_stream, padding_fraction
from components.vlm.tokenizer import (
    BOX_END,
    BOX_START,
    IM_END,
    IMAGE_PAD,
    PAD,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    VISION_END,
    VISION_START,
    SpecialIds,
    add_special_tokens,
    load_tokenizer,
    missing_special_tokens,
    save_tokenizer,
    train_tokenizer,
)

# ---------------------------------------------------------------------------------------------------
# Fixtures: real-looking samples and a tokenizer trained on them
# ---------------------------------------------------------------------------------------------------

CAPTION_INFO: dict[str, Any] = {"task": "caption", "caption": "a red circle and a red triangle on a white background",
                                "conversations": [], "key": "crawl-00000-000000002"}
GROUNDING_INFO: dict[str, Any] = {"task": "grounding", "key": "g-1", "conversations": [
    {"from": "human", "value": "<image>\nGive the bounding box of the purple shape."},
    {"from": "gpt", "value": "<box>[733, 79, 793, 156]</box>"},
    {"from": "human", "value": "Point to the black shape."},
    {"from": "gpt", "value": "<point>[750, 752]</point>"}]}
COUNTING_INFO: dict[str, Any] = {"task": "counting", "key": "c-1", "conversations": [
    {"from": "human", "value": "<image>\nHow many black diamonds are there?"}, {"from": "gpt", "value": "1"}]}
OCR_INFO: dict[str, Any] = {"task": "ocr", "key": "o-1", "conversations": [
    {"from": "human", "value": "<image>\nRead all the text in the image."},
    {"from": "gpt", "value": "WGR-58310 $133.24 Bridge\n782 $542.32 MK-92227"},
    {"from": "human", "value": "How many lines of text are there?"}, {"from": "gpt", "value": "2"}]}
VIDEO_INFO: dict[str, Any] = {"task": "video", "key": "v-1", "conversations": [
    {"from": "human", "value": "<video>\nWhen does this happen: the purple triangle appears on the left? "
                               "Answer with the start and end second."},
    {"from": "gpt", "value": "From 4.0 to 4.2 seconds."}],
    "annotations": {"timestamps": [0.4, 1.4, 2.4], "frame_prefixes": ["[0.4 second]", "[1.4 second]", "[2.4 second]"]}}

ROUND_TRIP_TEXTS = (
    "héllo wörld — 日本語のテキスト 😀 naïve café",
    "line one\nline two\n\n  indented\ttab\r\nwindows",
    "$290.95",
    "<box>[733, 79, 793, 156]</box>",
    "<point>[750, 752]</point> and <think>hmm</think>",
    "[12.4 second] WGR-58310 $133.24 Bridge\n782 $542.32 MK-92227",
    "  leading and trailing spaces  ",
    "",
)


def _corpus() -> list[str]:
    texts = []
    for info in (CAPTION_INFO, GROUNDING_INFO, COUNTING_INFO, OCR_INFO, VIDEO_INFO):
        texts += [turn["value"] for turn in info["conversations"]]
    texts += [CAPTION_INFO["caption"], *CAPTION_PROMPTS, "Describe the video.", "<|im_start|>user\n<|im_end|>\n",
              "<|im_start|>assistant\n", "[0.4 second] [1.4 second] [12.4 second]"]
    return texts * 20


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(_corpus(), vocab_size=400)


def _plain_tokenizer(special_tokens: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE with only some special tokens and no pad token, like a foreign LLM's."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------
# tokenizer.py
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_trained_tokenizer_round_trips_text(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    assert tokenizer.decode(_ids(tokenizer, text)) == text


def test_special_tokens_are_single_ids_in_order(tokenizer: PreTrainedTokenizerFast) -> None:
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert _ids(tokenizer, token) == [expected_id]
        assert _ids(tokenizer, f"x{token}y") == [*_ids(tokenizer, "x"), expected_id, *_ids(tokenizer, "y")]
    assert tokenizer.pad_token == PAD and tokenizer.eos_token == IM_END
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    assert set(tokenizer.all_special_ids) == set(range(len(SPECIAL_TOKENS)))


def test_special_tokens_never_come_from_merges(tokenizer: PreTrainedTokenizerFast) -> None:
    for token_id in range(len(SPECIAL_TOKENS), len(tokenizer)):
        piece = tokenizer.decode([token_id])
        assert not any(special in piece for special in SPECIAL_TOKENS), (token_id, piece)
    ids = _ids(tokenizer, "<box>[733, 79, 793, 156]</box>")
    assert ids[0] == SPECIAL_TOKENS.index(BOX_START) and ids[-1] == SPECIAL_TOKENS.index(BOX_END)
    assert ids.count(SPECIAL_TOKENS.index(BOX_START)) == 1


def test_digits_are_single_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    for digit in "0123456789":
        assert len(_ids(tokenizer, digit)) == 1
    pieces = [tokenizer.decode([token_id]) for token_id in _ids(tokenizer, "[733, 79] at [12.4 second] $290.95")]
    digit_pieces = [piece for piece in pieces if any(char.isdigit() for char in piece)]
    assert digit_pieces == list("7337912429095")


def test_train_tokenizer_rejects_empty_corpus() -> None:
    with pytest.raises(ValueError, match="at least one"):
        train_tokenizer([], vocab_size=400)


def test_save_and_load_keep_encodings(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    for text in ROUND_TRIP_TEXTS:
        assert _ids(loaded, text) == _ids(tokenizer, text)
    assert SpecialIds.of(loaded) == SpecialIds.of(tokenizer)
    assert loaded.pad_token == PAD and loaded.eos_token == IM_END


def test_special_ids_of_trained_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = SpecialIds.of(tokenizer)
    assert ids.pad == 0 and ids.eos == ids.im_end == SPECIAL_TOKENS.index(IM_END)
    assert ids.image_pad == SPECIAL_TOKENS.index(IMAGE_PAD)


def test_add_special_tokens_adds_exactly_the_missing_ones(tmp_path: Path) -> None:
    foreign = _plain_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    missing = missing_special_tokens(foreign)
    assert missing == [token for token in SPECIAL_TOKENS if token not in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    size_before = len(foreign)
    kept_ids = {token: _ids(foreign, token) for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert add_special_tokens(foreign) == len(missing)
    assert len(foreign) == size_before + len(missing)
    assert foreign.pad_token == PAD
    for token in SPECIAL_TOKENS:
        assert len(_ids(foreign, token)) == 1
    assert {token: _ids(foreign, token) for token in kept_ids} == kept_ids
    assert add_special_tokens(foreign) == 0
    save_tokenizer(foreign, tmp_path / "foreign")
    assert SpecialIds.of(load_tokenizer(tmp_path / "foreign")) == SpecialIds.of(foreign)


def test_load_tokenizer_names_missing_special_tokens(tmp_path: Path) -> None:
    save_tokenizer(_plain_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), tmp_path / "plain")
    with pytest.raises(ValueError, match="<think>"):
        load_tokenizer(tmp_path / "plain")


# ---------------------------------------------------------------------------------------------------
# conversation.py: turns_of
# ---------------------------------------------------------------------------------------------------


def test_turns_of_caption_uses_stable_prompt() -> None:
    turns = turns_of(CAPTION_INFO)
    assert turns == [(f"<image>\n{caption_prompt_for(CAPTION_INFO['key'])}", CAPTION_INFO["caption"])]
    assert turns_of(dict(CAPTION_INFO)) == turns
    prompts = {caption_prompt_for(f"key-{index}") for index in range(200)}
    assert prompts == set(CAPTION_PROMPTS)


def test_turns_of_real_conversations() -> None:
    assert turns_of(GROUNDING_INFO) == [
        ("<image>\nGive the bounding box of the purple shape.", "<box>[733, 79, 793, 156]</box>"),
        ("Point to the black shape.", "<point>[750, 752]</point>")]
    assert turns_of(COUNTING_INFO) == [("<image>\nHow many black diamonds are there?", "1")]
    assert turns_of(OCR_INFO)[0][1] == "WGR-58310 $133.24 Bridge\n782 $542.32 MK-92227"
    assert turns_of(VIDEO_INFO)[0][0].startswith("<video>\nWhen does this happen")


def test_turns_of_video_caption() -> None:
    info = {"task": "video", "caption": "a square moves right", "key": "v-2"}
    assert turns_of(info) == [("<video>\nDescribe the video.", "a square moves right")]


def test_turns_of_accepts_user_assistant_roles_and_role_content_keys() -> None:
    info = {"task": "vqa", "key": "k", "conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is the circle?"},
        {"role": "assistant", "content": "Red."},
        {"from": "USER", "value": "And the square?"},
        {"from": "assistant", "value": "Blue."}]}
    assert turns_of(info) == [("<image>\nWhat colour is the circle?", "Red."), ("And the square?", "Blue.")]
    assert system_prompt_of(info) == "Be brief."
    assert system_prompt_of(GROUNDING_INFO) is None


def test_turns_of_adds_placeholder_only_when_none_present() -> None:
    info = {"task": "vqa", "key": "k", "conversations": [
        {"from": "human", "value": "First?"}, {"from": "gpt", "value": "a"},
        {"from": "human", "value": "<image>\nSecond?"}, {"from": "gpt", "value": "b"}]}
    assert turns_of(info)[0][0] == "First?"
    video = {"task": "video", "key": "k", "conversations": [
        {"from": "human", "value": "What happens?"}, {"from": "gpt", "value": "x"}]}
    assert turns_of(video)[0][0] == "<video>\nWhat happens?"


@pytest.mark.parametrize(("conversations", "reason"), [
    ("not a list", "bad_conversation"),
    (["a string turn", {"from": "gpt", "value": "x"}], "bad_conversation"),
    ([{"from": "human", "value": "q"}], "bad_conversation"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "bad_conversation"),
    ([{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}], "bad_conversation"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}], "bad_conversation"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}], "empty_answer"),
    ([{"from": "system", "value": "s"}], "no_turns"),
])
def test_turns_of_rejects_malformed_conversations(conversations: Any, reason: str) -> None:
    with pytest.raises(BadSample) as caught:
        turns_of({"task": "vqa", "key": "k", "conversations": conversations})
    assert caught.value.reason == reason


def test_turns_of_rejects_sample_without_turns() -> None:
    with pytest.raises(BadSample) as caught:
        turns_of({"task": "caption", "key": "k", "conversations": []})
    assert caught.value.reason == "no_turns"
    with pytest.raises(BadSample) as caught:
        turns_of({"task": "caption", "key": "k", "caption": ""})
    assert caught.value.reason == "empty_answer"


# ---------------------------------------------------------------------------------------------------
# conversation.py: encode_sample, prompt_ids, answer_text
# ---------------------------------------------------------------------------------------------------


def _labelled_text(tokenizer: PreTrainedTokenizerBase, sample: EncodedSample) -> str:
    return tokenizer.decode([label for label in sample.labels if label != IGNORE_INDEX])


def test_encode_sample_chatml_layout_and_labels(tokenizer: PreTrainedTokenizerFast) -> None:
    turns = turns_of(GROUNDING_INFO)
    sample = encode_sample(key="g-1", task="grounding", turns=turns, tokenizer=tokenizer, image_token_counts=[3],
                           media=["img"], max_tokens=1000, system="You are helpful.")
    image_run = VISION_START + IMAGE_PAD * 3 + VISION_END
    expected = ("<|im_start|>system\nYou are helpful.<|im_end|>\n"
                f"<|im_start|>user\n{image_run}\nGive the bounding box of the purple shape.<|im_end|>\n"
                "<|im_start|>assistant\n<box>[733, 79, 793, 156]</box><|im_end|>\n"
                "<|im_start|>user\nPoint to the black shape.<|im_end|>\n"
                "<|im_start|>assistant\n<point>[750, 752]</point><|im_end|>\n")
    assert tokenizer.decode(sample.input_ids) == expected
    assert _labelled_text(tokenizer, sample) == ("<box>[733, 79, 793, 156]</box><|im_end|>\n"
                                                 "<point>[750, 752]</point><|im_end|>\n")
    assert len(sample.labels) == sample.length
    for token_id, label in zip(sample.input_ids, sample.labels):
        assert label in (IGNORE_INDEX, token_id)
    assert sample.image_token_counts == [3] and sample.media == ["img"] and sample.num_images == 1
    assert (sample.num_turns, sample.truncated_turns) == (2, 0)


def test_encode_sample_answer_special_tokens_are_single_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    sample = encode_sample(key="g-1", task="grounding", turns=turns_of(GROUNDING_INFO), tokenizer=tokenizer,
                           image_token_counts=[2], max_tokens=1000)
    labelled = [label for label in sample.labels if label != IGNORE_INDEX]
    for token in ("<box>", "</box>", "<point>", "</point>"):
        assert labelled.count(SPECIAL_TOKENS.index(token)) == 1


def test_encode_sample_multiple_images_in_order(tokenizer: PreTrainedTokenizerFast) -> None:
    turns = [("<image> and <image>: which is larger?", "the first"), ("<image>\nAnd this one?", "small")]
    sample = encode_sample(key="m", task="vqa", turns=turns, tokenizer=tokenizer, image_token_counts=[4, 1, 2],
                           media=["a", "b", "c"], max_tokens=1000)
    ids = SpecialIds.of(tokenizer)
    runs, current = [], None
    for token_id in sample.input_ids:
        if token_id == ids.vision_start:
            current = 0
        elif token_id == ids.image_pad:
            current += 1
        elif token_id == ids.vision_end:
            runs.append(current)
    assert runs == [4, 1, 2]
    assert all(label == IGNORE_INDEX for token_id, label in zip(sample.input_ids, sample.labels)
               if token_id in (ids.vision_start, ids.image_pad, ids.vision_end))


def test_encode_sample_video_frames(tokenizer: PreTrainedTokenizerFast) -> None:
    timestamps = VIDEO_INFO["annotations"]["timestamps"]
    sample = encode_sample(key="v-1", task="video", turns=turns_of(VIDEO_INFO), tokenizer=tokenizer,
                           image_token_counts=[2, 2, 2], frame_timestamps=timestamps, max_tokens=1000)
    frames = "".join(f"[{t:.1f} second]{VISION_START}{IMAGE_PAD * 2}{VISION_END}" for t in timestamps)
    assert tokenizer.decode(sample.input_ids).startswith(f"<|im_start|>user\n{frames}\nWhen does this happen")
    assert _labelled_text(tokenizer, sample) == "From 4.0 to 4.2 seconds.<|im_end|>\n"
    with pytest.raises(ValueError, match="frame_timestamps"):
        encode_sample(key="v-1", task="video", turns=turns_of(VIDEO_INFO), tokenizer=tokenizer,
                      image_token_counts=[2, 2, 2], max_tokens=1000)


@pytest.mark.parametrize("counts", [[], [3, 3]])
def test_encode_sample_image_count_mismatch(tokenizer: PreTrainedTokenizerFast, counts: list[int]) -> None:
    with pytest.raises(BadSample) as caught:
        encode_sample(key="c", task="counting", turns=turns_of(COUNTING_INFO), tokenizer=tokenizer,
                      image_token_counts=counts, max_tokens=1000)
    assert caught.value.reason == "image_count_mismatch"


def test_encode_sample_video_frame_count_mismatch(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(BadSample) as caught:
        encode_sample(key="v", task="video", turns=turns_of(VIDEO_INFO), tokenizer=tokenizer,
                      image_token_counts=[2, 2], frame_timestamps=[0.4, 1.4, 2.4], max_tokens=1000)
    assert caught.value.reason == "image_count_mismatch"


def test_encode_sample_truncates_whole_turns(tokenizer: PreTrainedTokenizerFast) -> None:
    turns = [("<image>\nRead all the text in the image.", "WGR-58310 $133.24 Bridge"),
             ("<image>\nAnd here?", "782 $542.32 MK-92227"), ("How many lines?", "2")]
    full = encode_sample(key="o", task="ocr", turns=turns, tokenizer=tokenizer, image_token_counts=[5, 6],
                         media=["p0", "p1"], max_tokens=1000)
    first = encode_sample(key="o", task="ocr", turns=turns[:1], tokenizer=tokenizer, image_token_counts=[5],
                          max_tokens=1000)
    cut = encode_sample(key="o", task="ocr", turns=turns, tokenizer=tokenizer, image_token_counts=[5, 6],
                        media=["p0", "p1"], max_tokens=full.length - 1)
    assert (cut.num_turns, cut.truncated_turns) == (2, 1)
    assert cut.input_ids == full.input_ids[:cut.length] and cut.image_token_counts == [5, 6]
    only_first = encode_sample(key="o", task="ocr", turns=turns, tokenizer=tokenizer, image_token_counts=[5, 6],
                               media=["p0", "p1"], max_tokens=first.length + 3)
    assert only_first.input_ids == first.input_ids and only_first.labels == first.labels
    assert only_first.image_token_counts == [5] and only_first.media == ["p0"]
    assert (only_first.num_turns, only_first.truncated_turns) == (1, 2)
    with pytest.raises(BadSample) as caught:
        encode_sample(key="o", task="ocr", turns=turns, tokenizer=tokenizer, image_token_counts=[5, 6],
                      max_tokens=first.length - 1)
    assert caught.value.reason == "too_long"


def test_prompt_ids_match_training_prefix(tokenizer: PreTrainedTokenizerFast) -> None:
    question = "<image>\nHow many black diamonds are there?"
    ids, consumed = prompt_ids(tokenizer=tokenizer, question=question, image_token_counts=[4, 9])
    assert consumed == [4]
    sample = encode_sample(key="c", task="counting", turns=[(question, "1")], tokenizer=tokenizer,
                           image_token_counts=[4], max_tokens=1000)
    assert sample.input_ids[:len(ids)] == ids
    assert all(label == IGNORE_INDEX for label in sample.labels[:len(ids)])
    assert sample.labels[len(ids)] != IGNORE_INDEX
    assert tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    history_ids, history_consumed = prompt_ids(tokenizer=tokenizer, question="And white ones?",
                                               image_token_counts=[4], history=[(question, "1")],
                                               system="Be brief.")
    assert history_consumed == [4]
    assert tokenizer.decode(history_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    with pytest.raises(BadSample):
        prompt_ids(tokenizer=tokenizer, question="<image><image>", image_token_counts=[1])


def test_answer_text_stops_at_im_end_and_keeps_grounding_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = SpecialIds.of(tokenizer)
    generated = (_ids(tokenizer, f"{THINK_START}left{THINK_END}<box>[1, 20, 300, 999]</box>") + [ids.vision_start]
                 + _ids(tokenizer, " ok") + [ids.im_end] + _ids(tokenizer, "garbage <point>[1, 2]</point>"))
    assert answer_text(tokenizer, generated) == "<think>left</think><box>[1, 20, 300, 999]</box> ok"
    assert answer_text(tokenizer, torch.tensor(_ids(tokenizer, "2"))) == "2"


# ---------------------------------------------------------------------------------------------------
# packing.py
# ---------------------------------------------------------------------------------------------------

PAD_ID = 0


def _fake_sample(index: int, length: int, num_images: int = 0) -> EncodedSample:
    """A sample whose ids identify it (1000 * (index + 1) + position) and whose labels are its ids."""
    input_ids = [1000 * (index + 1) + position for position in range(length)]
    labels = [IGNORE_INDEX] + input_ids[1:]
    return EncodedSample(key=f"s{index}", task="t", input_ids=input_ids, labels=labels,
                         image_token_counts=[1] * num_images, media=[f"m{index}.{i}" for i in range(num_images)],
                         num_turns=1)


def _random_samples(count: int, max_length: int, seed: int) -> list[EncodedSample]:
    rng = random.Random(seed)
    return [_fake_sample(index, rng.randint(1, max_length), rng.randint(0, 3)) for index in range(count)]


def _segments(pack: Pack) -> list[tuple[int, int]]:
    """(start, end) of every position run of the pack."""
    starts = [index for index, position in enumerate(pack.position_ids.tolist()) if position == 0]
    return list(zip(starts, starts[1:] + [pack.num_tokens]))


def test_packs_hold_every_sample_once_in_full_within_caps() -> None:
    samples = _random_samples(200, 60, seed=1)
    packs = list(pack_stream(samples, max_tokens=128, max_images=5, pad_id=PAD_ID, buffer_size=8))
    seen = [sample.key for pack in packs for sample in pack.samples]
    assert sorted(seen) == sorted(sample.key for sample in samples) and len(seen) == len(set(seen))
    for pack in packs:
        assert pack.num_tokens == 128 and pack.num_images <= 5
        assert pack.num_padding == 128 - sum(sample.length for sample in pack.samples)
        segments = _segments(pack)
        for sample, (start, end) in zip(pack.samples, segments):
            assert pack.input_ids[start:end].tolist() == sample.input_ids
            assert pack.labels[start:end].tolist() == sample.labels
            assert pack.position_ids[start:end].tolist() == list(range(sample.length))
        assert pack.image_token_counts == [c for sample in pack.samples for c in sample.image_token_counts]
        assert pack.media == [m for sample in pack.samples for m in sample.media]
        if pack.num_padding:
            assert len(segments) == len(pack.samples) + 1
            tail = slice(pack.num_tokens - pack.num_padding, None)
            assert pack.position_ids[tail].tolist() == list(range(pack.num_padding))
            assert set(pack.labels[tail].tolist()) == {IGNORE_INDEX}
            assert set(pack.input_ids[tail].tolist()) == {PAD_ID}
        else:
            assert len(segments) == len(pack.samples)


def test_packing_is_deterministic() -> None:
    samples = _random_samples(100, 50, seed=2)
    first = [[s.key for s in pack.samples] for pack in pack_stream(samples, max_tokens=100, max_images=4, pad_id=0)]
    second = [[s.key for s in pack.samples] for pack in pack_stream(samples, max_tokens=100, max_images=4, pad_id=0)]
    assert first == second


def test_packer_starts_with_oldest_then_best_fit() -> None:
    packer = Packer(max_tokens=10, max_images=10, pad_id=PAD_ID, buffer_size=4)
    samples = [_fake_sample(0, 3), _fake_sample(1, 2), _fake_sample(2, 6), _fake_sample(3, 5)]
    assert [packer.add(sample) for sample in samples[:3]] == [[], [], []]
    [pack] = packer.add(samples[3])
    assert [sample.key for sample in pack.samples] == ["s0", "s2"]  # 3 + 6; then nothing of 2 or 5 fits in 1
    [rest] = packer.flush()
    assert [sample.key for sample in rest.samples] == ["s1", "s3"]
    assert packer.flush() == []


def _first_come_padding(lengths: list[int], max_tokens: int) -> float:
    """Padding fraction of greedy in-order packing: close a pack when the next sample does not fit."""
    packs, used = 0, max_tokens + 1
    for length in lengths:
        if used + length > max_tokens:
            packs, used = packs + 1, 0
        used += length
    return 1 - sum(lengths) / (packs * max_tokens)


def test_best_fit_pads_less_than_first_come_packing() -> None:
    samples = _random_samples(400, 700, seed=3)
    packs = list(pack_stream(samples, max_tokens=1024, max_images=1000, pad_id=PAD_ID, buffer_size=16))
    best_fit = padding_fraction(packs)
    assert best_fit < _first_come_padding([sample.length for sample in samples], 1024)
    assert best_fit == sum(p.num_padding for p in packs) / (1024 * len(packs))


def test_packer_rejects_oversized_samples() -> None:
    packer = Packer(max_tokens=10, max_images=2, pad_id=PAD_ID)
    with pytest.raises(ValueError, match="tokens"):
        packer.add(_fake_sample(0, 11))
    with pytest.raises(ValueError, match="images"):
        packer.add(_fake_sample(1, 5, num_images=3))


def test_collate_stacks_packs() -> None:
    packs = list(pack_stream(_random_samples(20, 30, seed=4), max_tokens=64, max_images=10, pad_id=PAD_ID))
    batch = collate(packs)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    for tensor in batch.values():
        assert tensor.shape == (len(packs), 64) and tensor.dtype == torch.long
    assert padding_fraction([]) == 0.0


def _tiny_qwen3_moe(attn_implementation: str) -> torch.nn.Module:
    from components.common.torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2)
    config._attn_implementation = attn_implementation
    return Qwen3MoeForCausalLM(config).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_equal_separate_runs_in_qwen3_moe(attn_implementation: str) -> None:
    model = _tiny_qwen3_moe(attn_implementation)
    lengths = [7, 12, 5]
    samples = [EncodedSample(key=f"s{i}", task="t", input_ids=torch.randint(1, 300, (n,)).tolist(),
                             labels=[IGNORE_INDEX] * n, image_token_counts=[]) for i, n in enumerate(lengths)]
    [pack] = list(pack_stream(samples, max_tokens=32, max_images=0, pad_id=PAD_ID, buffer_size=8))
    assert pack.num_padding == 8
    batch = collate([pack])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        one_sequence = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        for index, (sample, (start, end)) in enumerate(zip(pack.samples, _segments(pack))):
            alone = model(input_ids=torch.tensor([sample.input_ids]),
                          position_ids=torch.arange(sample.length)[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=1e-5)
            if index > 0:  # control: without restarting positions, later samples see earlier ones
                assert (one_sequence[start:end] - alone).abs().max() > 1e-3
