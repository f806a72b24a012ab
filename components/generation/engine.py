"""The one generation engine of the VLM, used by the evaluation suite and the serving deployment (and by
rejection sampling and RL rollouts): one prefill of the left-padded prompts (images spliced in), then
one decode step per token over the LLM's KV cache, with per-request sampling (temperature, top-p,
seed, `n` samples per prompt), stop strings, token limits, the reasoning/content split, and the
log-probability of every generated token.

Log-probabilities are those of the model's distribution at the request's temperature (log-softmax of
logits / temperature; of the logits themselves when greedy), before top-p truncation and before the
structural tokens that are never generated are masked: what a teacher-forced forward pass of the
trainer computes for the same tokens, as RL's importance ratios need.

`GenerationEngine.generate` runs requests to the end and returns every sample's token ids, log-probs
and text; serving streams instead, with `start` and `step`.

A `DecodeBatch` is the state of the requests decoding together: `GenerationEngine.start` runs the
prefill and samples every row's first token; each `GenerationEngine.step` turns the latest tokens into
text deltas and, while any row is still going, runs one forward pass for the next ones. Rows that
finish keep their slot (fed the pad id, their outputs ignored) until the whole batch is done, as Ray
Serve's `@serve.batch` streams one batch at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any

import torch

from components.generation.text_stream import IncrementalDecoder, ReasoningSplitter, StopMatcher
from components.vlm.tokenizer import (
    ANSWER_SPECIAL_TOKENS,
    END_OF_TEXT,
    IM_START,
    IMAGE_PAD,
    IMAGE_PLACEHOLDER,
    PAD,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    VIDEO_PLACEHOLDER,
    VISION_END,
    VISION_START,
    SpecialIds,
    single_id_of,
)

log = logging.getLogger(__name__)
MIN_TEMPERATURE = 1e-4  # below this, sampling is greedy
NEVER_GENERATED = (IMAGE_PAD, VISION_START, VISION_END, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, IM_START, PAD)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # with n > 1, sample i uses seed + i
    n: int = 1  # samples per prompt (`generate` only; a stream is one sample)

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.n < 1:
            raise ValueError(f"max_tokens and n must be >= 1, got {self.max_tokens} and {self.n}")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")


@dataclasses.dataclass
class GenerationInput:
    """One request, ready for the model: prompt ids (image tokens expanded) and its images' patches."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor | None  # (num_patches, 3*14*14) of this request's images, in prompt order
    grid_hw: torch.Tensor | None  # (num_images, 2)
    sampling: SamplingParams
    cancelled: bool = False  # set by whoever streams it when its client is gone: the row stops decoding


@dataclasses.dataclass
class Delta:
    """What one request produced in one step: new reasoning and answer text, and why it ended (if it did)."""

    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None  # stop | length
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclasses.dataclass
class _Row:
    """The per-request state of a decode batch."""

    params: SamplingParams
    prompt_tokens: int
    generator: torch.Generator | None
    splitter: ReasoningSplitter
    reasoning: IncrementalDecoder
    content: IncrementalDecoder
    stops: StopMatcher
    generated: int = 0
    finished: bool = False
    finish_reason: str | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)  # every generated token, an end token included
    logprobs: list[float] = dataclasses.field(default_factory=list)  # of each generated token


@dataclasses.dataclass
class Completion:
    """One finished sample: its tokens with their log-probs, its text, and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    content: str
    reasoning: str
    finish_reason: str | None
    prompt_tokens: int


@dataclasses.dataclass
class DecodeBatch:
    rows: list[_Row]
    next_tokens: torch.Tensor  # (B,) the tokens sampled last, not yet turned into text
    next_logprobs: torch.Tensor  # (B,) their log-probs
    attention_mask: torch.Tensor  # (B, T) 0 on the left padding
    positions: torch.Tensor  # (B,) the position id of the next token to feed
    cache: Any  # the LLM's KV cache
    inputs: list[GenerationInput] = dataclasses.field(default_factory=list)  # watched for `cancelled`

    @property
    def done(self) -> bool:
        return all(row.finished for row in self.rows)


class GenerationEngine:
    """Holds the model and tokenizer; `start` and `step` decode a batch (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.ids = SpecialIds.of(tokenizer)
        self.cancelled_rows = 0  # rows stopped early because their client went away
        self.device = next(model.parameters()).device
        self.end_ids = {self.ids.im_end, self.ids.pad}
        end_of_text = single_id_of(tokenizer, END_OF_TEXT)
        if end_of_text is not None:
            self.end_ids.add(end_of_text)
        self.think_ids = (single_id_of(tokenizer, THINK_START), single_id_of(tokenizer, THINK_END))
        structural = {single_id_of(tokenizer, token) for token in SPECIAL_TOKENS if token not in ANSWER_SPECIAL_TOKENS}
        answer_tags = {single_id_of(tokenizer, token) for token in ANSWER_SPECIAL_TOKENS}
        # decoded text keeps the box and point tags (answers carry them); think tags never reach a decoder
        self.skip_ids = ((set(tokenizer.all_special_ids) | structural | self.end_ids) - answer_tags) - {None}
        vocab = model.llm.get_output_embeddings().weight.shape[0]
        banned = [i for i in (single_id_of(tokenizer, token) for token in NEVER_GENERATED) if i is not None]
        banned = [i for i in banned if i not in self.end_ids and i < vocab]
        self.banned = torch.tensor(banned, dtype=torch.long, device=self.device)

    @property
    def context_limit(self) -> int:
        return int(getattr(self.model.llm.config, "max_position_embeddings", 1 << 30))

    def _row(self, item: GenerationInput) -> _Row:
        seed = item.sampling.seed
        generator = None
        if item.sampling.temperature >= MIN_TEMPERATURE:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else random.getrandbits(63))
        return _Row(item.sampling, len(item.prompt_ids), generator, ReasoningSplitter(*self.think_ids),
                    IncrementalDecoder(self.tokenizer, self.skip_ids), IncrementalDecoder(self.tokenizer, self.skip_ids),
                    StopMatcher(item.sampling.stop))

    @torch.inference_mode()
    def start(self, items: list[GenerationInput]) -> DecodeBatch:
        """Prefill the prompts (left-padded, images in row order) and sample each row's first token."""
        longest = max(len(item.prompt_ids) for item in items)
        padded = torch.full((len(items), longest), self.ids.pad, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(padded)
        for row, item in enumerate(items):
            padded[row, longest - len(item.prompt_ids):] = torch.tensor(item.prompt_ids, device=self.device)
            mask[row, longest - len(item.prompt_ids):] = 1
        with_images = [item for item in items if item.pixel_values is not None and item.grid_hw is not None]
        pixel_values = grid_hw = None
        if with_images:
            dtype = next(self.model.vit.parameters()).dtype
            pixel_values = torch.cat([item.pixel_values for item in with_images]).to(self.device, dtype)
            grid_hw = torch.cat([item.grid_hw for item in with_images]).to(self.device)
        embeds = self.model.embed(padded, pixel_values, grid_hw)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                             output_router_logits=False, logits_to_keep=1)
        rows = [self._row(item) for item in items]
        next_tokens, logprobs = self._sample(out.logits[:, -1], rows)
        return DecodeBatch(rows, next_tokens, logprobs, mask, positions[:, -1] + 1, out.past_key_values, list(items))

    @torch.inference_mode()
    def step(self, batch: DecodeBatch) -> list[Delta | None]:
        """Text for the tokens sampled last (None for rows already finished before this step), then one
        decode forward pass for the next tokens unless every row is done."""
        deltas: list[Delta | None] = []
        rows = zip(batch.rows, batch.next_tokens.tolist(), batch.next_logprobs.tolist())
        for index, (row, token, logprob) in enumerate(rows):
            if not row.finished and index < len(batch.inputs) and batch.inputs[index].cancelled:
                row.finished, row.finish_reason = True, "cancelled"  # nobody reads it any more
                self.cancelled_rows += 1
            deltas.append(None if row.finished else self._advance(row, int(token), float(logprob)))
        if batch.done:
            return deltas
        feed = batch.next_tokens.clone()
        for index, row in enumerate(batch.rows):
            if row.finished:
                feed[index] = self.ids.pad
        batch.attention_mask = torch.cat([batch.attention_mask, torch.ones_like(batch.attention_mask[:, :1])], dim=1)
        out = self.model.llm(input_ids=feed[:, None], attention_mask=batch.attention_mask,
                             position_ids=batch.positions[:, None], past_key_values=batch.cache, use_cache=True,
                             output_router_logits=False)
        batch.cache = out.past_key_values
        batch.positions = batch.positions + 1
        batch.next_tokens, batch.next_logprobs = self._sample(out.logits[:, -1], batch.rows)
        return deltas

    def generate(self, items: list[GenerationInput]) -> list[list[Completion]]:
        """Every request run to its end: `sampling.n` completions per request (sample i seeded with
        seed + i when a seed is given), decoded together in one batch."""
        rows: list[GenerationInput] = []
        for item in items:
            for sample in range(item.sampling.n):
                seed = item.sampling.seed + sample if item.sampling.seed is not None else None
                rows.append(dataclasses.replace(item, sampling=dataclasses.replace(item.sampling, seed=seed, n=1)))
        if not rows:
            return []
        batch = self.start(rows)
        texts = [["", ""] for _ in rows]
        while True:
            for index, delta in enumerate(self.step(batch)):
                if delta is not None:
                    texts[index][0] += delta.content
                    texts[index][1] += delta.reasoning
            if batch.done:
                break
        done = [Completion(row.token_ids, row.logprobs, content, reasoning, row.finish_reason, row.prompt_tokens)
                for row, (content, reasoning) in zip(batch.rows, texts)]
        grouped, start = [], 0
        for item in items:
            grouped.append(done[start:start + item.sampling.n])
            start += item.sampling.n
        return grouped

    def _advance(self, row: _Row, token: int, logprob: float) -> Delta:
        """Account one generated token of a live row; the text it completes, and whether the row ends."""
        row.generated += 1
        row.token_ids.append(token)
        row.logprobs.append(logprob)
        delta = Delta(prompt_tokens=row.prompt_tokens)
        stopped_by_string = False
        if token in self.end_ids:
            row.finished, row.finish_reason = True, "stop"
        else:
            channel = row.splitter.channel(token)
            if channel == "reasoning":
                delta.reasoning = row.reasoning.push(token)
            elif channel == "content":
                delta.content, stopped_by_string = row.stops.push(row.content.push(token))
                if stopped_by_string:
                    row.finished, row.finish_reason = True, "stop"
            if not row.finished and row.generated >= row.params.max_tokens:
                row.finished, row.finish_reason = True, "length"
        if row.finished:
            delta.reasoning += row.reasoning.flush()
            if not stopped_by_string:  # the decoder's held-back bytes may still complete a stop string
                tail, stopped_by_string = row.stops.push(row.content.flush())
                delta.content += tail if stopped_by_string else tail + row.stops.flush()
                if stopped_by_string:
                    row.finish_reason = "stop"
            delta.finish_reason = row.finish_reason
        delta.completion_tokens = row.generated
        return delta

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, vocab) logits -> (B,) next tokens and their log-probs: greedy for temperature 0, else top-p
        sampling with the row's own generator (so a seeded request repeats whatever it is batched with)."""
        logits = logits.float()
        temperatures = torch.tensor([row.params.temperature if row.params.temperature >= MIN_TEMPERATURE else 1.0
                                     for row in rows], device=logits.device)
        log_probs = torch.log_softmax(logits / temperatures[:, None], dim=-1)  # before masking (see the docstring)
        logits = logits.clone()
        if len(self.banned):
            logits[:, self.banned] = float("-inf")
        tokens = logits.argmax(dim=-1)
        for index, row in enumerate(rows):
            if row.finished or row.params.temperature < MIN_TEMPERATURE:  # greedy (tiny ones would overflow)
                continue
            row_logits = logits[index]
            probs = torch.softmax((row_logits - row_logits.max()) / row.params.temperature, dim=-1)
            if row.params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                before = sorted_probs.cumsum(0) - sorted_probs  # mass ahead of each token
                sorted_probs[before >= row.params.top_p] = 0.0  # keep the smallest set reaching top_p
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            tokens[index] = torch.multinomial(probs, 1, generator=row.generator)[0]
        return tokens, log_probs.gather(1, tokens[:, None])[:, 0]
