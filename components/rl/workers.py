"""The RL step's long-lived worker groups, one Ray actor class each, with the coarse methods the driver
loop calls (verl's single-controller shape): `RolloutWorker.generate` (the generation engine: n samples per
prompt with their token log-probs), `ReferenceWorker.logprobs` (the frozen SFT policy), `RewardWorker.score`
(the reward model for general prompts, the verifiers for verifiable ones, routed by `route_rewards`),
`CriticWorker.values` / `.update` (one value model for both prompt types, started from the reward model)
and `ActorWorker.update` (the policy: VAPO's token-level clip-higher loss).

The actor and the critic train in the training runtime's DeepSpeed engine (`make_engine`: AdamW, ZeRO,
gradient clipping, bf16 from `train.vlm.rl.deepspeed`), each in a one-rank process group of its own (a
long-lived Ray actor outside Ray Train has none, so `ensure_process_group` makes it): with one rank per group
ZeRO shards nothing yet. A group of several ranks (one actor per GPU, one process group over them, the
batch split between them) behind the same coarse methods is the next step for a cluster; not built.

Each group's model runs one sequence at a time (`components/rl/sequences.py`) and pads the per-token
results for the algorithm's (B, T) functions, so every token of the batch weighs the same in the losses.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from components.rl.algorithms import (RlAlgoConfig, entropy_from_logits, policy_loss, route_rewards,
                                      strip_thinking, truncate_rollouts, value_loss)
from components.rl.sequences import Sequence, pad_rows
from components.training.config import DeepSpeedSettings

log = logging.getLogger(__name__)


def device() -> str:
    """Where a group's model runs: the GPU Ray gave its actor (`groups.<name>.num_gpus`), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _threads(threads: int) -> None:
    torch.set_num_threads(max(1, int(threads)))


def peak_rss_mib() -> float:
    """This process's peak resident memory (the group's peak memory on a CPU machine)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RolloutWorker:
    """The generation engine on a copy of the policy; weights replaced from the actor every step."""

    def __init__(self, checkpoint: str, system: str, threads: int = 1) -> None:
        from components.generation.engine import GenerationEngine
        from components.vlm.inference import load_for_inference

        _threads(threads)
        self.model, self.tokenizer = load_for_inference(checkpoint)
        self.engine, self.system = GenerationEngine(self.model, self.tokenizer), system

    def set_weights(self, state: dict[str, torch.Tensor]) -> int:
        """The actor's policy weights, loaded in place (dtype and device converted); returns the tensors set."""
        own = self.model.state_dict()
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value.to(own[name].dtype))
        return len(state)

    def generate(self, prompts: list[dict[str, Any]], max_new_tokens: int, temperature: float, top_p: float,
                 n: int, seeds: list[int], max_response_tokens: int) -> dict[str, Any]:
        """`n` samples of every prompt: per sample its prompt index, the scored sequence, its token log-probs
        and answer text; rollouts longer than `max_response_tokens` are cut, and counted in `truncated` with
        those the engine stopped at `max_new_tokens` before they ended."""
        from components.generation.engine import SamplingParams
        from components.vlm.conversation import answer_text
        from components.vlm.inference import generation_request

        started = time.perf_counter()
        requests = [generation_request(self.engine, self.tokenizer, str(p["question"]), p["images"], p["timestamps"],
                                       self.system, SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                                                   top_p=top_p, seed=seed, n=n))
                    for p, seed in zip(prompts, seeds)]
        completions = self.engine.generate(requests) if requests else []
        samples = [(index, completion) for index, group in enumerate(completions) for completion in group]
        cut, longer = truncate_rollouts([c.token_ids for _, c in samples], max_response_tokens)
        truncated = longer + sum(c.finish_reason == "length" and len(c.token_ids) <= max_response_tokens
                                 for _, c in samples)  # the engine stopped them at max_new_tokens
        rollouts = []
        for (index, completion), ids in zip(samples, cut):
            request = requests[index]
            rollouts.append({"prompt": index, "sequence": Sequence(request.prompt_ids, request.pixel_values,
                                                                   request.grid_hw, ids),
                             "logprobs": list(completion.logprobs[:len(ids)]),
                             "generated_tokens": len(completion.token_ids),  # before the cut
                             "text": answer_text(self.tokenizer, ids),
                             "finish_reason": completion.finish_reason})
        tokens = sum(len(ids) for ids in cut)
        return {"rollouts": rollouts, "truncated": truncated, "tokens": tokens,
                "seconds": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib()}


class ReferenceWorker:
    """The frozen SFT policy: log-probs of the rollouts' tokens, for the KL term."""

    def __init__(self, checkpoint: str, temperature: float, threads: int = 1) -> None:
        from components.vlm.model import load_vlm

        _threads(threads)
        self.model, _, _ = load_vlm(checkpoint, device())
        self.temperature = temperature

    @torch.no_grad()
    def logprobs(self, sequences: list[Sequence]) -> dict[str, Any]:
        from components.rl.sequences import response_logits, token_logprobs

        started = time.perf_counter()
        values = [token_logprobs(response_logits(self.model, s, self.temperature), s.response_ids).tolist()
                  for s in sequences]
        return {"logprobs": values, "seconds": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib()}


class RewardWorker:
    """The reward model (general prompts: the answer with its `<think>` part cut off, scored, normalised to
    [0, 1] with the statistics saved at its training) and the verifiers (verifiable prompts), routed by each
    prompt's type. A response no verifier can read gets 0 and is counted, never raised."""

    def __init__(self, rm_folder: str, thinking: bool, max_tokens: int, min_iou: float, threads: int = 1) -> None:
        from components.rl.sequences import load_value_model

        _threads(threads)
        self.model, self.tokenizer, meta = load_value_model(Path(rm_folder), device())
        self.model.eval()
        self.mean, self.std = float(meta["score_mean"]), float(meta["score_std"])
        self.thinking, self.max_tokens, self.min_iou = thinking, max_tokens, min_iou

    def verifier(self, task: str, response: str, reference: str) -> float:
        from components.vlm.verifiers import verify

        return verify(task, response, reference, thinking=self.thinking)

    @torch.no_grad()
    def score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """`rows`: type, kind, question, images, timestamps, reference, text. -> rewards, raw RM scores, stats."""
        from components.rl.algorithms import normalise_scores
        from components.rl.sequences import answer_ids, encode_prompt
        from components.vlm.modes import system_prompt

        started = time.perf_counter()
        rm_scores: list[float | None] = []
        raw_scores: list[float] = []
        cache: dict[str, tuple[Any, Any, Any]] = {}
        for row in rows:
            if row["type"] != "general":
                rm_scores.append(None)
                continue
            prompt_key = f"{row['key']}:{row['question']}"
            if prompt_key not in cache:
                cache[prompt_key] = encode_prompt(self.model.vlm, self.tokenizer, str(row["question"]), row["images"],
                                                  row["timestamps"], system_prompt("direct"))
            ids, pixels, grid = cache[prompt_key]
            answer = answer_ids(self.tokenizer, strip_thinking(str(row["text"])), max(1, self.max_tokens - len(ids)))
            raw = self.model.score(Sequence(ids, pixels, grid, answer))
            raw_scores.append(float(raw))
            rm_scores.append(float(normalise_scores(raw, self.mean, self.std)))
        rewards, stats = route_rewards([r["type"] for r in rows], [str(r["text"]) for r in rows],
                                       [r.get("reference") for r in rows], [str(r["kind"]) for r in rows],
                                       self.verifier, rm_scores, self.min_iou)
        if raw_scores:
            stats["rm/raw_score"] = sum(raw_scores) / len(raw_scores)
        return {"rewards": rewards, "stats": stats, "seconds": time.perf_counter() - started,
                "peak_rss_mib": peak_rss_mib()}


def ensure_process_group() -> None:
    """A one-rank process group for this group's DeepSpeed engine (gloo on CPU, NCCL on a GPU), on a free
    local port; a process that has one already (two groups in one test process) keeps it."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "seedvl" / "torch_extensions"))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


class _Trained:
    """A trained group: its model in a DeepSpeed engine (the training runtime's `make_engine`: AdamW, ZeRO,
    gradient clipping from `train.vlm.rl.deepspeed`, a constant learning rate), its checkpoint, and the
    test-only kill switch."""

    model: torch.nn.Module
    engine: Any
    tag = "rl"

    def _engine(self, groups: list[dict[str, Any]], learning_rate: float, settings: DeepSpeedSettings) -> None:
        from components.training.worker import make_engine

        ensure_process_group()
        self.engine = make_engine(self.model, [g for g in groups if g["params"]], learning_rate, 0.0,
                                  lambda step: 1.0, settings, micro_batch=1)

    def save(self, folder: str) -> None:
        """Weights, optimiser state (DeepSpeed's checkpoint files) and the torch RNG, under `folder`."""
        self.engine.save_checkpoint(folder, tag=self.tag)
        torch.save(torch.get_rng_state(), Path(folder) / "rng.pt")

    def load(self, folder: str) -> None:
        self.engine.load_checkpoint(folder, tag=self.tag)
        torch.set_rng_state(torch.load(Path(folder) / "rng.pt"))

    def _step(self, loss: torch.Tensor) -> float:
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")


@torch.no_grad()
def linearise_head(head: torch.nn.Linear, mean: float, std: float) -> None:
    """Rescale the reward model's head so that it outputs the first-order expansion of the normalised score
    sigmoid((raw - mean) / std) around the mean, 0.5 + 0.25 * (raw - mean) / std: the critic starts on the
    rewards' [0, 1] scale instead of the raw scores' (which can sit far outside it)."""
    head.weight.mul_(0.25 / std)
    head.bias.copy_(0.5 + 0.25 * (head.bias - mean) / std)


class CriticWorker(_Trained):
    """One value model for both prompt types, started from the reward model's export (backbone and head,
    the head rescaled to the rewards' range by `linearise_head`)."""

    def __init__(self, rm_folder: str, learning_rate: float, trainable: list[str], clip: float | None,
                 deepspeed: DeepSpeedSettings, threads: int = 1) -> None:
        from components.rl.sequences import load_value_model, set_value_trainable

        _threads(threads)
        self.model, _, meta = load_value_model(Path(rm_folder), device())
        linearise_head(self.model.head, float(meta["score_mean"]), float(meta["score_std"]))
        groups = set_value_trainable(self.model, trainable)
        self._engine(groups, learning_rate, deepspeed)
        self.clip = clip

    @torch.no_grad()
    def values(self, sequences: list[Sequence]) -> list[list[float]]:
        self.model.eval()
        return [self.model.values(s).tolist() for s in sequences]

    def update(self, sequences: list[Sequence], old_values: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        """One step on the token-level (clipped) value loss against the returns; (B, T) tensors, right-padded."""
        started = time.perf_counter()
        self.model.train()
        values, mask = pad_rows([self.model.values(s) for s in sequences])
        length, on = values.shape[1], values.device
        loss, stats = value_loss(values, old_values[:, :length].to(on), returns[:, :length].to(on), mask, self.clip)
        norm = self._step(loss)
        return {"value_loss": float(loss.detach()), "critic_grad_norm": norm, **stats,
                "critic_seconds": time.perf_counter() - started, "critic_peak_rss_mib": peak_rss_mib()}


class ActorWorker(_Trained):
    """The policy under training: `update` takes one step of VAPO's token-level clip-higher loss; `weights`
    hands the trainable state to the rollout group; `export` writes the plain VLM export."""

    def __init__(self, checkpoint: str, learning_rate: float, trainable: list[str], algo: RlAlgoConfig,
                 temperature: float, deepspeed: DeepSpeedSettings, fail_at_step: int, marker: str,
                 threads: int = 1) -> None:
        from components.vlm.model import load_vlm, set_trainable

        _threads(threads)
        self.model, self.tokenizer, self.saved = load_vlm(checkpoint, device())
        set_trainable(self.model, trainable)
        self._engine([{"params": [p for p in self.model.parameters() if p.requires_grad]}], learning_rate, deepspeed)
        self.algo, self.temperature = algo, temperature
        self.fail_at_step, self.marker = fail_at_step, Path(marker)
        self.trainable = trainable

    def update(self, sequences: list[Sequence], old_logprobs: torch.Tensor, advantages: torch.Tensor,
               step: int) -> dict[str, float]:
        from components.rl.sequences import response_logits, token_logprobs

        self.maybe_fail(step)
        started = time.perf_counter()
        self.model.train()
        logits = [response_logits(self.model, s, self.temperature) for s in sequences]
        logprobs, mask = pad_rows([token_logprobs(z, s.response_ids) for z, s in zip(logits, sequences)])
        length = logprobs.shape[1]
        on = logprobs.device
        loss, stats = policy_loss(logprobs, old_logprobs[:, :length].to(on), advantages[:, :length].to(on), mask,
                                  self.algo.eps_low, self.algo.eps_high)
        padded_logits, _ = pad_rows(logits)
        entropy = entropy_from_logits(padded_logits.detach(), mask)
        norm = self._step(loss)
        return {"policy_loss": float(loss.detach()), "entropy": float(entropy), "actor_grad_norm": norm, **stats,
                "actor_seconds": time.perf_counter() - started, "actor_peak_rss_mib": peak_rss_mib()}

    def weights(self) -> dict[str, torch.Tensor]:
        """The parts that train, as CPU tensors (what the rollout group loads each step)."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k.split(".")[0] in self.trainable}

    def export(self, folder: str, summary: dict[str, Any]) -> None:
        from components.vlm.model import export_vlm

        self.model.eval()
        keep = {k: v for k, v in self.saved.items() if k not in ("architecture", "vit", "adapter", "image_pad_id")}
        export_vlm(self.model, self.tokenizer, Path(folder), {**keep, **summary})

    def maybe_fail(self, step: int) -> None:
        """Testing aid: this actor's process exits once, abruptly, at `fail_at_step` (a marker file makes it once)."""
        if step != self.fail_at_step or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(str(step))
        log.warning("fail_at_step=%d: the actor group's process exits now", step)
        os._exit(1)
