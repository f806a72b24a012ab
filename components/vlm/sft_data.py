"""The SFT data step (`sft_data`): instruction conversations out of the curated shards' training split, every
task type, each sample written in one of two answer modes chosen by a stable hash of its key:

- thinking (`train.vlm.sft_data.thinking_share` of the samples): the thinking system prompt, and every
  answer `<think>reasoning</think>answer`;
- direct: the direct system prompt, and the answers as they are.

The prompts are `components/vlm/modes.py`'s, the strings serving's thinking switch sends.

There is no teacher model at this scale, so the reasoning is **templated** from the annotations the
synthesis steps keep, and it teaches enumerating what is there before answering:

- counting: the count first, then the objects the question asks about by where they sit (the evidence);
- grounding and pointing: the object the expression refers to, named with where it sits, then the box or point;
- OCR: the text read line by line, then the answer;
- captions of synthetic scenes: the background, then every object with where it sits, then the caption;
- video: the event asked about with when it starts and ends, then the span; for a description, the events
  in order with their times.

A sample whose reasoning cannot be templated (no annotations: a real web caption, a video caption) is written
in direct mode and counted as `direct_no_cot`; one whose conversation does not parse is dropped and counted
by reason. Counts: samples in = kept + dropped. Shards are written atomically, `<task>/sft-NNNNNN.tar`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.common.contract import StageContext, StageResult, component
from components.training.shards import DropCounter, RawSample, ShardStream, media_names, task_shards
from components.vlm.config import SftDataJob, sft_data_view
from components.vlm.modes import system_prompt
from components.vlm.sample_shards import ShardWriter

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- reasoning


def where(point: Sequence[float]) -> str:
    """Where a [0, 999] point sits in the picture, in words ("top left", "middle", "bottom right")."""
    x, y = float(point[0]), float(point[1])
    row = "top" if y < 333 else "bottom" if y >= 666 else "middle"
    column = "left" if x < 333 else "right" if x >= 666 else "centre"
    if row == "middle" and column == "centre":
        return "middle"
    return f"{row} {column}" if row != "middle" else f"middle {column}"


def object_phrase(obj: Mapping[str, Any]) -> str | None:
    """"a red circle at the top left" for one annotated object, or None without colour, shape or place. Places
    are words, not coordinates: reasoning a small model can learn to say from the picture."""
    colour, shape = obj.get("colour"), obj.get("shape")
    point = obj.get("point") or box_centre(obj.get("box"))
    if not isinstance(colour, str) or not isinstance(shape, str) or point is None:
        return None
    return f"a {colour} {shape} at the {where(point)}"


def box_centre(box: Any) -> list[float] | None:
    if not isinstance(box, Sequence) or len(box) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    return [(x1 + x2) / 2, (y1 + y2) / 2]


def joined(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def counting_reasoning(question: str, answer: str, annotations: Mapping[str, Any]) -> str | None:
    """The count first, then each object the question asks about (the annotation of this question) by where it
    sits: "I count 2. The diamonds: one at the top right and one at the bottom right."

    Why this order (README, "What SFT and RL do on the small profile"): with the list first and the count after
    it ("... That makes 2."), the small profile's SFT model counted worse thinking than answering directly (0.389
    against 0.486 over three seeds): a 3-layer LLM miscounts its own list and its answer then disagrees with
    it. With the count where a direct answer gives it, the places follow as the evidence and the answer after
    `</think>` copies the count (measured: 0.410 against 0.493, at least as good on one seed of three).
    No inventory of every object first: that long list (90-260 tokens) made the SFT model repeat phrases until
    the token limit. The objects are grouped by place ("two at the top left and one at the middle"), at most
    nine groups, so "how many shapes" on a crowded scene of 20 stays short."""
    from components.vlm.eval_tasks import strip_media_tokens

    entry = next((e for e in annotations.get("counting") or [] if isinstance(e, Mapping)
                  and str(e.get("question", "")).strip() == strip_media_tokens(question)), None)
    if entry is None or str(entry.get("answer")) != answer.strip():
        return None
    asked = " ".join(w for w in (entry.get("colour"), entry.get("shape") or "shape") if isinstance(w, str)) + "s"
    points = [p for p in entry.get("points") or [] if isinstance(p, Sequence) and len(p) == 2]
    if len(points) != int(entry["answer"]):
        return None
    if not points:
        return f"I count 0. I find no {asked}."
    places = Counter(where(p) for p in points)
    at = joined([f"{number_word(n)} at the {place}" for place, n in sorted(places.items(), key=reading_order)])
    return f"I count {len(points)}. The {asked}: {at}."


PLACES = ("top left", "top centre", "top right", "middle left", "middle", "middle right", "bottom left",
          "bottom centre", "bottom right")  # `where`'s words in reading order
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def reading_order(item: tuple[str, int]) -> int:
    return PLACES.index(item[0])


def number_word(count: int) -> str:
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)


def grounding_reasoning(question: str, answer: str, annotations: Mapping[str, Any]) -> str | None:
    """The object the referring expression names, with where it sits, then the box or point."""
    objects = annotations.get("objects")
    for entry in annotations.get("referring") or []:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("expression"), str):
            continue
        if entry["expression"].casefold() not in question.casefold():
            continue
        target = entry.get("target")
        if not isinstance(objects, list) or not isinstance(target, int) or not 0 <= target < len(objects):
            return None
        phrase = object_phrase(objects[target])
        if phrase is None:
            return None
        what = "box" if "<box>" in answer else "point"
        return f"{entry['expression'][0].upper()}{entry['expression'][1:]} is {phrase}. Its {what} follows."
    return None


def ocr_reasoning(question: str, answer: str, annotations: Mapping[str, Any]) -> str | None:
    """The lines read one by one (top to bottom), then the answer."""
    lines = [line.get("text") for line in annotations.get("lines") or [] if isinstance(line, Mapping)]
    lines = [t for t in lines if isinstance(t, str) and t.strip()]
    if not lines:
        return None
    read = " ".join(f"Line {i}: {text.strip()}" + ("" if text.strip()[-1] in ".!?" else ".")
                    for i, text in enumerate(lines, 1))
    return f"The picture has {len(lines)} line{'s' if len(lines) > 1 else ''} of text. {read}"


def caption_reasoning(info: Mapping[str, Any]) -> str | None:
    """A synthetic scene's background, then its objects with where they sit: "The background is beige. On it: a
    red circle at the top left and a green square at the middle." It opens unlike every other task's reasoning
    (counting's "I count", OCR's "The picture has"): with the old opening "I see N shapes: ..." the small
    profile's thinking captions drifted into the counting template ("... That makes 1.") and often never closed
    their reasoning (thinking-mode caption F1 0.18 against 0.72 direct; 0.50 with this template)."""
    synthetic = (info.get("meta") or {}).get("synthetic") if isinstance(info.get("meta"), Mapping) else None
    if not isinstance(synthetic, Mapping):
        return None
    objects = synthetic.get("objects")
    width, height = info.get("width"), info.get("height")
    if not isinstance(objects, list) or not objects or not width or not height:
        return None
    scaled = []
    for obj in objects:  # the crawl's boxes are in pixels: to the [0, 999] space of every other task
        box = obj.get("box") if isinstance(obj, Mapping) else None
        if not isinstance(box, Sequence) or len(box) != 4:
            return None
        scaled.append({**obj, "box": [box[0] * 999 / width, box[1] * 999 / height, box[2] * 999 / width,
                                      box[3] * 999 / height], "point": None})
    phrases = [object_phrase(obj) for obj in scaled]
    if any(p is None for p in phrases):
        return None
    from components.vlm.eval_tasks import split_background

    background = split_background(str(synthetic.get("true_caption") or info.get("caption") or ""))[1]
    return (f"The background is {background}. On it: " if background else "On the picture: ") + joined(
        [str(p) for p in phrases]) + "."


def video_reasoning(question: str, answer: str, annotations: Mapping[str, Any]) -> str | None:
    """The event asked about and when it starts and ends, then the span; for a description, the events in
    order with their times."""
    from components.vlm.eval_tasks import strip_media_tokens

    events = [e for e in annotations.get("events") or [] if isinstance(e, Mapping)]
    if strip_media_tokens(question).casefold().startswith("describe") and events:
        try:
            steps = [f"at {float(e['start_s']):.1f} seconds the {e['subject']} {e['detail']}" for e in events]
        except (KeyError, TypeError, ValueError):
            return None
        return "I go through the frames in order: " + "; ".join(steps) + "."
    for entry in annotations.get("temporal_grounding") or []:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("query"), str):
            continue
        if entry["query"].casefold() not in question.casefold():
            continue
        start, end = entry.get("start_s"), entry.get("end_s")
        if not isinstance(start, (int, float)) or not isinstance(end, (int, float)):
            return None
        return (f"I look for the frames where {entry['query']}: it starts at {float(start):.1f} seconds and is "
                f"over by {float(end):.1f} seconds.")
    return None


def reasoning_for(task: str, info: Mapping[str, Any], turn: int, question: str, answer: str) -> str | None:
    """The templated reasoning of one answer, or None when this sample's annotations cannot give one."""
    annotations = info.get("annotations") if isinstance(info.get("annotations"), Mapping) else {}
    if task == "caption":
        return caption_reasoning(info) if turn == 0 else None
    builders = {"counting": counting_reasoning, "grounding": grounding_reasoning, "ocr": ocr_reasoning,
                "video": video_reasoning}
    builder = builders.get(task)
    return builder(question, answer, annotations) if builder is not None else None


# ---------------------------------------------------------------------------------------------- conversations


def mode_of(key: str, thinking_share: float) -> str:
    """The answer mode of a sample: thinking for a stable `thinking_share` of keys, else direct."""
    digest = int.from_bytes(hashlib.sha256(f"sft-mode:{key}".encode()).digest()[:8], "big")
    return "thinking" if digest / 2**64 < thinking_share else "direct"


def with_thinking(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning}</think>{answer}"


def sft_conversation(info: Mapping[str, Any], task: str, mode: str) -> tuple[list[dict[str, str]], str]:
    """(the conversation in `mode`, the mode it got): a system turn with the mode's prompt, then the sample's
    turns, each answer with its reasoning in thinking mode. A thinking sample whose reasoning cannot be
    templated for every answer gets direct mode. Raises BadSample on a conversation that does not parse."""
    from components.vlm.conversation import turns_of

    turns = turns_of({**info, "task": task})
    if mode == "thinking":
        reasoning = [reasoning_for(task, info, i, q, a) for i, (q, a) in enumerate(turns)]
        if all(r is not None for r in reasoning):
            answers = [with_thinking(str(r), a) for r, (_, a) in zip(reasoning, turns)]
        else:
            mode, answers = "direct", [a for _, a in turns]
    else:
        answers = [a for _, a in turns]
    conversation = [{"from": "system", "value": system_prompt(mode)}]
    for (question, _), answer in zip(turns, answers):
        conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return conversation, mode


def sft_sample(raw: RawSample, task: str, thinking_share: float, counter: DropCounter) -> RawSample | None:
    """The raw sample with its json turned into an SFT conversation (media members kept as they are), or None
    with the reason counted."""
    from components.vlm.conversation import BadSample

    try:
        info = raw.info()
    except (ValueError, UnicodeDecodeError):
        counter["bad_json"] += 1
        return None
    if not media_names(raw):
        counter["missing_image"] += 1
        return None
    wanted = mode_of(raw.key, thinking_share)
    try:
        conversation, mode = sft_conversation(info, task, wanted)
    except BadSample as bad:
        counter[bad.reason] += 1
        return None
    counter["kept"] += 1
    counter[f"mode_{mode}"] += 1
    if mode != wanted:
        counter["direct_no_cot"] += 1
    sft_info = {**info, "task": task, "conversations": conversation, "sft_mode": mode, "source_key": raw.key}
    members = {ext: data for ext, data in raw.members.items() if ext not in ("json", "txt")}
    return RawSample(key=raw.key, members={**members, "json": json.dumps(sft_info).encode()})


def thinking_lengths(samples: Sequence[RawSample]) -> list[int]:
    """Words of reasoning per thinking-mode answer."""
    from components.vlm.verifiers import split_thinking

    lengths = []
    for sample in samples:
        for turn in json.loads(sample.members["json"])["conversations"]:
            if turn["from"] == "gpt":
                thinking, _ = split_thinking(turn["value"])
                if thinking is not None:
                    lengths.append(len(thinking.split()))
    return lengths


# ---------------------------------------------------------------------------------------------- the step


def run_sft_data(ctx: StageContext[SftDataJob]) -> StageResult:
    """Every training-split sample of the configured tasks (rebalancing copies included, as the stages read
    them) as an SFT conversation, written to `<task>/sft-NNNNNN.tar`; drops by reason and counts by mode in
    `stats.json` and the step's metrics."""
    from components.vlm.data import vlm_split_key

    job, out_dir = ctx.config, ctx.outputs["sft"]
    out_dir.mkdir(parents=True, exist_ok=True)
    counters: dict[str, DropCounter] = {}
    think_words: list[int] = []
    for task in job.data.tasks:
        shards = task_shards(ctx.inputs["shards"], (task,))
        counter = counters.setdefault(task, DropCounter())
        if not shards:
            continue
        stream = ShardStream(shards, 0, 1, 0, held_out=False, holdout_fraction=job.holdout_fraction,
                             counter=counter, split_key=vlm_split_key)
        writer = ShardWriter(out_dir / task, "sft", job.data.samples_per_shard)
        for raw in stream.epoch(0):
            counter["read"] += 1
            if job.data.max_samples_per_task and counter["kept"] >= job.data.max_samples_per_task:
                counter["over_max_samples"] += 1
                continue
            sample = sft_sample(raw, task, job.data.thinking_share, counter)
            if sample is not None:
                think_words += thinking_lengths([sample])
                writer.add(sample)
        writer.close()
    stats = {task: dict(sorted(c.items())) for task, c in counters.items()}
    metrics: dict[str, float] = {}
    for task, counter in counters.items():
        dropped = counter["read"] - counter["kept"] - counter["over_max_samples"]
        metrics |= {f"{task}/read": float(counter["read"]), f"{task}/kept": float(counter["kept"]),
                    f"{task}/dropped": float(dropped), f"{task}/thinking": float(counter["mode_thinking"]),
                    f"{task}/direct": float(counter["mode_direct"]),
                    f"{task}/direct_no_cot": float(counter["direct_no_cot"])}
    totals: Counter[str] = sum(counters.values(), Counter())
    metrics |= {"samples_kept": float(totals["kept"]), "samples_thinking": float(totals["mode_thinking"]),
                "thinking_share": totals["mode_thinking"] / max(1, totals["kept"]),
                "mean_thinking_words": sum(think_words) / max(1, len(think_words))}
    (out_dir / "stats.json").write_text(json.dumps({"by_task": stats, "metrics": metrics}, indent=1))
    log.info("sft_data: %d conversations, %.0f%% in thinking mode", totals["kept"], 100 * metrics["thinking_share"])
    return StageResult(metrics=metrics, artifacts=["sft/stats.json"])


sft_data = component(name="sft_data", version="2", config="train.vlm", inputs=("shards",), outputs=("sft",),
                     view=sft_data_view)(run_sft_data)


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(sft_data))
