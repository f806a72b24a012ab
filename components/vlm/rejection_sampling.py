"""The rejection-sampling step (`rejection_sampling`): the first SFT round's export answers training-split
prompts of the verifiable tasks k times each with thinking on, through the generation engine in a Ray Data
batch-inference job; the verifiers (`components/vlm/verifiers.py`, the evaluation's own scoring) keep the
correct answers (a well-formed `<think>...</think>` block, then an answer that scores 1, or an IoU of at
least `min_iou` for boxes and time spans), de-duplicated, the shortest first, at most `keep_per_prompt` per
prompt. Accepted answers are written as SFT conversations in thinking mode (`<task>/rs-NNNNNN.tar`) for the
second SFT round (`vlm_sft_rs`).

Logged: every prompt with its samples and their rewards (`samples.jsonl`), and per task the prompts asked, the
samples drawn, the share of samples that pass, the share of prompts with at least one accepted answer (the
acceptance rate), the format failures and the mean reasoning length. A response no verifier can read
scores 0 and is counted; a prompt whose reference the verifier cannot read is counted and skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.common.contract import StageContext, StageResult, component
from components.training.shards import DropCounter, RawSample, media_names
from components.vlm.config import RejectionSamplingJob, rejection_sampling_view

log = logging.getLogger(__name__)
VERIFIER_OF = {"counting": "counting", "grounding": "grounding", "ocr": "ocr", "video_grounding": "video_grounding"}
CONTINUOUS = frozenset({"grounding", "video_grounding"})  # IoU rewards: correct from `min_iou` on
MIN_IOU = 0.5


def training_prompts(shards_dir: Path, job: RejectionSamplingJob,
                     counter: DropCounter) -> tuple[list[dict[str, Any]], dict[str, RawSample]]:
    """Verifiable single-turn prompts of the training split (the evaluation's item rules: one question of a
    sample asked alone with its media), at most `prompts_per_task` per task, as Ray Data rows with the PNG
    bytes of their images or frames; and the raw samples they came from, by key."""
    from components.vlm.training_prompts import training_turns

    rows: list[dict[str, Any]] = []
    raws: dict[str, RawSample] = {}
    for task in job.sampling.tasks:
        asked = 0
        for raw, items, encoded, stamps in training_turns(shards_dir, task, job.holdout_fraction,
                                                          job.frames_per_clip, VERIFIER_OF, counter):
            if asked >= job.sampling.prompts_per_task:
                break
            for item in items[:job.sampling.prompts_per_task - asked]:
                rows.append({**item.to_dict(), "task": task, "images": encoded, "timestamps": stamps})
                asked += 1
            raws[raw.key] = raw
    return rows, raws


class Sampler:
    """A Ray Data callable class: the export loaded once into the generation engine; each row's question
    asked under the thinking prompt, `samples_per_prompt` samples at the configured temperature, one output
    row per sample with its response and token count."""

    def __init__(self, checkpoint: str, job: RejectionSamplingJob, seed: int, threads: int = 1) -> None:
        from components.generation.engine import GenerationEngine
        from components.vlm.inference import load_for_inference

        torch.set_num_threads(max(1, threads))
        model, tokenizer = load_for_inference(checkpoint)
        self.engine, self.tokenizer, self.job, self.seed = GenerationEngine(model, tokenizer), tokenizer, job, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import zlib

        from components.generation.engine import SamplingParams
        from components.vlm.conversation import answer_text
        from components.vlm.inference import generation_request
        from components.vlm.modes import system_prompt

        cfg, system = self.job.sampling, system_prompt("thinking")
        requests = []
        for key, turn, question, images, stamps in zip(batch["key"], batch["turn"], batch["question"],
                                                       batch["images"], batch["timestamps"]):
            seed = zlib.crc32(f"{self.seed}:{key}:{turn}".encode())  # reproducible whatever the batching
            sampling = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                      seed=seed, n=cfg.samples_per_prompt)
            requests.append(generation_request(self.engine, self.tokenizer, str(question), images, stamps, system,
                                               sampling))
        completions = self.engine.generate(requests)
        out: dict[str, list[Any]] = {name: [] for name in ("key", "task", "kind", "turn", "question", "reference",
                                                           "sample", "response", "tokens", "finish_reason")}
        for index, samples in enumerate(completions):
            for number, completion in enumerate(samples):
                for name in ("key", "task", "kind", "turn", "question", "reference"):
                    out[name].append(batch[name][index])
                out["sample"].append(number)
                out["response"].append(answer_text(self.tokenizer, completion.token_ids))
                out["tokens"].append(len(completion.token_ids))
                out["finish_reason"].append(str(completion.finish_reason))
        return {name: np.array(values, dtype=object) for name, values in out.items()}


def sample_answers(checkpoint: Path, rows: list[dict[str, Any]], job: RejectionSamplingJob,
                   seed: int) -> list[dict[str, Any]]:
    """Every prompt's k samples, as a Ray Data batch-inference job."""
    import ray.data

    if not rows:
        return []
    cfg = job.sampling
    threads = max(1, int(cfg.resources.num_cpus))
    dataset = ray.data.from_items(rows).map_batches(
        Sampler, fn_constructor_kwargs={"checkpoint": str(checkpoint), "job": job, "seed": seed, "threads": threads},
        batch_size=cfg.batch_size, num_gpus=cfg.num_gpus, **cfg.resources.map_kwargs(actors=True))
    return dataset.take_all()


def judge(row: dict[str, Any]) -> dict[str, Any]:
    """One sample's verdict: its reward (the verifier's score of the answer after `</think>`; 0 with a broken
    format), whether it counts as correct, and its reasoning length. Never raises on the response."""
    from components.vlm.verifiers import format_ok, split_thinking, verify

    kind, response = str(row["kind"]), str(row["response"])
    well_formed = format_ok(response)
    try:
        reward, readable = verify(VERIFIER_OF[kind], response, str(row["reference"]), thinking=True), True
    except ValueError:  # a reference the verifier cannot read: no ground truth, so nothing is accepted
        reward, readable = 0.0, False
    correct = readable and well_formed and (reward >= MIN_IOU if kind in CONTINUOUS else reward >= 1.0)
    reasoning = split_thinking(response)[0] or ""
    return {**row, "reward": float(reward), "format_ok": well_formed, "correct": bool(correct),
            "reference_readable": readable, "thinking_words": len(reasoning.split())}


def select_accepted(judged: list[dict[str, Any]], keep: int) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Per prompt (key, turn): its correct samples, de-duplicated by their reasoning and answer (each with its
    whitespace normalised), the shortest first (ties: the lower sample number), at most `keep`."""
    from components.vlm.verifiers import split_thinking

    by_prompt: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in judged:
        if row["correct"]:
            by_prompt.setdefault((str(row["key"]), int(row["turn"])), []).append(row)
    accepted = {}
    for prompt, rows in by_prompt.items():
        seen, unique = set(), []
        for row in sorted(rows, key=lambda r: (int(r["tokens"]), int(r["sample"]))):
            reasoning, answer = split_thinking(str(row["response"]))
            text = (" ".join((reasoning or "").split()), " ".join(answer.split()))
            if text not in seen:
                seen.add(text)
                unique.append(row)
        accepted[prompt] = unique[:keep]
    return accepted


def accepted_sample(raw: RawSample, rows: list[dict[str, Any]]) -> RawSample:
    """An SFT sample in thinking mode per accepted answer: the prompt's media, then the question and the answer."""
    from components.vlm.modes import system_prompt

    info = raw.info()
    first = rows[0]
    conversation = [{"from": "system", "value": system_prompt("thinking")},
                    {"from": "human", "value": str(first["question"])},
                    {"from": "gpt", "value": str(first["response"])}]
    sft_info = {**info, "conversations": conversation, "sft_mode": "thinking", "source_key": raw.key,
                "rejection_sampled": {"reward": first["reward"], "sample": int(first["sample"]),
                                      "turn": int(first["turn"])}}
    media = {ext: raw.members[ext] for ext in media_names(raw)}
    key = f"{raw.key}-rs{int(first['turn'])}-{int(first['sample'])}"
    return RawSample(key=key, members={**media, "json": json.dumps(sft_info).encode()})


def acceptance_metrics(judged: list[dict[str, Any]], accepted: dict[tuple[str, int], list[dict[str, Any]]],
                       prompts: list[dict[str, Any]]) -> dict[str, float]:
    """Per task: prompts, samples, the pass rate of samples, the acceptance rate of prompts, the format
    failures, the truncated samples and the mean reasoning length of all samples and of the accepted ones."""
    metrics: dict[str, float] = {}
    tasks = sorted({str(p["task"]) for p in prompts})
    for task in [*tasks, "all"]:
        mine = [r for r in judged if task in ("all", str(r["task"]))]
        asked = [p for p in prompts if task in ("all", str(p["task"]))]
        kept = [rows for (key, turn), rows in accepted.items()
                if any(str(p["key"]) == key and int(p["turn"]) == turn for p in asked)]
        kept_rows = [row for rows in kept for row in rows]
        metrics |= {
            f"{task}/prompts": float(len(asked)), f"{task}/samples": float(len(mine)),
            f"{task}/sample_pass_rate": sum(r["correct"] for r in mine) / max(1, len(mine)),
            f"{task}/acceptance_rate": len(kept) / max(1, len(asked)),
            f"{task}/accepted": float(len(kept_rows)),
            f"{task}/format_failures": float(sum(not r["format_ok"] for r in mine)),
            f"{task}/no_ground_truth": float(sum(not r.get("reference_readable", True) for r in mine)),
            f"{task}/truncated": float(sum(r["finish_reason"] == "length" for r in mine)),
            f"{task}/mean_reward": sum(r["reward"] for r in mine) / max(1, len(mine)),
            f"{task}/mean_thinking_words": sum(r["thinking_words"] for r in mine) / max(1, len(mine)),
            f"{task}/accepted_thinking_words": sum(r["thinking_words"] for r in kept_rows) / max(1, len(kept_rows)),
        }
    return metrics


def run_rejection_sampling(ctx: StageContext[RejectionSamplingJob]) -> StageResult:
    from components.vlm.sample_shards import ShardWriter

    job, out_dir = ctx.config, ctx.outputs["samples"]
    out_dir.mkdir(parents=True, exist_ok=True)
    counter = DropCounter()
    prompts, raws = training_prompts(ctx.inputs["shards"], job, counter)
    judged = [judge(row) for row in sample_answers(ctx.inputs["vlm"] / "model", prompts, job, ctx.seed)]
    accepted = select_accepted(judged, job.sampling.keep_per_prompt)
    writers: dict[str, ShardWriter] = {}
    for (key, _), rows in sorted(accepted.items()):
        for row in rows:
            task = str(row["task"])
            writer = writers.setdefault(task, ShardWriter(out_dir / task, "rs", job.sampling.samples_per_shard))
            writer.add(accepted_sample(raws[key], [row]))
    for writer in writers.values():
        writer.close()
    with (out_dir / "samples.jsonl").open("w") as handle:
        for row in judged:
            handle.write(json.dumps({k: v for k, v in row.items() if k not in ("images", "timestamps")},
                                    default=str) + "\n")
    metrics = acceptance_metrics(judged, accepted, prompts)
    metrics |= {f"prompts_{reason}": float(count) for reason, count in sorted(counter.items())}
    (out_dir / "stats.json").write_text(json.dumps(metrics, indent=1))
    log.info("rejection_sampling: %d prompts, %d samples, %d accepted answers", len(prompts), len(judged),
             int(metrics["all/accepted"]))
    return StageResult(metrics=metrics, artifacts=["samples/stats.json", "samples/samples.jsonl"])


rejection_sampling = component(name="rejection_sampling", version="1", config="train.vlm",
                               inputs=("shards", "vlm"), outputs=("samples",),
                               view=rejection_sampling_view)(run_rejection_sampling)


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(rejection_sampling))
