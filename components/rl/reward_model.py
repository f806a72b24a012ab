"""The reward-model step (`reward_model`): a scalar value head on the SFT export, trained with Bradley-Terry
on preference pairs, exported for the RL step's reward group (and as the critic's starting point).

Where the pairs come from, at our scale (there is no human preference data for our synthetic tasks):

* verifiable prompts: every sample the rejection-sampling step drew (`samples.jsonl`, with its verdict). A
  verified-correct answer is preferred to a wrong one of the same prompt. When no sample of a prompt was
  correct (the tiny SFT model rarely is), the prompt's reference answer stands in as the verified-correct
  one: it is correct by construction.
* caption prompts (the general prompts RL scores with this model): a training-split caption sample of the
  curated shards; its reference caption (concise) is preferred to a rambling one, the same caption with
  `rambling_sentences` sentences of other samples' captions appended; and, with `colour_swaps`, preferred
  to the same caption with one object's colour word changed to another colour (a "faithful" pair: the two
  answers differ in one word that only the picture can decide, so the model cannot rank them by length or
  style). Without these pairs the reward model learned length alone, and RL drifted towards captions it
  scored well without naming the objects' colours (README, "What SFT and RL do on the small profile"). With
  `omissions`, the reference is also preferred to itself with one object of its list left out (a "complete"
  pair): the concise pairs teach that shorter is better, and RL with them drifted to naming one object of
  four.

The `<think>` part of every answer is cut off (`strip_thinking`) before the model sees it, as in RL. Pairs
are split by prompt: the held-out prompts' pairs never train and give the held-out pair accuracy (before and
after training). The raw scores' mean and std over the training pairs are saved with the export, so RL maps
a score to [0, 1] with `normalise_scores`. Trained with AdamW in one Ray task (a small job: no DeepSpeed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from components.common.contract import StageContext, StageResult, component
from components.rl.algorithms import bradley_terry_loss, pair_accuracy, strip_thinking
from components.rl.config import RewardModelJob
from components.training.shards import DropCounter
from components.vlm.config import reward_model_view

log = logging.getLogger(__name__)
CAPTION_QUESTION_KIND = "caption"


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """Two answers to one prompt, `chosen` preferred; `source` says which rule made the pair."""

    prompt: str  # "<key>:<turn>", the unit of the held-out split
    key: str
    task: str  # the shard folder its media come from
    question: str
    chosen: str
    rejected: str
    source: str  # "verified" (a correct sample over a wrong one), "reference" (the reference over a wrong
    # sample), "concise" (a reference caption over a rambling one), "faithful" (a reference caption over the
    # same caption with one object's colour changed), "complete" (over the same caption with one object left out)


def verifiable_pairs(samples: list[dict[str, Any]], max_per_prompt: int, seed: int) -> list[PreferencePair]:
    """Per prompt of the rejection-sampling log: correct answers over wrong ones (the reference when none is
    correct), `<think>` stripped, de-duplicated, at most `max_per_prompt` pairs, drawn with `seed`. A prompt
    whose wrong answers all read like its chosen ones gives no pair."""
    by_prompt: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in samples:
        by_prompt[str(row["key"]), int(row["turn"])].append(row)
    pairs: list[PreferencePair] = []
    for (key, turn), rows in sorted(by_prompt.items()):
        correct = _unique(strip_thinking(str(r["response"])) for r in rows if r.get("correct"))
        source = "verified"
        if not correct:
            correct, source = [str(rows[0]["reference"]).strip()], "reference"
        wrong = [a for a in _unique(strip_thinking(str(r["response"])) for r in rows if not r.get("correct"))
                 if _norm(a) not in {_norm(c) for c in correct}]
        candidates = [(c, w) for c in correct for w in wrong]
        random.Random(zlib.crc32(f"{seed}:{key}:{turn}".encode())).shuffle(candidates)
        first = rows[0]
        pairs += [PreferencePair(f"{key}:{turn}", key, str(first["task"]), str(first["question"]), c, w, source)
                  for c, w in candidates[:max_per_prompt]]
    return pairs


def caption_pairs(captions: list[tuple[str, str, str]], sentences: int, seed: int,
                  colour_swaps: int = 0, omissions: int = 0) -> list[PreferencePair]:
    """(key, question, reference caption) -> the reference preferred to itself followed by `sentences`
    sentences of other samples' captions (a rambling answer: longer, and about another picture; needs two
    captions at least), to up to `colour_swaps` copies of itself with one object colour word changed
    (`colour_swapped`, source "faithful"), and to up to `omissions` copies of itself with one object left out
    (`object_dropped`, source "complete")."""
    rng = random.Random(seed)
    pairs = []
    for index, (key, question, caption) in enumerate(captions):
        others = [c for i, (_, _, c) in enumerate(captions) if i != index and _norm(c) != _norm(caption)]
        if others:
            extra = [_first_sentence(rng.choice(others)) for _ in range(sentences)]
            rambling = " ".join([caption.rstrip(), *extra])
            pairs.append(PreferencePair(f"{key}:0", key, "caption", question, caption.strip(), rambling, "concise"))
        swaps = colour_swapped(caption.strip(), colour_swaps, random.Random(zlib.crc32(f"{seed}:{key}".encode())))
        pairs += [PreferencePair(f"{key}:0", key, "caption", question, caption.strip(), wrong, "faithful")
                  for wrong in swaps]
        short = object_dropped(caption.strip(), omissions, random.Random(zlib.crc32(f"{seed}:{key}:drop".encode())))
        pairs += [PreferencePair(f"{key}:0", key, "caption", question, caption.strip(), wrong, "complete")
                  for wrong in short]
    return pairs


def object_dropped(caption: str, count: int, rng: random.Random) -> list[str]:
    """Up to `count` distinct copies of a scene caption ("<objects> on a <colour> background", its objects the
    phrases `probes.OBJECT_PHRASE` reads) with one object left out: "a red circle, a blue square and two green
    diamonds on a gray background" -> "a red circle and two green diamonds on a gray background". A caption
    without the background phrase, or with fewer than two objects, gives none."""
    from components.common.probes import OBJECT_PHRASE
    from components.vlm.verifiers import background_span

    background = background_span(caption)
    if background is None or count < 1:
        return []
    items = [m.group() for m in OBJECT_PHRASE.finditer(caption[:background[0]])]
    if len(items) < 2:
        return []
    out = []
    for drop in rng.sample(range(len(items)), min(count, len(items))):
        rest = items[:drop] + items[drop + 1:]
        listed = rest[0] if len(rest) == 1 else ", ".join(rest[:-1]) + " and " + rest[-1]
        out.append(f"{listed} {caption[background[0]:].strip()}")
    return _unique(out)


def colour_swapped(caption: str, count: int, rng: random.Random) -> list[str]:
    """Up to `count` distinct copies of `caption` with one colour word of its objects (not the "on a ...
    background" phrase) changed to another object colour: "a red circle on a white background" -> "a blue
    circle on a white background". A caption naming no object colour gives none."""
    from components.common.probes import OBJECT_COLOURS
    from components.vlm.verifiers import background_span

    background = background_span(caption)
    words = [m for m in re.finditer(r"[A-Za-z]+", caption) if m.group().lower() in OBJECT_COLOURS
             and (background is None or not background[0] <= m.start() < background[1])]
    options = [(m, colour) for m in words for colour in OBJECT_COLOURS if colour != m.group().lower()]
    rng.shuffle(options)
    return [caption[:m.start()] + colour + caption[m.end():] for m, colour in options[:count]]


def split_pairs(pairs: list[PreferencePair], fraction: float, seed: int) -> tuple[list[PreferencePair],
                                                                                  list[PreferencePair]]:
    """(training, held-out) by prompt, by a seeded hash of the prompt: no prompt has pairs on both sides.
    With two prompts or more, each side gets at least one."""
    prompts = sorted({p.prompt for p in pairs})
    held = {p for p in prompts if zlib.crc32(f"{seed}:{p}".encode()) / 2**32 < fraction}
    if len(prompts) >= 2:
        if not held:
            held = {prompts[-1]}
        elif held == set(prompts):
            held.discard(prompts[0])
    return [p for p in pairs if p.prompt not in held], [p for p in pairs if p.prompt in held]


def _unique(texts: Any) -> list[str]:
    seen, out = set(), []
    for text in texts:
        if text.strip() and _norm(text) not in seen:
            seen.add(_norm(text))
            out.append(text.strip())
    return out


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _first_sentence(text: str) -> str:
    sentence = text.strip().split(". ")[0].strip()
    return sentence if sentence.endswith(".") else sentence + "."


# ---------------------------------------------------------------------------------------------- data


def prompt_media(shards_dir: Path, keys_by_task: dict[str, set[str]], holdout_fraction: float,
                 frames_per_clip: int) -> dict[str, tuple[list[bytes], list[float]]]:
    """The PNG bytes of the images (or frames, with their times) of the training-split samples named."""
    from components.training.shards import ShardStream, task_shards
    from components.vlm.data import decode_sample, select_frames, vlm_split_key
    from components.vlm.data import encode_png

    media: dict[str, tuple[list[bytes], list[float]]] = {}
    counter = DropCounter()
    for task, keys in sorted(keys_by_task.items()):
        shards = task_shards(shards_dir, (task,))
        stream = ShardStream(shards, 0, 1, 0, held_out=False, holdout_fraction=holdout_fraction, counter=counter,
                             split_key=vlm_split_key)
        for raw in stream.epoch(0) if shards else ():
            if raw.key not in keys or raw.key in media:
                continue
            sample = decode_sample(raw, task, counter)
            if sample is not None:
                images, stamps = select_frames(sample, frames_per_clip)
                media[raw.key] = ([encode_png(i) for i in images], list(stamps or []))
    return media


def training_captions(shards_dir: Path, limit: int, holdout_fraction: float) -> list[tuple[str, str, str]]:
    """(key, question, caption) of up to `limit` training-split caption samples of the curated shards."""
    from components.training.shards import ShardStream, task_shards
    from components.vlm.data import decode_sample, vlm_split_key
    from components.vlm.eval_tasks import items_from_sample

    shards = task_shards(shards_dir, ("caption",))
    if not shards or limit < 1:
        return []
    counter = DropCounter()
    stream = ShardStream(shards, 0, 1, 0, held_out=False, holdout_fraction=holdout_fraction, counter=counter,
                         split_key=vlm_split_key)
    out = []
    for raw in stream.epoch(0):
        if len(out) >= limit:
            break
        if raw.base_key() != raw.key:
            continue
        sample = decode_sample(raw, "caption", counter)
        items = items_from_sample({**sample.info, "task": "caption", "key": sample.key}) if sample else []
        if items:
            out.append((sample.key, items[0].question, items[0].reference))
    return out


# ---------------------------------------------------------------------------------------------- training


def pair_sequences(model: Any, tokenizer: Any, pair: PreferencePair, media: dict[str, tuple[list[bytes], list[float]]],
                   max_tokens: int) -> tuple[Any, Any] | None:
    """The chosen and the rejected answer as scored sequences (the direct-mode prompt: the model sees no
    reasoning); None when the prompt's media are missing."""
    from components.rl.sequences import Sequence, answer_ids, encode_prompt
    from components.vlm.modes import system_prompt

    if pair.key not in media:
        return None
    images, stamps = media[pair.key]
    ids, pixels, grid = encode_prompt(model.vlm, tokenizer, pair.question, images, stamps, system_prompt("direct"))
    budget = max(1, max_tokens - len(ids))
    return tuple(Sequence(ids, pixels, grid, answer_ids(tokenizer, answer, budget))  # type: ignore[return-value]
                 for answer in (pair.chosen, pair.rejected))


@torch.no_grad()
def score_pairs(model: Any, encoded: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    chosen = torch.stack([model.score(c) for c, _ in encoded]) if encoded else torch.zeros(0)
    rejected = torch.stack([model.score(r) for _, r in encoded]) if encoded else torch.zeros(0)
    return chosen, rejected


def accuracy_by_source(chosen: torch.Tensor, rejected: torch.Tensor, pairs: list[PreferencePair],
                       prefix: str) -> dict[str, float]:
    out = {f"{prefix}pair_accuracy": pair_accuracy(chosen, rejected)} if len(pairs) else {}
    for source in sorted({p.source for p in pairs}):
        index = torch.tensor([p.source == source for p in pairs])
        out[f"{prefix}pair_accuracy_{source}"] = pair_accuracy(chosen[index], rejected[index])
    return out


def train_reward_model(checkpoint: str, train_pairs: list[PreferencePair], heldout_pairs: list[PreferencePair],
                       media: dict[str, tuple[list[bytes], list[float]]], job: RewardModelJob, seed: int,
                       export_dir: str, threads: int) -> dict[str, Any]:
    """Bradley-Terry training of a value head on the export at `checkpoint` (a Ray task): per-step losses and
    the held-out accuracy before and after, the export written to `export_dir`."""
    from components.rl.sequences import ValueModel, export_value_model, set_value_trainable
    from components.vlm.model import load_vlm

    torch.set_num_threads(max(1, threads))
    torch.manual_seed(seed)
    cfg = job.reward_model
    vlm, tokenizer, saved = load_vlm(checkpoint)
    model = ValueModel(vlm)
    groups = set_value_trainable(model, cfg.trainable)
    groups[0]["lr"], groups[1]["lr"] = cfg.learning_rate, cfg.head_learning_rate
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    encode = lambda pairs: [e for p in pairs if (e := pair_sequences(model, tokenizer, p, media, cfg.max_tokens))]  # noqa: E731
    train_enc, heldout_enc = encode(train_pairs), encode(heldout_pairs)
    kept_heldout = [p for p in heldout_pairs if p.key in media]
    if not train_enc:
        raise ValueError("reward_model has no training pair with its media: check the rejection-sampling samples "
                         "and train.vlm.reward_model.caption_prompts")
    metrics: dict[str, Any] = {"train_pairs": float(len(train_enc)), "heldout_pairs": float(len(heldout_enc))}
    if heldout_enc:
        metrics |= accuracy_by_source(*score_pairs(model, heldout_enc), kept_heldout, "initial_heldout_")
    rng = random.Random(seed)
    steps, started = [], time.perf_counter()
    for step in range(cfg.steps):
        model.train()
        batch = [train_enc[rng.randrange(len(train_enc))] for _ in range(cfg.pairs_per_step)]
        chosen = torch.stack([model.score(c) for c, _ in batch])
        rejected = torch.stack([model.score(r) for _, r in batch])
        loss = bradley_terry_loss(chosen, rejected)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        steps.append({"bt_loss": float(loss.detach()), "batch_pair_accuracy": pair_accuracy(chosen.detach(), rejected.detach()),
                      "margin": float((chosen - rejected).detach().mean())})
    metrics["seconds"] = time.perf_counter() - started
    train_chosen, train_rejected = score_pairs(model, train_enc)
    kept_train = [p for p in train_pairs if p.key in media]
    metrics |= accuracy_by_source(train_chosen, train_rejected, kept_train, "train_")
    if heldout_enc:
        metrics |= accuracy_by_source(*score_pairs(model, heldout_enc), kept_heldout, "heldout_")
    raw = torch.cat([train_chosen, train_rejected])
    mean, std = float(raw.mean()), float(raw.std(unbiased=False).clamp_min(1e-6))
    metrics |= {"score_mean": mean, "score_std": std, "bt_loss_first": steps[0]["bt_loss"],
                "bt_loss_last": steps[-1]["bt_loss"]}
    head_meta = {"score_mean": mean, "score_std": std, "normalise": "sigmoid((raw - score_mean) / score_std)",
                 "prompt_mode": "direct", "thinking_stripped": True}
    summary = {k: v for k, v in saved.items() if k not in ("architecture", "vit", "adapter", "image_pad_id")}
    export_value_model(model, tokenizer, Path(export_dir), {**summary, "reward_model": metrics}, head_meta)
    return {"metrics": metrics, "steps": steps}


def sft_export(inputs: dict[str, Path]) -> Path:
    """The SFT export the reward model starts from (the pipeline wires the last SFT round that ran)."""
    folder = inputs["vlm"] / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a VLM export; run the SFT steps first")
    return folder


def run_reward_model(ctx: StageContext[RewardModelJob]) -> StageResult:
    import ray

    job, out_dir = ctx.config, ctx.outputs["reward_model"]
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = job.reward_model
    samples_file = ctx.inputs["rs"] / "samples.jsonl"
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    pairs = verifiable_pairs(samples, cfg.max_pairs_per_prompt, ctx.seed)
    captions = training_captions(ctx.inputs["shards"], cfg.caption_prompts, job.holdout_fraction)
    pairs += caption_pairs(captions, cfg.rambling_sentences, ctx.seed, cfg.colour_swaps, cfg.omissions)
    train_pairs, heldout_pairs = split_pairs(pairs, cfg.heldout_fraction, ctx.seed)
    keys: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        keys[pair.task].add(pair.key)
    media = prompt_media(ctx.inputs["shards"], keys, job.holdout_fraction, job.frames_per_clip)
    held = {p.prompt for p in heldout_pairs}
    (out_dir / "pairs.jsonl").write_text("".join(json.dumps({**dataclasses.asdict(p), "heldout": p.prompt in held})
                                                 + "\n" for p in pairs))
    task = ray.remote(train_reward_model).options(num_cpus=cfg.resources.num_cpus, num_gpus=cfg.num_gpus,
                                                  **cfg.resources.placement_kwargs())
    result = ray.get(task.remote(str(sft_export(ctx.inputs)), train_pairs, heldout_pairs, media, job, ctx.seed,
                                 str(out_dir / "model"), max(1, int(cfg.resources.num_cpus))))
    for step, record in enumerate(result["steps"]):
        ctx.log_metrics({f"train/{k}": v for k, v in record.items()}, step)
    metrics = dict(result["metrics"])
    metrics |= {f"pairs_{source}": float(sum(p.source == source for p in pairs)) for source in
                ("verified", "reference", "concise", "faithful", "complete")}
    metrics["pairs_missing_media"] = float(sum(p.key not in media for p in pairs))
    (out_dir / "summary.json").write_text(json.dumps(metrics, indent=1))
    log.info("reward_model: %d training pairs, held-out pair accuracy %.3f (before training %.3f)",
             int(metrics["train_pairs"]), metrics.get("heldout_pair_accuracy", float("nan")),
             metrics.get("initial_heldout_pair_accuracy", float("nan")))
    return StageResult(metrics=metrics, artifacts=["reward_model/summary.json", "reward_model/pairs.jsonl"])


reward_model = component(name="reward_model", version="3", config="train.vlm", inputs=("shards", "rs", "vlm"),
                         outputs=("reward_model",), view=reward_model_view)(run_reward_model)


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(reward_model))
