"""The pure algorithm core of hybrid RL: rewards routed by prompt type, VAPO's PPO refinements (length-adaptive
GAE decoupled between policy and critic, token-level clip-higher policy loss), the KL penalty per prompt type,
the critic's loss and the reward model's Bradley-Terry pieces. torch only, no Ray: the driver and its actor
groups call these functions on their batches.

Conventions, shared by every tensor function here:

* A batch is padded to `(B, T)`: row b holds one response's tokens, `mask[b, t]` is 1 on a response token and
  0 elsewhere (right padding in practice). Positions off the mask may hold anything (garbage, inf, NaN): they
  are read through `torch.where`, never multiplied in, and come back as 0.
* Token-level means weigh every response token of the batch the same: sum over all response tokens divided by
  their number (VAPO / DAPO), not a mean of per-sequence means, so long responses are not diluted.
* Means over an empty set never produce NaN: a loss over no tokens is 0, a logged statistic over nothing is
  left out of its dict (or None), so a batch without one prompt type logs only what it has.
* Prompt types are "general" (scored by the reward model, scores normalised to [0, 1]) and "verifiable"
  (scored by a rule-based verifier in [0, 1]); both share one critic. An unknown type is a caller bug
  (ValueError); a response that no verifier can score is never one (reward 0, counted).

Defaults follow Seed1.5-VL / Seed-Thinking v1.5 (VAPO): alpha 0.05, lambda_critic 1.0, gamma 1.0, clip range
[1 - 0.2, 1 + 0.28], KL coefficient 1e-5 for general prompts and 0 for verifiable ones.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
import torch.nn.functional as F

from components.vlm.verifiers import split_thinking, verify

log = logging.getLogger(__name__)

PROMPT_TYPES = ("general", "verifiable")
KL_ESTIMATORS = ("k1", "k3")
CONTINUOUS_TASKS = frozenset({"grounding", "video_grounding"})  # IoU rewards, as in SFT rejection sampling
KL_LOG_RATIO_CLAMP = 20.0  # numerical guard of k3: exp(20) is finite in fp32; real log-ratios are far smaller
WHITEN_EPS = 1e-8


@dataclasses.dataclass
class RlAlgoConfig:
    """Every constant of the RL algorithm. Driver-level settings (the prompt mix, value-pretraining steps,
    rollout sizes) live with the driver; these are the ones the functions of this module read."""

    alpha: float = 0.05  # length-adaptive GAE: lambda_policy = 1 - 1 / (alpha * length)
    lambda_policy: float | None = None  # a fixed GAE lambda of the policy instead (null: length-adaptive)
    lambda_critic: float = 1.0  # GAE lambda of the critic's targets (VAPO: 1.0, unbiased returns)
    gamma: float = 1.0  # discount per token
    eps_low: float = 0.2  # clip-higher: ratios are clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.28
    kl_coef: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"general": 1e-5, "verifiable": 0.0})  # per prompt type, in the token rewards
    kl_estimator: str = "k1"  # per-token KL to the reference policy: "k1" (log-ratio) or "k3" (see kl_penalty)
    value_clip: float | None = 0.5  # PPO value clipping around the rollout's values; None: no clipping
    normalise_advantages: bool = True  # whiten policy advantages over all response tokens of the batch
    pass_min_iou: float = 0.5  # a grounding / video-grounding response passes from this IoU on
    max_response_tokens: int = 1024  # rollouts longer than this are cut (and counted)

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"rl.alpha must be > 0 (VAPO uses 0.05), got {self.alpha}")
        if self.lambda_policy is not None and not 0.0 <= self.lambda_policy <= 1.0:
            raise ValueError(f"rl.lambda_policy must be in [0, 1], or null for VAPO's length-adaptive lambda, "
                             f"got {self.lambda_policy}")
        if not 0.0 <= self.lambda_critic <= 1.0:
            raise ValueError(f"rl.lambda_critic must be in [0, 1] (VAPO uses 1.0), got {self.lambda_critic}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"rl.gamma must be in (0, 1] (1.0 for language rollouts), got {self.gamma}")
        if not 0.0 < self.eps_low < 1.0:
            raise ValueError(f"rl.eps_low must be in (0, 1) (e.g. 0.2), got {self.eps_low}")
        if not self.eps_high >= self.eps_low:
            raise ValueError(f"rl.eps_high must be >= rl.eps_low (clip-higher, e.g. 0.28 with 0.2), got "
                             f"eps_high {self.eps_high} < eps_low {self.eps_low}; swapped?")
        if set(self.kl_coef) != set(PROMPT_TYPES):
            raise ValueError(f"rl.kl_coef needs exactly one coefficient per prompt type {PROMPT_TYPES}, got keys "
                             f"{sorted(self.kl_coef)}; e.g. {{general: 1.0e-5, verifiable: 0.0}}")
        bad = {k: v for k, v in self.kl_coef.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"rl.kl_coef values must be finite and >= 0, got {bad}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"rl.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.value_clip is not None and not self.value_clip > 0:
            raise ValueError(f"rl.value_clip must be > 0, or null to turn value clipping off, "
                             f"got {self.value_clip}")
        if not 0.0 < self.pass_min_iou <= 1.0:
            raise ValueError(f"rl.pass_min_iou must be in (0, 1] (e.g. 0.5), got {self.pass_min_iou}")
        if self.max_response_tokens < 1:
            raise ValueError(f"rl.max_response_tokens must be >= 1, got {self.max_response_tokens}")


# ---------------------------------------------------------------------------------------------- masked helpers


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the positions where `mask` is nonzero (values elsewhere are ignored, even NaN)."""
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean: sum of `x` over the mask / number of masked positions; 0 when the mask is empty."""
    return masked_sum(x, mask) / mask.bool().sum().clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """(x - mean) / (std + eps) with the mean and the population std over all masked positions of the batch;
    0 off the mask. One masked position (or all equal) gives zeros; an empty mask gives zeros."""
    m = mask.bool()
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    return torch.where(m, (x - mean) / (var.sqrt() + eps), torch.zeros_like(x))


def _stat(x: torch.Tensor, mask: torch.Tensor) -> float | None:
    """A logged token-level mean as a float; None when the mask is empty (left out of the stats)."""
    return float(masked_mean(x.detach(), mask)) if bool(mask.bool().any()) else None


def _per_sequence(value: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor as a (B,) tensor of `like`'s dtype and device."""
    out = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if out.dim() == 0:
        return out.expand(batch)
    if out.shape != (batch,):
        raise ValueError(f"expected a float or a tensor of shape ({batch},), got shape {tuple(out.shape)}")
    return out


def _check_types(types: Sequence[str]) -> None:
    unknown = sorted(set(types) - set(PROMPT_TYPES))
    if unknown:
        raise ValueError(f"unknown prompt types {unknown}; expected one of {PROMPT_TYPES}")


# ---------------------------------------------------------------------------------------------- advantages


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """VAPO's per-sequence GAE lambda of the policy: lambda = 1 - 1 / (alpha * length), clamped to [0, 1].

    The sum of the GAE weights, 1 / (1 - lambda) = alpha * length, grows with the response, so a long
    response's advantages average over more TD errors (less bias) and a short one's stay low-variance. With
    alpha 0.05: length 40 -> 0.5, 100 -> 0.8, 1000 -> 0.98. Responses of at most 1 / alpha tokens (20) would
    get lambda <= 0 and are clamped to 0 (one-step TD advantages r_t + gamma * V_{t+1} - V_t); length 0 (an
    all-padding row) counts as length 1. Returns a float tensor of the shape of `lengths` (B,).
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    length = lengths.to(torch.float32).clamp_min(1.0)
    return (1.0 - 1.0 / (alpha * length)).clamp(0.0, 1.0)


def kl_coef_per_sequence(types: Sequence[str], kl_coef: Mapping[str, float],
                         device: torch.device | str | None = None) -> torch.Tensor:
    """The KL coefficient of each row's prompt type, shape (B,): e.g. 1e-5 for "general", 0 for "verifiable"."""
    _check_types(types)
    return torch.tensor([float(kl_coef[t]) for t in types], dtype=torch.float32, device=device)


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef_per_seq: torch.Tensor | float | None = None) -> torch.Tensor:
    """Per-token rewards (B, T): r_t = score * [t is the last response token] - kl_coef * kl_t on response tokens.

    `scores` (B,) is each response's routed reward (`route_rewards`); the "last response token" is the last
    position of the row's mask. `kl` (B, T) is the per-token KL to the reference (`kl_penalty`) and
    `kl_coef_per_seq` a float or a (B,) tensor (`kl_coef_per_sequence`), so general and verifiable rows are
    penalised differently in one batch. An all-padding row gets no reward at all (its score is dropped).
    Positions off the mask are 0.
    """
    m = mask.bool()
    batch, length = m.shape
    rewards = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    positions = torch.arange(length, device=m.device).expand(batch, length)
    last = torch.where(m, positions, torch.full_like(positions, -1)).max(dim=-1).values  # (B,), -1: empty row
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards[rows, last[rows]] = scores.to(rewards.dtype)[rows]
    if kl is not None:
        if kl_coef_per_seq is None:
            raise ValueError("token_rewards got a kl without kl_coef_per_seq; "
                             "pass kl_coef_per_sequence(types, config.kl_coef)")
        coef = _per_sequence(kl_coef_per_seq, batch, rewards)
        rewards = rewards - coef[:, None] * torch.where(m, kl.to(rewards.dtype), torch.zeros_like(rewards))
    return rewards


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: (advantages, returns), both (B, T), 0 off the mask.

        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1},    R_t = A_t + V_t

    with V and A after the last response token taken as 0 (the episode ends there: no bootstrap). `lam` is a
    float or a per-sequence (B,) tensor (VAPO's length-adaptive lambda). Positions off the mask are skipped
    (the recursion carries V_{t+1} and A_{t+1} across them), so right padding is handled whatever it holds.
    With lam = 1 and gamma = 1, A_t = (sum of r from t to the end) - V_t (reward-to-go minus value) and R_t is
    the reward-to-go; with lam = 0, A_t = delta_t. No gradient flows through: these are targets.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    m = mask.bool()
    batch, length = m.shape
    r = torch.where(m, rewards.float(), 0.0)
    v = torch.where(m, values.float(), 0.0)
    lam_b = _per_sequence(lam, batch, r)
    if bool(((lam_b < 0) | (lam_b > 1)).any()):
        raise ValueError(f"lam must lie in [0, 1], got {lam_b.tolist()}")
    advantages = torch.zeros_like(r)
    next_value = torch.zeros(batch, dtype=r.dtype, device=r.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(length)):
        on = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        advantage = delta + gamma * lam_b * next_advantage
        advantages[:, t] = torch.where(on, advantage, 0.0)
        next_value = torch.where(on, v[:, t], next_value)
        next_advantage = torch.where(on, advantage, next_advantage)
    returns = torch.where(m, advantages + v, 0.0)
    return advantages, returns


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           config: RlAlgoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """VAPO's decoupled GAE: (policy advantages, critic returns), both (B, T), 0 off the mask.

    The policy's advantages use each sequence's length-adaptive lambda (`length_adaptive_lambda` of its number
    of response tokens, `config.alpha`), or `config.lambda_policy` when it is set; the critic's returns use
    `config.lambda_critic` (1.0: the reward-to-go, unbiased targets). With `config.normalise_advantages` the
    policy advantages are whitened over all response tokens of the batch (mean 0, std 1, one mean for general and
    verifiable rows alike, since they share one critic and one loss); the returns are never normalised.
    `rewards` are per-token (`token_rewards`), `values` the critic's values at rollout time.
    """
    lam_policy: float | torch.Tensor = config.lambda_policy if config.lambda_policy is not None else \
        length_adaptive_lambda(mask.bool().sum(dim=-1), config.alpha).to(values.device)
    advantages, _ = gae(rewards, values, mask, config.gamma, lam_policy)
    _, returns = gae(rewards, values, mask, config.gamma, config.lambda_critic)
    if config.normalise_advantages:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


# ---------------------------------------------------------------------------------------------- losses


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                eps_low: float, eps_high: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level PPO loss with clip-higher: (loss, stats).

        ratio_t = exp(logprob_t - old_logprob_t)
        loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps_low, 1 + eps_high))
        loss    = sum of loss_t over all response tokens of the batch / their number

    The upper bound 1 + eps_high (> 1 + eps_low) leaves room to raise the probability of unlikely tokens
    (exploration, against entropy collapse). Stats, fractions of all response tokens: `clip_fraction_high`
    (A > 0 and ratio > 1 + eps_high: the clipped term is taken, no gradient), `clip_fraction_low` (A < 0 and
    ratio < 1 - eps_low); `approx_kl` the k3 estimate of KL(old || new), mean of (ratio - 1) - log ratio (>= 0);
    `ratio_mean`. Over no response tokens the loss is 0 and the stats are empty.
    """
    m = mask.bool()
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.detach(), torch.zeros_like(advantages))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        high = ((adv > 0) & (ratio > 1.0 + eps_high)).float()
        low = ((adv < 0) & (ratio < 1.0 - eps_low)).float()
        named = {"clip_fraction_low": low, "clip_fraction_high": high,
                 "approx_kl": (ratio - 1.0) - log_ratio, "ratio_mean": ratio}
        stats = {k: s for k, x in named.items() if (s := _stat(x, m)) is not None}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level critic loss: (loss, stats), loss = 0.5 * token mean of max((V - R)^2, (V_clip - R)^2).

    V_clip = V_old + clip(V - V_old, -clip, +clip) keeps a value from moving more than `clip` away from its
    rollout-time value in one update (PPO value clipping); `clip` None gives the plain 0.5 * (V - R)^2.
    Stats: `value_clip_fraction`, the share of response tokens where the clipped term is the larger (absent
    without clipping or without tokens). Over no response tokens the loss is 0.
    """
    m = mask.bool()
    target = returns.detach()
    unclipped = (values - target) ** 2
    stats: dict[str, float] = {}
    if clip is None:
        per_token = unclipped
    else:
        if not clip > 0:
            raise ValueError(f"value clip must be > 0 or None, got {clip}")
        old = old_values.detach()
        clipped = (old + (values - old).clamp(-clip, clip) - target) ** 2
        per_token = torch.maximum(unclipped, clipped)
        fraction = _stat((clipped > unclipped).float(), m)
        if fraction is not None:
            stats["value_clip_fraction"] = fraction
    return 0.5 * masked_mean(per_token, m), stats


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi, same shape as the inputs.

    "k1": log pi - log pi_ref (unbiased, may be negative per token; the classic in-reward penalty). "k3":
    exp(d) - d - 1 with d = log pi_ref - log pi (Schulman's estimator: unbiased, always >= 0, lower variance;
    d is clamped to +-20 so that exp never overflows). Mask the result with the response mask when reducing.
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k3":
        d = (ref_logprobs - logprobs).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")


def kl_by_type(kl: torch.Tensor, mask: torch.Tensor, types: Sequence[str]) -> dict[str, float]:
    """Token-level mean of the per-token KL over the response tokens of each prompt type's rows: {type: mean};
    a type with no response token in the batch is absent."""
    _check_types(types)
    if len(types) != kl.shape[0]:
        raise ValueError(f"kl_by_type got {len(types)} types for {kl.shape[0]} rows")
    m = mask.bool()
    out = {}
    for kind in PROMPT_TYPES:
        rows = torch.tensor([t == kind for t in types], dtype=torch.bool, device=m.device)
        value = _stat(kl, m & rows[:, None])
        if value is not None:
            out[kind] = value
    return out


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float | None:
    """1 - Var(R - V) / Var(R) over all response tokens (population variances): 1 for a perfect critic, 0 for
    one no better than the mean return, negative for a harmful one. None when it is undefined: fewer than two
    response tokens, or returns that do not vary."""
    m = mask.bool()
    if int(m.sum()) < 2:
        return None
    r, v = returns.detach().float(), values.detach().float()
    var_r = masked_mean((r - masked_mean(r, m)) ** 2, m)
    if float(var_r) <= 0.0:
        return None
    residual = r - v
    var_res = masked_mean((residual - masked_mean(residual, m)) ** 2, m)
    return float(1.0 - var_res / var_r)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean entropy of the policy, H_t = -sum_v p_t(v) log p_t(v) with p_t = softmax(z_t), over the
    response tokens of `logits` (B, T, V); a 0-dim tensor (0 over no tokens), differentiable."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))  # 0 * log 0 = 0 (a -inf logit is allowed)
    entropy = -(p * safe_log_p).sum(dim=-1)  # (B, T)
    return masked_mean(entropy, mask)


# ---------------------------------------------------------------------------------------------- reward routing


def thinking_verifier(task: str, response: str, reference: str) -> float:
    """The project's verifier for RL rewards: `components.vlm.verifiers.verify` in thinking mode (the answer
    after "</think>"; 0 when the <think>...</think> format is broken)."""
    return verify(task, response, reference, thinking=True)


def route_rewards(types: Sequence[str], responses: Sequence[str], references: Sequence[str | None],
                  tasks: Sequence[str], verifier: Callable[[str, str, str], float],
                  rm_scores: Sequence[float | None], min_iou: float = 0.5,
                  continuous_tasks: Collection[str] = CONTINUOUS_TASKS) -> tuple[list[float], dict[str, float]]:
    """Each response's reward in [0, 1], chosen by its prompt's type: (rewards, stats).

    "verifiable": `verifier(task, response, reference)`, clamped to [0, 1]. A missing reference, or a verifier
    that raises or returns no finite number, gives 0 and is counted (`verifier/no_reference`,
    `verifier/unparseable`), never raised. "general": the reward model's score of the answer, already
    normalised to [0, 1] (`normalise_scores`, on `strip_thinking` of the response); None for a general row, or
    a finite score outside [0, 1], is a caller bug (ValueError); a non-finite one gives 0 and is counted
    (`rm/nonfinite`). An unknown type is a ValueError.

    A verifiable response passes when its reward is >= `min_iou` for the IoU tasks (`continuous_tasks`) and
    >= 1 for the others. Stats: `count/<type>` and the reason counts always; `reward/<type>`, `reward/all`,
    `rm/score` (mean over general rows), `verifier/pass_rate` and `verifier/<task>/pass_rate` only when their
    set is non-empty (never NaN).
    """
    n = len(types)
    if not len(responses) == len(references) == len(tasks) == len(rm_scores) == n:
        raise ValueError(f"route_rewards needs one entry per response: {n} types, {len(responses)} responses, "
                         f"{len(references)} references, {len(tasks)} tasks, {len(rm_scores)} rm_scores")
    _check_types(types)
    rewards: list[float] = []
    counts = {"verifier/unparseable": 0, "verifier/no_reference": 0, "rm/nonfinite": 0}
    passed: dict[str, list[bool]] = {}
    rm_values: list[float] = []
    for i, kind in enumerate(types):
        if kind == "general":
            score = rm_scores[i]
            if score is None:
                raise ValueError(f"general prompt {i} has no reward-model score; score it before routing")
            score = float(score)
            if not math.isfinite(score):
                counts["rm/nonfinite"] += 1
                score = 0.0
            elif not 0.0 <= score <= 1.0:
                raise ValueError(f"reward-model score {score} of prompt {i} is outside [0, 1]; "
                                 f"normalise raw scores with normalise_scores first")
            else:
                rm_values.append(score)
            rewards.append(score)
            continue
        reward = 0.0
        if references[i] is None:
            counts["verifier/no_reference"] += 1
        else:
            try:
                value = verifier(tasks[i], responses[i], references[i])
                reward = float(value)  # type: ignore[arg-type]
                if not math.isfinite(reward):
                    raise ValueError(f"non-finite verifier score {value!r}")
            except Exception as error:  # noqa: BLE001 - no response may stop the job: score 0, count it
                log.debug("verifier %s failed on prompt %d: %s", tasks[i], i, error)
                counts["verifier/unparseable"] += 1
                reward = 0.0
        reward = min(max(reward, 0.0), 1.0)
        rewards.append(reward)
        threshold = min_iou if tasks[i] in continuous_tasks else 1.0
        passed.setdefault(tasks[i], []).append(reward >= threshold)

    stats: dict[str, float] = {k: float(v) for k, v in counts.items()}
    for kind in PROMPT_TYPES:
        values = [r for r, t in zip(rewards, types) if t == kind]
        stats[f"count/{kind}"] = float(len(values))
        if values:
            stats[f"reward/{kind}"] = sum(values) / len(values)
    if rewards:
        stats["reward/all"] = sum(rewards) / len(rewards)
    if rm_values:
        stats["rm/score"] = sum(rm_values) / len(rm_values)
    all_passed = [p for flags in passed.values() for p in flags]
    if all_passed:
        stats["verifier/pass_rate"] = sum(all_passed) / len(all_passed)
    for task, flags in sorted(passed.items()):
        stats[f"verifier/{task}/pass_rate"] = sum(flags) / len(flags)
    return rewards, stats


def truncate_rollouts(token_ids: Sequence[Sequence[int]], max_len: int) -> tuple[list[list[int]], int]:
    """Every rollout cut to at most `max_len` tokens: (cut lists, number of rollouts that were longer)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    cut = [list(ids[:max_len]) for ids in token_ids]
    return cut, sum(len(ids) > max_len for ids in token_ids)


# ---------------------------------------------------------------------------------------------- reward model


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of a reward model on preference pairs: mean over pairs of -log sigmoid(s_chosen -
    s_rejected), i.e. the negative log-likelihood of P(chosen > rejected) = sigmoid(s_chosen - s_rejected)."""
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.numel() == 0:
        raise ValueError(f"need matching, non-empty score tensors, got {tuple(chosen_scores.shape)} and "
                         f"{tuple(rejected_scores.shape)}")
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def pair_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Share of pairs whose chosen response scores strictly higher than the rejected one (a tie is wrong)."""
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.numel() == 0:
        raise ValueError(f"need matching, non-empty score tensors, got {tuple(chosen_scores.shape)} and "
                         f"{tuple(rejected_scores.shape)}")
    return float((chosen_scores > rejected_scores).float().mean())


def normalise_scores(raw: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Raw reward-model scores mapped to (0, 1): sigmoid((raw - mean) / std).

    `mean` and `std` are the raw scores' statistics on a fixed calibration set (e.g. the RM's held-out
    responses), frozen for the whole RL run so that a score means the same at every step. A response scoring
    the calibration mean gets 0.5, one std above it sigmoid(1) = 0.73; the map is monotone, so the RM's
    ranking (all Bradley-Terry trains) is kept while the range matches the verifiers'.
    """
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"std must be finite and > 0, got {std}; compute it on the RM's calibration scores")
    return torch.sigmoid((raw.float() - mean) / std)


def strip_thinking(response: str) -> str:
    """What the reward model sees: the text after the first "</think>", stripped (`split_thinking`); the whole
    response when it has no thinking tags; "" when a "<think>" is never closed (e.g. cut at the length
    limit), so no chain of thought ever reaches the reward model."""
    return split_thinking(response)[1]
