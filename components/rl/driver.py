"""The hybrid RL step (`vlm_rl`): one readable driver loop over long-lived Ray worker groups
(`components/rl/workers.py`), the SFT export as the starting policy and the reference, the reward model's
export as the reward group's scorer and the critic's starting point.

Every step:
  1. a batch of prompts with both types in it (`PromptSampler`, the mix of `train.vlm.rl.mix`; the verifiable
     kinds' shares follow their running pass rates, `train.vlm.rl.kind_adaptation`, logged as `mix/<kind>`);
  2. rollout: n samples per prompt with their token log-probs (cut at the limit, counted);
  3. in parallel (`seconds/scoring`): the reference policy's log-probs, the critic's values, the rewards
     (reward model for general prompts, verifiers for verifiable ones);
  4. token rewards with the KL to the reference at each prompt type's coefficient, VAPO's decoupled GAE
     (length-adaptive lambda for the policy's advantages, lambda 1.0 for the critic's returns);
  5. the critic's update; from step `value_pretrain_steps` on, the actor's update too (before it, value
     pretraining: the critic learns the SFT policy's returns while the policy stays put);
  6. the actor's new weights to the rollout group (through the object store, never the driver);
  7. `rl/<metric>` logged to the step's MLflow run; every `checkpoint_every` steps the loop's whole state
     (actor and critic weights and optimisers as DeepSpeed checkpoints, their RNG, the sampler's position)
     saved under the step's output folder.

An actor group that dies (a crash, or the test-only `fail_at_step`) makes the driver recreate every group and
resume from the last checkpoint, up to `max_restarts` times; rollout seeds are a function of (seed, step,
prompt), so the resumed run replays what an uninterrupted one would have done. The checkpoints live beside
the step's staging folder under its cache key, so a rerun of the pipeline after the whole process was killed
resumes the step from them too (`checkpoint_folder`).
The policy is exported with `export_vlm` (its summary names the answer modes), so serving loads it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from components.common.cache import STAGING_PREFIX
from components.common.contract import StageContext, StageResult, component
from components.rl.algorithms import (advantages_and_returns, explained_variance, kl_by_type, kl_coef_per_sequence,
                                      kl_penalty, token_rewards)
from components.rl.config import RlConfig, RlJob
from components.rl.prompts import PromptSampler, rl_prompts
from components.rl.sequences import pad_rows
from components.training.shards import DropCounter
from components.vlm.config import rl_view

log = logging.getLogger(__name__)
FAILED_ONCE = ".rl_failed_once"
KEEP_CHECKPOINTS = 2


class WorkerGroups:
    """The five long-lived actor groups (one Ray actor each here), their resources from config."""

    def __init__(self, job: RlJob, policy: str, reward_model: str, out_dir: Path) -> None:
        import ray

        from components.rl.workers import ActorWorker, CriticWorker, ReferenceWorker, RewardWorker, RolloutWorker
        from components.vlm.modes import system_prompt

        cfg, groups = job.rl, job.rl.groups

        def spawn(cls: type, group: Any, *args: Any) -> Any:
            threads = max(1, int(round(group.num_cpus)))
            return ray.remote(cls).options(num_cpus=group.num_cpus, num_gpus=group.num_gpus,
                                           max_restarts=0).remote(*args, threads=threads)

        self.rollout = spawn(RolloutWorker, groups.rollout, policy, system_prompt(cfg.answer_mode))
        self.reference = spawn(ReferenceWorker, groups.reference, policy, cfg.temperature)
        self.reward = spawn(RewardWorker, groups.reward, reward_model, cfg.answer_mode == "thinking", job.rm_max_tokens,
                            cfg.algo.pass_min_iou)
        self.critic = spawn(CriticWorker, groups.critic, reward_model, cfg.critic_learning_rate, cfg.trainable,
                            cfg.algo.value_clip, cfg.deepspeed)
        self.actor = spawn(ActorWorker, groups.actor, policy, cfg.actor_learning_rate, cfg.trainable, cfg.algo,
                           cfg.temperature, cfg.deepspeed, cfg.fail_at_step, str(out_dir / FAILED_ONCE))
        self.all = [self.rollout, self.reference, self.reward, self.critic, self.actor]

    def shutdown(self) -> None:
        import ray

        for handle in self.all:
            ray.kill(handle, no_restart=True)


def rollout_seeds(seed: int, step: int, prompts: list[dict[str, Any]]) -> list[int]:
    """One seed per prompt, a function of (run seed, step, prompt): a resumed run samples what the
    uninterrupted one did."""
    return [zlib.crc32(f"{seed}:{step}:{p['prompt_id']}".encode()) for p in prompts]


def rl_step(groups: WorkerGroups, sampler: PromptSampler, cfg: RlConfig, step: int,
            seed: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """One step of the loop (the module docstring's 1-6): its metrics, and each prompt's first rollout with its
    reward (what the policy says, to read beside the curves)."""
    import ray

    timings: dict[str, float] = {}
    started = time.perf_counter()
    prompts = sampler.next_batch(cfg.prompts_per_step)
    generated = ray.get(groups.rollout.generate.remote(prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                                       cfg.samples_per_prompt, rollout_seeds(seed, step, prompts),
                                                       cfg.algo.max_response_tokens))
    timings["generation"] = time.perf_counter() - started
    rollouts = generated["rollouts"]
    sequences = ray.put([r["sequence"] for r in rollouts])
    rows = [{**{k: prompts[r["prompt"]][k] for k in ("key", "kind", "type", "question", "reference", "images",
                                                      "timestamps")}, "text": r["text"]} for r in rollouts]
    types = [row["type"] for row in rows]
    shares = {kind: share for t in ("general", "verifiable") for kind, share in sampler.shares(t).items()}

    mark = time.perf_counter()
    reference_ref, values_ref, reward_ref = (groups.reference.logprobs.remote(sequences),
                                             groups.critic.values.remote(sequences), groups.reward.score.remote(rows))
    scored, reference, values = ray.get([reward_ref, reference_ref, values_ref])
    timings["scoring"] = time.perf_counter() - mark  # the three groups at once: the wall time of the slowest
    timings["reward_busy"], timings["reference_busy"] = scored["seconds"], reference["seconds"]

    old_logprobs, mask = pad_rows([torch.tensor(r["logprobs"], dtype=torch.float32) for r in rollouts])
    ref_logprobs, _ = pad_rows([torch.tensor(v, dtype=torch.float32) for v in reference["logprobs"]])
    old_values, _ = pad_rows([torch.tensor(v, dtype=torch.float32) for v in values])
    kl = kl_penalty(old_logprobs, ref_logprobs, cfg.algo.kl_estimator)
    scores = torch.tensor(scored["rewards"], dtype=torch.float32)
    rewards = token_rewards(scores, mask, kl, kl_coef_per_sequence(types, cfg.algo.kl_coef))
    advantages, returns = advantages_and_returns(rewards, old_values, mask, cfg.algo)

    mark = time.perf_counter()
    critic_stats = ray.get(groups.critic.update.remote(sequences, old_values, returns))
    timings["critic"] = time.perf_counter() - mark
    metrics: dict[str, float] = {**scored["stats"], **critic_stats, **{f"mix/{k}": v for k, v in shares.items()}}
    sampler.observe({key.split("/")[1]: value for key, value in scored["stats"].items()
                     if key.startswith("verifier/") and key.endswith("/pass_rate") and key.count("/") == 2})
    policy_moves = step >= cfg.value_pretrain_steps
    if policy_moves:
        mark = time.perf_counter()
        for _ in range(cfg.updates_per_step):
            metrics |= ray.get(groups.actor.update.remote(sequences, old_logprobs, advantages, step))
        timings["actor"] = time.perf_counter() - mark
        mark = time.perf_counter()
        ray.get(groups.rollout.set_weights.remote(groups.actor.weights.remote()))
        timings["weight_sync"] = time.perf_counter() - mark

    lengths = mask.sum(dim=1).float()
    metrics |= {f"kl/{kind}": value for kind, value in kl_by_type(kl, mask, types).items()}
    for kind in ("general", "verifiable"):
        rows_of = torch.tensor([t == kind for t in types])
        if bool(rows_of.any()):
            metrics[f"response_length/{kind}"] = float(lengths[rows_of].mean())
    ev = explained_variance(old_values, returns, mask)
    if ev is not None:
        metrics["explained_variance"] = ev
    examples = [{"step": step, "kind": row["kind"], "question": row["question"], "reference": row["reference"],
                 "response": row["text"], "reward": reward}
                for row, reward in zip(rows[::cfg.samples_per_prompt], scored["rewards"][::cfg.samples_per_prompt])]
    step_seconds = time.perf_counter() - started
    metrics |= {"response_length": float(lengths.mean()) if len(lengths) else 0.0,
                "truncated": float(generated["truncated"]), "rollouts": float(len(rollouts)),
                "policy_updating": float(policy_moves), "rollout_tokens_per_s": generated["tokens"] / max(
                    generated["seconds"], 1e-9),
                "rollout_peak_rss_mib": generated["peak_rss_mib"], "reference_peak_rss_mib": reference["peak_rss_mib"],
                "reward_peak_rss_mib": scored["peak_rss_mib"], "step_seconds": step_seconds,
                **{f"seconds/{k}": v for k, v in timings.items()}}
    return metrics, examples


# ---------------------------------------------------------------------------------------------- checkpoints


def write_checkpoint(folder: Path, step: int, sampler: dict[str, Any], save_groups: Callable[[Path], None],
                     logged: dict[str, Any] | None = None) -> Path:
    """The loop's state after `step` steps: `save_groups(tmp)` has the trained groups write theirs under `tmp`
    (`actor/`, `critic/`: DeepSpeed's files and their RNG), then the sampler's position and what was logged
    so far (`logged`: the per-step metrics and example rollouts, so a resumed run's summary covers every step)
    go beside them and the folder is renamed into place, so the newest complete one is what a restart reads;
    older ones beyond `KEEP_CHECKPOINTS` removed."""
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_groups(tmp)
    (tmp / "driver.json").write_text(json.dumps({"step": step, "sampler": sampler, "logged": logged or {}}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    for old in sorted(folder.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(checkpoint: Path) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(step, sampler state, what was logged) of a checkpoint folder; the groups load their own parts from it."""
    driver = json.loads((checkpoint / "driver.json").read_text())
    return int(driver["step"]), driver["sampler"], driver.get("logged", {})


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "driver.json").is_file())
    return done[-1] if done else None


def save_checkpoint(groups: WorkerGroups, sampler: PromptSampler, step: int, folder: Path,
                    logged: dict[str, Any]) -> Path:
    import ray

    def save_groups(tmp: Path) -> None:
        ray.get([groups.actor.save.remote(str(tmp / "actor")), groups.critic.save.remote(str(tmp / "critic"))])

    return write_checkpoint(folder, step, sampler.state_dict(), save_groups, logged)


def restore_checkpoint(groups: WorkerGroups, sampler: PromptSampler, checkpoint: Path) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint into fresh groups (the rollout group gets the actor's weights): the step to resume at,
    and what was logged up to it."""
    import ray

    step, sampler_state, logged = read_checkpoint(checkpoint)
    ray.get([groups.actor.load.remote(str(checkpoint / "actor")), groups.critic.load.remote(str(checkpoint / "critic"))])
    ray.get(groups.rollout.set_weights.remote(groups.actor.weights.remote()))
    sampler.load_state(sampler_state)
    return step, logged


# ---------------------------------------------------------------------------------------------- the step


def train_rl(job: RlJob, pools: dict[str, list[dict[str, Any]]], policy: str, reward_model: str, out_dir: Path,
             checkpoints: Path, seed: int, log_metrics: Any) -> tuple[list[dict[str, float]], int, WorkerGroups]:
    """The loop, starting from the last checkpoint in `checkpoints` if there is one and restarting from it
    when a group dies; (per-step metrics of every step, restarts in this call, the live groups)."""
    import ray

    cfg = job.rl
    total = cfg.value_pretrain_steps + cfg.steps
    restarts = 0
    while True:
        groups = WorkerGroups(job, policy, reward_model, out_dir)
        adapt = cfg.kind_adaptation
        sampler = PromptSampler(pools, cfg.mix, seed, adapt.enabled, adapt.floor, adapt.momentum)
        latest = latest_checkpoint(checkpoints)
        step, logged = restore_checkpoint(groups, sampler, latest) if latest else (0, {})
        history = {int(k): v for k, v in logged.get("history", {}).items()}
        examples = {int(k): v for k, v in logged.get("examples", {}).items()}
        if latest:
            log.info("vlm_rl: resuming at step %d of %d from %s", step, total, latest)
        try:
            while step < total:
                metrics, shown = rl_step(groups, sampler, cfg, step, seed)
                metrics["restarts"] = float(restarts)
                history[step], examples[step] = metrics, shown
                log_metrics({f"rl/{k}": v for k, v in metrics.items()}, step)
                step += 1
                if step % cfg.checkpoint_every == 0 or step == total:
                    save_checkpoint(groups, sampler, step, checkpoints, {"history": history, "examples": examples})
                log.info("rl step %d/%d: reward general %s verifiable %s, kl %s, %.1fs", step, total,
                         _fmt(metrics.get("reward/general")), _fmt(metrics.get("reward/verifiable")),
                         _fmt(metrics.get("kl/general")), metrics["step_seconds"])
            write_jsonl(out_dir / "rollouts.jsonl", [e for s in sorted(examples) for e in examples[s]])
            return [history[s] for s in sorted(history)], restarts, groups
        except ray.exceptions.RayActorError as error:
            groups.shutdown()
            restarts += 1
            if restarts > cfg.max_restarts:
                raise RuntimeError(f"vlm_rl: a worker group died {restarts} times (train.vlm.rl.max_restarts="
                                   f"{cfg.max_restarts}); last error: {error}") from error
            log.warning("vlm_rl: a worker group died at step %d (%s); restarting from %s", step,
                        type(error).__name__, latest_checkpoint(checkpoints) or "the start")


def write_jsonl(path: Path, examples: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in examples))
    tmp.replace(path)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summarise_history(history: list[dict[str, float]], value_pretrain_steps: int) -> dict[str, float]:
    """The step's headline numbers: reward by type at the first and last policy steps (means over the
    first and last quarter of them, the curve's ends), and means of the rest over the policy steps."""
    policy = history[value_pretrain_steps:] or history
    quarter = max(1, len(policy) // 4)
    out: dict[str, float] = {"steps": float(len(history)), "policy_steps": float(len(history) - value_pretrain_steps)}
    for key in ("reward/general", "reward/verifiable", "reward/all", "verifier/pass_rate", "rm/score"):
        first = [m[key] for m in policy[:quarter] if key in m]
        last = [m[key] for m in policy[-quarter:] if key in m]
        if first and last:
            name = key.replace("/", "_")
            out[f"{name}_first"], out[f"{name}_last"] = sum(first) / len(first), sum(last) / len(last)
    for key in ("kl/general", "kl/verifiable", "entropy", "response_length", "clip_fraction_low",
                "clip_fraction_high", "value_loss", "explained_variance", "truncated", "verifier/unparseable",
                "rollout_tokens_per_s", "step_seconds"):
        values = [m[key] for m in policy if key in m]
        if values:
            out[f"mean_{key.replace('/', '_')}"] = sum(values) / len(values)
    return out


def checkpoint_folder(ctx: StageContext[RlJob]) -> Path:
    """Where the loop's checkpoints live: beside the step's staging folder, named by the step's cache key
    (`<cache>/vlm_rl/.resume-<key>/`), so that a rerun of the same step after the whole pipeline was killed
    (its staging folder then removed as abandoned) resumes from them; removed when the step succeeds. A step
    run outside the cache (an explicit output folder) keeps them in its output folder."""
    name = ctx.workdir.name
    if name.startswith(STAGING_PREFIX):
        return ctx.workdir.parent / f".resume-{name[len(STAGING_PREFIX):].split('-')[0]}"
    return ctx.outputs["vlm"] / "checkpoints"


def run_rl(ctx: StageContext[RlJob]) -> StageResult:
    import ray

    from components.vlm.modes import MODES

    job, out_dir = ctx.config, ctx.outputs["vlm"]
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = ctx.inputs["vlm"] / "model"
    reward_model = ctx.inputs["reward_model"] / "model"
    for folder, what in ((policy, "SFT export"), (reward_model, "reward-model export")):
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"vlm_rl: {folder} is not a {what}; run its step first")
    counter = DropCounter()
    cfg = job.rl
    pools = rl_prompts(ctx.inputs["shards"], [*cfg.general_kinds, *cfg.verifiable_kinds], cfg.prompts_per_task,
                       job.holdout_fraction, job.frames_per_clip, counter)
    if not any(pools.values()):
        raise ValueError("vlm_rl found no training-split prompt of train.vlm.rl.general_kinds or verifiable_kinds "
                         "in the shards; check the data steps")
    started = time.perf_counter()
    checkpoints = checkpoint_folder(ctx)
    history, restarts, groups = train_rl(job, pools, str(policy), str(reward_model), out_dir, checkpoints, ctx.seed,
                                         ctx.log_metrics)
    metrics = summarise_history(history, cfg.value_pretrain_steps)
    metrics |= {"restarts": float(restarts), "seconds": time.perf_counter() - started,
                **{f"prompts_{kind}": float(len(pool)) for kind, pool in pools.items()}}
    summary = {"stage": "rl", "answer_modes": dict(MODES), "rl_answer_mode": cfg.answer_mode, "rl": metrics}
    ray.get(groups.actor.export.remote(str(out_dir / "model"), summary))
    groups.shutdown()
    shutil.rmtree(checkpoints, ignore_errors=True)  # the export is what later steps read
    (out_dir / FAILED_ONCE).unlink(missing_ok=True)
    write_jsonl(out_dir / "rl_log.jsonl", [{"step": s, **m} for s, m in enumerate(history)])
    (out_dir / "summary.json").write_text(json.dumps(metrics, indent=1))
    return StageResult(metrics=metrics, artifacts=["vlm/summary.json", "vlm/rl_log.jsonl", "vlm/rollouts.jsonl"])


vlm_rl = component(name="vlm_rl", version="2", config="train.vlm", inputs=("shards", "vlm", "reward_model"),
                   outputs=("vlm",), key_exclude=("fail_at_step", "checkpoint_every", "max_restarts", "groups"),
                   view=rl_view)(run_rl)


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(vlm_rl))
