"""Tests of the one generation engine (components/generation/engine.py) on a tiny random-weight export, no
Ray: greedy decoding equals Hugging Face's `generate` on the same embedded prompts (text and images,
left-padded batches), the evaluation's answers through the engine equal those of that greedy decoding,
returned log-probs equal a teacher-forced forward pass, `n` samples per prompt, a row decodes the
same alone and in any batch, seeded top-p sampling repeats and ignores its batch companions, the banned
structure ids are never sampled, token limits, stop strings, the end token (forced by swapping rows of an
untied LM head), and the reasoning/content split."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from components.common.coords import answer_in_pixels
from components.generation.engine import Delta, GenerationEngine, GenerationInput, SamplingParams
from components.vlm.conversation import answer_text, prompt_ids
from components.vlm.data import image_token_count, images_to_vit_input
from components.vlm.tokenizer import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    IMAGE_PLACEHOLDER,
    PAD,
    THINK_END,
    THINK_START,
    VIDEO_PLACEHOLDER,
    VISION_END,
    VISION_START,
    single_id_of,
)
from vlm_exports import VIT, write_random_export

QUESTIONS = ["hi", "Describe the image.",
             "How many purple triangles are there? Please count them carefully and say the number."]


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_export(tmp_path_factory.mktemp("engine") / "model")


@pytest.fixture(scope="module")
def loaded(export: Path) -> tuple[Any, Any]:
    from components.vlm.model import load_vlm

    model, tokenizer, _ = load_vlm(export)
    return model, tokenizer


@pytest.fixture(scope="module")
def engine(loaded: tuple[Any, Any]) -> GenerationEngine:
    return GenerationEngine(*loaded)


@pytest.fixture(scope="module")
def tokenizer(loaded: tuple[Any, Any]) -> Any:
    return loaded[1]


def fresh_model_with_untied_head(export: Path) -> tuple[Any, Any]:
    """A separate copy of the export whose LM head no longer shares its weight with the input embeddings,
    so output rows can be edited without changing how prompts are embedded."""
    from components.vlm.model import load_vlm

    model, tokenizer, _ = load_vlm(export)
    head = model.llm.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    assert head.weight.data_ptr() != model.llm.get_input_embeddings().weight.data_ptr()
    return model, tokenizer


def swap_head_rows(model: Any, a: int, b: int) -> None:
    """Exchange the output rows of ids a and b: wherever one was the argmax, the other is now."""
    with torch.no_grad():
        weight = model.llm.get_output_embeddings().weight
        weight[[a, b]] = weight[[b, a]].clone()


def picture(color: tuple[int, int, int], size: tuple[int, int] = (84, 56)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], 255 - color[1], 255 - color[2]), (10, 10, 40, 40))
    return image


def text_input(tokenizer: Any, question: str, **sampling: Any) -> GenerationInput:
    ids, _ = prompt_ids(tokenizer=tokenizer, question=question, image_token_counts=[])
    return GenerationInput(ids, None, None, SamplingParams(**sampling))


def image_input(tokenizer: Any, question: str, images: list[Image.Image], **sampling: Any) -> GenerationInput:
    text = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + question
    ids, used = prompt_ids(tokenizer=tokenizer, question=text,
                           image_token_counts=[image_token_count(image, VIT) for image in images])
    assert len(used) == len(images)
    packed = images_to_vit_input(images, VIT)
    return GenerationInput(ids, packed.pixel_values, packed.grid_hw, SamplingParams(**sampling))


def decode(engine: GenerationEngine, items: list[GenerationInput],
           ) -> tuple[list[list[int]], list[list[Delta]], list[list[Delta | None]]]:
    """Run start/step to the end: per row the tokens it was handed (end token included), its deltas, and
    the raw per-step outputs (None once finished)."""
    batch = engine.start(items)
    tokens: list[list[int]] = [[] for _ in items]
    deltas: list[list[Delta]] = [[] for _ in items]
    raw: list[list[Delta | None]] = [[] for _ in items]
    for _ in range(10_000):
        live = [not row.finished for row in batch.rows]
        sampled = batch.next_tokens.tolist()
        out = engine.step(batch)
        assert len(out) == len(items)
        for index, delta in enumerate(out):
            raw[index].append(delta)
            if live[index]:
                assert delta is not None
                tokens[index].append(int(sampled[index]))
                deltas[index].append(delta)
            else:
                assert delta is None
        if batch.done:
            return tokens, deltas, raw
    raise AssertionError("the batch never finished")


def content_of(deltas: list[Delta]) -> str:
    return "".join(delta.content for delta in deltas)


def reasoning_of(deltas: list[Delta]) -> str:
    return "".join(delta.reasoning for delta in deltas)


def expected_text(engine: GenerationEngine, tokenizer: Any, tokens: list[int]) -> str:
    """What the engine's decoders make of `tokens` (its skip ids dropped, the rest decoded as a whole)."""
    kept = [t for t in tokens if t not in engine.skip_ids]
    return tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def unbanned(model: Any, tokenizer: Any) -> GenerationEngine:
    engine = GenerationEngine(model, tokenizer)
    engine.banned = engine.banned[:0]
    return engine


@torch.no_grad()
def hf_greedy(model: Any, prompts: list[list[int]], pixel_values: torch.Tensor | None, grid_hw: torch.Tensor | None,
              max_new_tokens: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """The reference: Hugging Face's greedy `generate` over the left-padded prompts' embeddings."""
    longest = max(len(ids) for ids in prompts)
    padded = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, ids in enumerate(prompts):
        padded[row, longest - len(ids):] = torch.tensor(ids)
        mask[row, longest - len(ids):] = 1
    embeds = model.embed(padded, pixel_values, grid_hw)
    output = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id, output_router_logits=False)
    return [row.tolist() for row in output]


def cut_at_end(tokens: list[int], end_ids: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in end_ids:
            return tokens[:position + 1]
    return tokens


def first_new_token(tokens: list[int], start: int, avoid: set[int]) -> int:
    """The first position >= start whose token has not occurred before it and is not in `avoid`."""
    for position in range(start, len(tokens)):
        if tokens[position] not in avoid and tokens[position] not in tokens[:position]:
            return position
    raise AssertionError(f"no fresh token from position {start} in {tokens}")


# ---------------------------------------------------------------------------------------------------
# Ids the engine treats specially
# ---------------------------------------------------------------------------------------------------

def test_banned_and_end_ids(engine: GenerationEngine, tokenizer: Any) -> None:
    ids = {token: single_id_of(tokenizer, token) for token in
           (IMAGE_PAD, VISION_START, VISION_END, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, IM_START, PAD, IM_END,
            END_OF_TEXT)}
    assert None not in ids.values()
    assert set(engine.banned.tolist()) == {ids[t] for t in (IMAGE_PAD, VISION_START, VISION_END, IMAGE_PLACEHOLDER,
                                                            VIDEO_PLACEHOLDER, IM_START)}
    # pad is never *sampled as text*: it is an end id (it ends the row) rather than a banned one
    assert engine.end_ids == {ids[PAD], ids[IM_END], ids[END_OF_TEXT]}
    assert engine.think_ids == (single_id_of(tokenizer, THINK_START), single_id_of(tokenizer, THINK_END))
    assert engine.context_limit == 4096


# ---------------------------------------------------------------------------------------------------
# Greedy decoding
# ---------------------------------------------------------------------------------------------------

def test_greedy_tokens_equal_model_generate_with_and_without_images(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    engine = unbanned(model, tokenizer)  # HF generate bans nothing
    red, blue, tall = picture((200, 30, 30)), picture((20, 40, 220)), picture((30, 160, 60), (56, 112))
    items = [image_input(tokenizer, "Describe the image.", [red], max_tokens=16, temperature=0),
             text_input(tokenizer, "hi", max_tokens=16, temperature=0),
             image_input(tokenizer, "How many circles are there?", [blue, tall], max_tokens=16, temperature=0),
             text_input(tokenizer, QUESTIONS[2], max_tokens=16, temperature=0)]
    tokens, deltas, _ = decode(engine, items)
    pixel_values = torch.cat([item.pixel_values for item in items if item.pixel_values is not None])
    grid_hw = torch.cat([item.grid_hw for item in items if item.grid_hw is not None])
    generated = hf_greedy(model, [item.prompt_ids for item in items], pixel_values, grid_hw, 16,
                          eos_id=engine.ids.im_end, pad_id=engine.ids.pad)
    for row, (ours, theirs) in enumerate(zip(tokens, generated)):
        assert ours == cut_at_end(theirs, engine.end_ids), row
        assert deltas[row][-1].prompt_tokens == len(items[row].prompt_ids)
    # the images matter: the same prompt with another picture decodes differently
    other, _, _ = decode(engine, [image_input(tokenizer, "Describe the image.", [blue], max_tokens=16, temperature=0)])
    assert other[0] != tokens[0]
    # none of the banned ids is ever the argmax here, so the default bans change nothing
    engine_default = GenerationEngine(model, tokenizer)
    assert not set(engine_default.banned.tolist()) & {t for row in tokens for t in row}
    assert decode(engine_default, items)[0] == tokens


def test_a_prompt_decodes_the_same_alone_and_in_any_batch(engine: GenerationEngine, tokenizer: Any) -> None:
    def items() -> list[GenerationInput]:
        return [text_input(tokenizer, question, max_tokens=20, temperature=0) for question in QUESTIONS] + [
            image_input(tokenizer, "What is shown in this picture?", [picture((90, 90, 10))], max_tokens=20,
                        temperature=0)]

    together, _, _ = decode(engine, items())
    lengths = [len(item.prompt_ids) for item in items()]
    assert len(set(lengths)) == len(lengths)  # left padding differs per row
    for index in range(len(lengths)):
        alone, _, _ = decode(engine, [items()[index]])
        assert alone[0] == together[index], index
    reordered, _, _ = decode(engine, items()[::-1])
    assert reordered[::-1] == together


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------

def test_seeded_sampling_repeats_and_ignores_batch_companions(engine: GenerationEngine, tokenizer: Any) -> None:
    def sampled(question: str, seed: int) -> GenerationInput:
        return text_input(tokenizer, question, max_tokens=24, temperature=1.0, top_p=0.9, seed=seed)

    question = QUESTIONS[1]
    first, first_deltas, _ = decode(engine, [sampled(question, 7)])
    again, again_deltas, _ = decode(engine, [sampled(question, 7)])
    assert again == first and content_of(again_deltas[0]) == content_of(first_deltas[0])
    companions = [text_input(tokenizer, QUESTIONS[2], max_tokens=30, temperature=0.7, seed=123),
                  sampled(question, 7),
                  text_input(tokenizer, QUESTIONS[0], max_tokens=5, temperature=0)]
    in_batch, _, _ = decode(engine, companions)
    assert in_batch[1] == first[0]
    other_seed, _, _ = decode(engine, [sampled(question, 8)])
    assert other_seed[0] != first[0]
    greedy, _, _ = decode(engine, [text_input(tokenizer, question, max_tokens=24, temperature=0)])
    assert first[0] != greedy[0]  # temperature 1 actually samples


def test_unseeded_rows_draw_fresh_seeds(engine: GenerationEngine, tokenizer: Any) -> None:
    runs = {tuple(decode(engine, [text_input(tokenizer, QUESTIONS[1], max_tokens=24, temperature=1.0)])[0][0])
            for _ in range(3)}
    assert len(runs) > 1


def test_a_tiny_top_p_is_greedy(engine: GenerationEngine, tokenizer: Any) -> None:
    greedy, _, _ = decode(engine, [text_input(tokenizer, q, max_tokens=20, temperature=0) for q in QUESTIONS])
    for seed in (1, 2):
        nucleus, _, _ = decode(engine, [text_input(tokenizer, q, max_tokens=20, temperature=1.0, top_p=1e-6, seed=seed)
                                        for q in QUESTIONS])
        assert nucleus == greedy


def test_sample_never_picks_a_banned_id_even_when_it_dominates(engine: GenerationEngine, tokenizer: Any) -> None:
    banned = engine.banned.tolist()
    rows = [engine._row(text_input(tokenizer, "hi", max_tokens=4, temperature=t, seed=seed))
            for seed, t in enumerate((0.0, 0.5, 1.0, 2.0, 1.0, 2.0))]
    vocab = engine.model.llm.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    seen: collections.Counter[int] = collections.Counter()
    for _ in range(200):
        logits = torch.randn(len(rows), vocab, generator=generator)
        logits[:, banned] = 12.0 + torch.rand(len(rows), len(banned), generator=generator)
        tokens = engine._sample(logits, rows)[0].tolist()
        seen.update(tokens)
    assert not set(seen) & set(banned)
    assert len(seen) > 20  # the draws do spread over the rest of the vocabulary


def test_banned_ids_are_never_generated_where_the_model_prefers_them(export: Path) -> None:
    model, tokenizer = fresh_model_with_untied_head(export)
    engine = GenerationEngine(model, tokenizer)
    banned = engine.banned.tolist()
    greedy, _, _ = decode(engine, [text_input(tokenizer, q, max_tokens=24, temperature=0) for q in QUESTIONS])
    popular = [t for t, _ in collections.Counter(t for row in greedy for t in row).most_common()
               if t not in engine.skip_ids][:len(banned)]
    for banned_id, favourite in zip(banned, popular):
        swap_head_rows(model, banned_id, favourite)  # the banned id now scores where the favourite did

    def many_draws(engine: GenerationEngine) -> list[int]:
        items = [text_input(tokenizer, q, max_tokens=24, temperature=1.0, seed=seed)
                 for seed in range(4) for q in QUESTIONS]
        items += [text_input(tokenizer, q, max_tokens=24, temperature=0) for q in QUESTIONS]
        tokens, _, _ = decode(engine, items)
        return [t for row in tokens for t in row]

    without_bans = many_draws(unbanned(model, tokenizer))
    assert set(without_bans) & set(banned), "the edited model should want the banned ids"
    with_bans = many_draws(engine)
    assert not set(with_bans) & set(banned)
    assert len(with_bans) > 200


# ---------------------------------------------------------------------------------------------------
# Token limits, text and stop strings
# ---------------------------------------------------------------------------------------------------

def test_max_tokens_length_counts_and_text(engine: GenerationEngine, tokenizer: Any) -> None:
    limits = (1, 7, 24)
    items = [text_input(tokenizer, q, max_tokens=n, temperature=0) for q, n in zip(QUESTIONS, limits)]
    tokens, deltas, raw = decode(engine, items)
    for row, limit in enumerate(limits):
        assert not set(tokens[row]) & engine.end_ids  # this random model never ends these prompts by itself
        assert len(tokens[row]) == limit
        assert [d.completion_tokens for d in deltas[row]] == list(range(1, limit + 1))
        assert [d.finish_reason for d in deltas[row]] == [None] * (limit - 1) + ["length"]
        assert all(d.prompt_tokens == len(items[row].prompt_ids) for d in deltas[row])
        assert content_of(deltas[row]) == expected_text(engine, tokenizer, tokens[row])
        assert reasoning_of(deltas[row]) == ""
        assert raw[row][limit:] == [None] * (max(limits) - limit)  # finished rows report None


def test_stop_string_cuts_the_content(engine: GenerationEngine, tokenizer: Any) -> None:
    question = QUESTIONS[1]
    tokens, deltas, _ = decode(engine, [text_input(tokenizer, question, max_tokens=24, temperature=0)])
    text = content_of(deltas[0])
    assert deltas[0][-1].finish_reason == "length"
    start = next(i for i in range(4, len(text) - 3) if text[i:i + 3].isascii() and text[i:i + 3].strip())
    stop = text[start:start + 3]
    for stops in ((stop,), ("never in this text \u2603", stop)):
        cut_tokens, cut, _ = decode(engine, [text_input(tokenizer, question, max_tokens=24, temperature=0,
                                                        stop=stops)])
        assert content_of(cut[0]) == text[:text.index(stop)]
        assert cut[0][-1].finish_reason == "stop"
        assert cut_tokens[0] == tokens[0][:len(cut_tokens[0])]
        assert len(cut_tokens[0]) < len(tokens[0])
        assert cut[0][-1].completion_tokens == len(cut_tokens[0])
    # a stop string that never appears changes nothing
    same_tokens, same, _ = decode(engine, [text_input(tokenizer, question, max_tokens=24, temperature=0,
                                                      stop=("\u2603\u2603",))])
    assert same_tokens == tokens and content_of(same[0]) == text and same[0][-1].finish_reason == "length"


# ---------------------------------------------------------------------------------------------------
# The end token and the reasoning split, forced by editing an untied LM head
# ---------------------------------------------------------------------------------------------------

def test_end_token_finishes_its_row_while_the_others_go_on(export: Path) -> None:
    model, tokenizer = fresh_model_with_untied_head(export)
    engine = GenerationEngine(model, tokenizer)
    items: Callable[[], list[GenerationInput]] = lambda: [  # noqa: E731
        text_input(tokenizer, q, max_tokens=20, temperature=0) for q in QUESTIONS]
    before, _, _ = decode(engine, items())
    others = {t for row in before[1:] for t in row}
    position = first_new_token(before[0], 3, engine.skip_ids | others)
    swap_head_rows(model, engine.ids.im_end, before[0][position])
    after, deltas, raw = decode(engine, items())
    assert after[0] == before[0][:position] + [engine.ids.im_end]
    assert deltas[0][-1].finish_reason == "stop"
    assert [d.finish_reason for d in deltas[0][:-1]] == [None] * position
    assert deltas[0][-1].completion_tokens == position + 1
    assert content_of(deltas[0]) == expected_text(engine, tokenizer, before[0][:position])
    assert raw[0][position + 1:] == [None] * (20 - position - 1)
    assert after[1:] == before[1:]
    assert [deltas[r][-1].finish_reason for r in (1, 2)] == ["length", "length"]


def test_reasoning_and_content_channels_from_the_model(export: Path) -> None:
    model, tokenizer = fresh_model_with_untied_head(export)
    engine = GenerationEngine(model, tokenizer)
    think_start, think_end = engine.think_ids
    item: Callable[[], GenerationInput] = lambda: text_input(  # noqa: E731
        tokenizer, QUESTIONS[1], max_tokens=20, temperature=0)
    original = decode(engine, [item()])[0][0]
    swap_head_rows(model, think_start, original[0])  # the first token is now <think>
    opened = decode(engine, [item()])[0][0]
    assert opened[0] == think_start
    position = first_new_token(opened, 3, engine.skip_ids | {original[0]})
    swap_head_rows(model, think_end, opened[position])  # ... and </think> a few tokens later
    tokens, deltas, _ = decode(engine, [item()])
    assert tokens[0][:position] == opened[:position] and tokens[0][position] == think_end
    assert reasoning_of(deltas[0]) == expected_text(engine, tokenizer, tokens[0][1:position])
    assert content_of(deltas[0]) == expected_text(engine, tokenizer, tokens[0][position + 1:])
    assert reasoning_of(deltas[0]) and content_of(deltas[0])
    assert deltas[0][-1].finish_reason == "length" and deltas[0][-1].completion_tokens == 20
    # markers produce no text of their own
    assert deltas[0][0].reasoning == deltas[0][0].content == ""
    assert deltas[0][position].content == ""


def _advance_all(engine: GenerationEngine, tokenizer: Any, ids: list[int], **sampling: Any) -> list[Delta]:
    row = engine._row(text_input(tokenizer, "hi", **sampling))
    out = []
    for token in ids:
        assert not row.finished
        out.append(engine._advance(row, token, 0.0))
    return out


def test_reasoning_split_through_advance(engine: GenerationEngine, tokenizer: Any) -> None:
    ids = tokenizer("<think>step by step</think> so the answer is 3", add_special_tokens=False)["input_ids"]
    deltas = _advance_all(engine, tokenizer, ids + [engine.ids.im_end], max_tokens=100, temperature=0)
    assert reasoning_of(deltas) == "step by step"
    assert content_of(deltas) == " so the answer is 3"
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == len(ids) + 1
    # an unclosed <think> that runs into the token limit: all reasoning, finish "length"
    open_ids = tokenizer("<think>step by step", add_special_tokens=False)["input_ids"]
    deltas = _advance_all(engine, tokenizer, open_ids, max_tokens=len(open_ids), temperature=0)
    assert reasoning_of(deltas) == "step by step" and content_of(deltas) == ""
    assert deltas[-1].finish_reason == "length"


def test_stop_string_completed_by_the_last_token_before_the_limit(engine: GenerationEngine, tokenizer: Any) -> None:
    ids = tokenizer("a red circle on a white background", add_special_tokens=False)["input_ids"]
    deltas = _advance_all(engine, tokenizer, ids, max_tokens=len(ids), temperature=0, stop=("background",))
    assert content_of(deltas) == "a red circle on a white "
    assert deltas[-1].finish_reason == "stop"
    deltas = _advance_all(engine, tokenizer, ids, max_tokens=len(ids), temperature=0, stop=("backgrounds",))
    assert content_of(deltas) == "a red circle on a white background"  # a held partial match is released
    assert deltas[-1].finish_reason == "length"


def test_box_and_point_tags_survive_in_the_content(engine: GenerationEngine, tokenizer: Any) -> None:
    text = "the dog is at <box>[733, 79, 793, 156]</box> and <point>[5, 6]</point>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas = _advance_all(engine, tokenizer, ids + [engine.ids.im_end], max_tokens=200, temperature=0)
    assert answer_text(tokenizer, ids + [engine.ids.im_end]) == text  # what evaluation reads
    assert answer_in_pixels(content_of(deltas), 1000, 1000)["boxes"]  # what the README tells clients to use
    assert content_of(deltas) == text


def test_a_tiny_temperature_is_greedy_and_does_not_break_its_batch(engine: GenerationEngine, tokenizer: Any) -> None:
    from components.generation.engine import GenerationInput, SamplingParams

    prompt = tokenizer("<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False)["input_ids"]
    rows = [GenerationInput(prompt, None, None, SamplingParams(max_tokens=6, temperature=t)) for t in (1e-40, 1e-6, 0.0)]
    batch = engine.start(rows)
    texts = ["", "", ""]
    while True:
        for index, delta in enumerate(engine.step(batch)):
            if delta is not None:
                texts[index] += delta.content
        if batch.done:
            break
    assert texts[0] == texts[1] == texts[2]


def test_a_cancelled_row_stops_decoding_and_the_others_go_on(engine: GenerationEngine, tokenizer: Any) -> None:
    from components.generation.engine import GenerationInput, SamplingParams

    prompt = tokenizer("<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False)["input_ids"]
    rows = [GenerationInput(prompt, None, None, SamplingParams(max_tokens=8, temperature=0)) for _ in range(2)]
    batch = engine.start(rows)
    seen: list[list[Any]] = [[], []]
    steps = 0
    while True:
        for index, delta in enumerate(engine.step(batch)):
            seen[index].append(delta)
        steps += 1
        if steps == 2:
            rows[0].cancelled = True
        if batch.done:
            break
    assert [d is not None for d in seen[0]] == [True, True] + [False] * (len(seen[0]) - 2)
    assert batch.rows[0].finish_reason == "cancelled"
    assert seen[1][-1] is not None and seen[1][-1].finish_reason == "length"
    assert seen[1][-1].completion_tokens == 8


# ---------------------------------------------------------------------------------------------------
# Complete generations: log-probs, n samples, seeds, the evaluation's answers
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def teacher_forced_logprobs(model: Any, item: GenerationInput, tokens: list[int], temperature: float) -> list[float]:
    """Log-probs of `tokens` after the prompt in one forward pass over prompt + tokens (no cache, no padding)."""
    ids = torch.tensor([item.prompt_ids + tokens])
    embeds = model.embed(ids, item.pixel_values, item.grid_hw)
    logits = model.llm(inputs_embeds=embeds, use_cache=False).logits[0].float()
    scale = temperature if temperature > 0 else 1.0
    log_probs = torch.log_softmax(logits / scale, dim=-1)
    start = len(item.prompt_ids) - 1  # position t predicts token t + 1
    return [float(log_probs[start + i, token]) for i, token in enumerate(tokens)]


def test_logprobs_equal_a_teacher_forced_pass(loaded: tuple[Any, Any], engine: GenerationEngine,
                                              tokenizer: Any) -> None:
    model, _ = loaded
    items = [image_input(tokenizer, "Describe the image.", [picture((200, 30, 30))], max_tokens=12, temperature=0.8,
                         top_p=0.9, seed=3),
             text_input(tokenizer, QUESTIONS[2], max_tokens=12, temperature=0),  # longer: the first row is padded
             image_input(tokenizer, "How many?", [picture((20, 40, 220)), picture((30, 160, 60), (56, 112))],
                         max_tokens=12, temperature=1.3, seed=5, n=2)]
    results = engine.generate(items)
    assert [len(samples) for samples in results] == [1, 1, 2]
    checked = 0
    for item, samples in zip(items, results):
        for sample in samples:
            assert len(sample.token_ids) == len(sample.logprobs) >= 1
            assert sample.prompt_tokens == len(item.prompt_ids)
            expected = teacher_forced_logprobs(model, item, sample.token_ids, item.sampling.temperature)
            assert max(abs(a - b) for a, b in zip(sample.logprobs, expected)) < 1e-5
            checked += len(expected)
    assert checked >= 20


def test_n_samples_are_seeded_distinct_and_repeat(engine: GenerationEngine, tokenizer: Any) -> None:
    item = image_input(tokenizer, "Describe the image.", [picture((90, 200, 30))], max_tokens=10, temperature=1.5,
                       seed=11, n=3)
    first = engine.generate([item])[0]
    again = engine.generate([text_input(tokenizer, "hi", max_tokens=4, temperature=0), item])[1]  # other company
    assert [s.token_ids for s in first] == [s.token_ids for s in again]
    for ours, theirs in zip(first, again):
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=1e-5)
    assert len({tuple(s.token_ids) for s in first}) > 1  # seeds seed, seed+1, seed+2 differ
    single = dataclasses.replace(item, sampling=dataclasses.replace(item.sampling, seed=12, n=1))
    assert engine.generate([single])[0][0].token_ids == first[1].token_ids  # sample i is seed + i
    with pytest.raises(ValueError, match="n must be >= 1"):
        SamplingParams(max_tokens=4, n=0)


def test_evaluation_answers_equal_greedy_decoding(export: Path, loaded: tuple[Any, Any], tokenizer: Any) -> None:
    """The evaluation's Ray Data callable (now on the engine) answers a batch exactly as greedy decoding
    of the same prompts did before the move (the model's own greedy generate), cut at the end token."""
    import io

    import numpy as np

    from components.vlm.evaluate import GreedyAnswerer

    model, _ = loaded
    pictures = [picture((200, 30, 30)), picture((20, 40, 220), (56, 112))]
    encoded = []
    for image in pictures:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    questions = ["<image>\nDescribe the image.", "<image>\nHow many circles are there?", "What is 2 + 2?"]
    batch = {"key": np.array(["a", "b", "c"]), "kind": np.array(["caption", "counting", "vqa"]),
             "question": np.array(questions, dtype=object), "reference": np.array(["a red square", "3", "4"]),
             "turn": np.array([0, 0, 0]), "control": np.array(["true", "true", "shuffled"]),
             "images": np.array([[encoded[0]], [encoded[1]], []], dtype=object),
             "timestamps": np.array([[], [], []], dtype=object)}
    answerer = GreedyAnswerer(str(export), max_new_tokens=8)
    answerer.engine.banned = answerer.engine.banned[:0]  # the reference bans nothing
    predictions = answerer(batch)["prediction"].tolist()
    prompts, images = [], []
    for question, image in zip(questions, [pictures[0], pictures[1], None]):
        used = [image] if image is not None else []
        ids, _ = prompt_ids(tokenizer=tokenizer, question=question,
                            image_token_counts=[image_token_count(p, VIT) for p in used])
        prompts.append(ids)
        images += used
    packed = images_to_vit_input(images, VIT)
    ids_of = answerer.engine.ids
    reference = hf_greedy(model, prompts, packed.pixel_values, packed.grid_hw, 8, ids_of.im_end, ids_of.pad)
    assert predictions == [answer_text(tokenizer, row) for row in reference]
    assert any(predictions)
