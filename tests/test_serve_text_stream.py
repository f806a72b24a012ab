"""Tests of streamed text (components/generation/text_stream.py) with a real byte-level BPE trained here:
streamed pieces concatenate to the full decode (multi-byte characters split across ids included),
grounding boxes survive, skip ids vanish, the decode window stays short, stop strings across piece
boundaries, and routing of ids to the reasoning and content channels."""

from __future__ import annotations

import random
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from components.generation.text_stream import (
    CONTENT,
    REASONING,
    REPLACEMENT_CHAR,
    IncrementalDecoder,
    ReasoningSplitter,
    StopMatcher,
)
from components.vlm.tokenizer import (
    BOX_END,
    BOX_START,
    END_OF_TEXT,
    IM_END,
    PAD,
    THINK_END,
    THINK_START,
    single_id_of,
    train_tokenizer,
)

SENTENCES = [
    "The cat sat on the mat near the open window.",
    "A red circle and a blue square on a white background.",
    "Café au lait, s'il vous plaît: très bien, merci beaucoup.",
    "Crème brûlée and piñata at the façade of the hôtel.",
    "中文文本测试，你好世界。",
    "图片中有一只猫和一只狗。",
    "Emoji time 😀🎉 is fun 🚀 and 👍🏽 too.",
    "Grounding: the dog is at <box>[12, 34, 56, 78]</box> in the image.",
    "Point to it: <point>[500, 250]</point> and done.",
    "<think>First count the shapes, then answer.</think> There are 3 shapes.",
    "Numbers like 1234567890 are spelled digit by digit.",
    "Video frames at [12.4 second] show a moving car.",
]
UNSEEN_CHARS = ("𝄞", "ж", "☃")  # not in SENTENCES: 4, 2 and 3 bytes, spelled one id per byte


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(SENTENCES * 3, vocab_size=400)


@pytest.fixture(scope="module")
def skip_ids(tokenizer: PreTrainedTokenizerFast) -> set[int]:
    return {_id(tokenizer, token) for token in (PAD, IM_END, END_OF_TEXT)}


def _id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = single_id_of(tokenizer, token)
    assert token_id is not None
    return token_id


def _full_decode(tokenizer: PreTrainedTokenizerFast, ids: list[int], skip_ids: set[int]) -> str:
    kept = [i for i in ids if i not in skip_ids]
    return tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _stream(tokenizer: Any, ids: list[int], skip_ids: set[int]) -> list[str]:
    """The pieces a decoder releases for `ids`, the flushed rest last."""
    decoder = IncrementalDecoder(tokenizer, skip_ids)
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


def _encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------
# IncrementalDecoder
# ---------------------------------------------------------------------------------------------------

def test_tokenizer_splits_non_ascii_characters_into_several_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    # the premise of the hold-back tests: characters the tokenizer never saw are spelled byte by byte
    for char in UNSEEN_CHARS:
        assert len(_encode(tokenizer, char)) > 1, char


@pytest.mark.parametrize("text", SENTENCES)
def test_streamed_pieces_concatenate_to_the_text(tokenizer: PreTrainedTokenizerFast, skip_ids: set[int],
                                                  text: str) -> None:
    pieces = _stream(tokenizer, _encode(tokenizer, text), skip_ids)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_incomplete_character_is_held_back_until_complete(tokenizer: PreTrainedTokenizerFast,
                                                          skip_ids: set[int]) -> None:
    ids = _encode(tokenizer, "ok 𝄞")
    char_ids = _encode(tokenizer, "𝄞")
    assert ids[-len(char_ids):] == char_ids and len(char_ids) == 4  # one id per byte
    pieces = _stream(tokenizer, ids, skip_ids)
    assert pieces[-5:] == ["", "", "", "𝄞", ""]  # the leading bytes give nothing; the last byte the character


def test_random_id_sequences_stream_to_the_full_decode(tokenizer: PreTrainedTokenizerFast,
                                                       skip_ids: set[int]) -> None:
    rng = random.Random(0)
    vocab = list(range(len(tokenizer)))
    multibyte = [i for text in ("中文", "😀🎉", "é", "ñ", *UNSEEN_CHARS) for i in _encode(tokenizer, text)]
    for _ in range(150):
        pool = multibyte if rng.random() < 0.5 else vocab  # byte pieces of multi-byte characters, cut anywhere
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        assert "".join(_stream(tokenizer, ids, skip_ids)) == _full_decode(tokenizer, ids, skip_ids), ids


def test_pieces_never_end_in_a_partial_character_before_the_flush(tokenizer: PreTrainedTokenizerFast,
                                                                  skip_ids: set[int]) -> None:
    rng = random.Random(1)
    multibyte = [i for text in ("中文", "😀🎉", "é", *UNSEEN_CHARS) for i in _encode(tokenizer, text)]
    for _ in range(50):
        pieces = _stream(tokenizer, [rng.choice(multibyte) for _ in range(20)], skip_ids)
        assert not any(piece.endswith(REPLACEMENT_CHAR) for piece in pieces[:-1])


def test_box_and_other_answer_tokens_survive(tokenizer: PreTrainedTokenizerFast, skip_ids: set[int]) -> None:
    text = "The dog is at <box>[1, 2, 3, 4]</box> and <point>[5, 6]</point>."
    ids = _encode(tokenizer, text)
    assert _id(tokenizer, BOX_START) in ids and _id(tokenizer, BOX_END) in ids
    assert "".join(_stream(tokenizer, ids, skip_ids)) == text


def test_skip_ids_never_reach_the_text(tokenizer: PreTrainedTokenizerFast, skip_ids: set[int]) -> None:
    im_end, pad = _id(tokenizer, IM_END), _id(tokenizer, PAD)
    ids = [pad] + _encode(tokenizer, "中文☃") + [im_end, pad]
    pieces = _stream(tokenizer, ids, skip_ids)
    assert "".join(pieces) == "中文☃"
    assert pieces[-3:] == ["", "", ""]  # im_end, pad, flush


def test_skip_id_between_the_bytes_of_a_character_is_ignored(tokenizer: PreTrainedTokenizerFast,
                                                             skip_ids: set[int]) -> None:
    first, *rest = _encode(tokenizer, "☃")
    ids = [first, _id(tokenizer, PAD), *rest]
    assert "".join(_stream(tokenizer, ids, skip_ids)) == "☃"


def test_flush_releases_an_incomplete_tail_like_a_full_decode(tokenizer: PreTrainedTokenizerFast,
                                                              skip_ids: set[int]) -> None:
    ids = _encode(tokenizer, "hi ☃")[:-1]  # the last byte of ☃ missing
    decoder = IncrementalDecoder(tokenizer, skip_ids)
    pushed = "".join(decoder.push(token_id) for token_id in ids)
    tail = decoder.flush()
    assert tail.endswith(REPLACEMENT_CHAR) and REPLACEMENT_CHAR not in pushed
    assert pushed + tail == _full_decode(tokenizer, ids, skip_ids)
    assert decoder.flush() == ""


def test_decoder_goes_on_after_a_flush(tokenizer: PreTrainedTokenizerFast, skip_ids: set[int]) -> None:
    decoder = IncrementalDecoder(tokenizer, skip_ids)
    first = "".join(decoder.push(i) for i in _encode(tokenizer, "très ")) + decoder.flush()
    second = "".join(decoder.push(i) for i in _encode(tokenizer, "bien")) + decoder.flush()
    assert (first, second) == ("très ", "bien")


class _CountingTokenizer:
    """Records the length of every id list the decoder decodes."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        self.lengths.append(len(token_ids))
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens,
                                     clean_up_tokenization_spaces=clean_up_tokenization_spaces)


def test_decode_window_stays_short_for_long_outputs(tokenizer: PreTrainedTokenizerFast,
                                                    skip_ids: set[int]) -> None:
    counting = _CountingTokenizer(tokenizer)
    text = " ".join(SENTENCES) * 8
    ids = _encode(tokenizer, text)
    assert len(ids) > 1000
    assert "".join(_stream(counting, ids, skip_ids)) == text
    assert max(counting.lengths) <= 8  # a piece and its context, never the whole output


# ---------------------------------------------------------------------------------------------------
# StopMatcher
# ---------------------------------------------------------------------------------------------------

def _match(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool]:
    """The emitted pieces (the flush last, when no stop hit) and whether a stop was hit."""
    matcher = StopMatcher(stops)
    emitted: list[str] = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        emitted.append(text)
        if stopped:
            return emitted, True
    return emitted + [matcher.flush()], False


def _reference(stops: tuple[str, ...], text: str) -> tuple[str, bool]:
    """Character by character: stop at the first end of any stop string, dropping the longest."""
    for end in range(1, len(text) + 1):
        ending = [stop for stop in stops if text[:end].endswith(stop)]
        if ending:
            return text[:end - max(len(stop) for stop in ending)], True
    return text, False


def test_no_stops_passes_text_through() -> None:
    assert _match((), ["a", "bc", ""]) == (["a", "bc", "", ""], False)


def test_stop_within_one_piece_drops_it_and_the_rest() -> None:
    emitted, stopped = _match(("END",), ["hello END world", "more"])
    assert (emitted, stopped) == (["hello "], True)


def test_stop_spanning_piece_boundaries() -> None:
    emitted, stopped = _match(("</answer>",), ["The answer is 4</", "ans", "wer> trailing"])
    assert stopped and "".join(emitted) == "The answer is 4"
    assert emitted[0] == "The answer is 4"  # "</" held back, the text before released at once
    assert emitted[1] == ""


def test_stop_at_the_very_start() -> None:
    assert _match(("Hi",), ["Hi there"]) == ([""], True)
    assert _match(("Hi",), ["H", "i there"]) == (["", ""], True)


def test_partial_match_that_fails_is_released() -> None:
    emitted, stopped = _match(("STOP",), ["ST", "OX", "!"])
    assert not stopped and emitted == ["", "STOX", "!", ""]


def test_held_text_comes_back_on_flush() -> None:
    matcher = StopMatcher(("###",))
    assert matcher.push("done #") == ("done ", False)
    assert matcher.push("#") == ("", False)
    assert matcher.flush() == "##"
    assert matcher.flush() == ""


def test_overlapping_stop_prefixes() -> None:
    # "aab": after "aa" the held text must still allow the match starting at the second "a"
    assert _match(("aab",), ["a", "a", "a", "b", "c"]) == (["", "", "a", "", ], True)
    # several stops sharing a prefix; the first to complete wins
    assert _match(("abcd", "bc"), ["xab", "c", "d"]) == (["x", "a"], True)
    # two stops ending at the same character: the longer one is dropped whole
    assert "".join(_match(("cd", "bcd"), ["abcd"])[0]) == "a"


def test_pushes_after_a_stop_emit_nothing() -> None:
    matcher = StopMatcher(("x",))
    assert matcher.push("ax") == ("a", True)
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == "" and matcher.stopped


def test_result_does_not_depend_on_how_text_is_cut() -> None:
    rng = random.Random(2)
    for _ in range(300):
        text = "".join(rng.choice("abc中") for _ in range(rng.randint(0, 30)))
        stops = tuple({"".join(rng.choice("abc中") for _ in range(rng.randint(1, 4)))
                       for _ in range(rng.randint(1, 4))})
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        emitted, stopped = _match(stops, pieces)
        assert ("".join(emitted), stopped) == _reference(stops, text), (stops, pieces)


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(("ok", ""))


# ---------------------------------------------------------------------------------------------------
# ReasoningSplitter
# ---------------------------------------------------------------------------------------------------

def _route(tokenizer: PreTrainedTokenizerFast, skip_ids: set[int], ids: list[int],
           splitter: ReasoningSplitter) -> dict[str, str]:
    """Both channels' text, each through its own decoder."""
    decoders = {REASONING: IncrementalDecoder(tokenizer, skip_ids), CONTENT: IncrementalDecoder(tokenizer, skip_ids)}
    texts = {REASONING: "", CONTENT: ""}
    for token_id in ids:
        channel = splitter.channel(token_id)
        if channel is not None:
            texts[channel] += decoders[channel].push(token_id)
    return {channel: texts[channel] + decoders[channel].flush() for channel in texts}


@pytest.fixture(scope="module")
def think_splitter_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int]:
    return _id(tokenizer, THINK_START), _id(tokenizer, THINK_END)


def test_reasoning_between_markers(tokenizer: PreTrainedTokenizerFast, skip_ids: set[int],
                                   think_splitter_ids: tuple[int, int]) -> None:
    ids = _encode(tokenizer, "<think>Count: 中 ☃ 3.</think>There are 3.") + [_id(tokenizer, IM_END)]
    texts = _route(tokenizer, skip_ids, ids, ReasoningSplitter(*think_splitter_ids))
    assert texts == {REASONING: "Count: 中 ☃ 3.", CONTENT: "There are 3."}


def test_no_markers_is_all_content(tokenizer: PreTrainedTokenizerFast, skip_ids: set[int],
                                   think_splitter_ids: tuple[int, int]) -> None:
    ids = _encode(tokenizer, "Just the answer <box>[1, 2, 3, 4]</box>.")
    texts = _route(tokenizer, skip_ids, ids, ReasoningSplitter(*think_splitter_ids))
    assert texts == {REASONING: "", CONTENT: "Just the answer <box>[1, 2, 3, 4]</box>."}


def test_stray_think_end_is_dropped_and_stays_content(tokenizer: PreTrainedTokenizerFast, skip_ids: set[int],
                                                      think_splitter_ids: tuple[int, int]) -> None:
    splitter = ReasoningSplitter(*think_splitter_ids)
    ids = _encode(tokenizer, "before</think>after")
    assert _route(tokenizer, skip_ids, ids, splitter) == {REASONING: "", CONTENT: "beforeafter"}
    assert not splitter.in_reasoning


def test_unclosed_think_is_all_reasoning(tokenizer: PreTrainedTokenizerFast, skip_ids: set[int],
                                         think_splitter_ids: tuple[int, int]) -> None:
    splitter = ReasoningSplitter(*think_splitter_ids)
    ids = _encode(tokenizer, "<think>still thinking")
    assert _route(tokenizer, skip_ids, ids, splitter) == {REASONING: "still thinking", CONTENT: ""}
    assert splitter.in_reasoning


def test_channel_of_each_id(think_splitter_ids: tuple[int, int]) -> None:
    start, end = think_splitter_ids
    splitter = ReasoningSplitter(start, end)
    channels = [splitter.channel(i) for i in (100, end, 101, start, 102, start, 103, end, 104)]
    assert channels == [CONTENT, None, CONTENT, None, REASONING, None, REASONING, None, CONTENT]


def test_without_marker_ids_everything_is_content(think_splitter_ids: tuple[int, int]) -> None:
    start, end = think_splitter_ids
    splitter = ReasoningSplitter(None, None)
    assert [splitter.channel(i) for i in (start, 100, end)] == [CONTENT, CONTENT, CONTENT]
