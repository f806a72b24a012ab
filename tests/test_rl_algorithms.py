"""The RL algorithm core (`components.rl.algorithms`): each function on a small example computed by hand (the
arithmetic is in the comments), its edge cases (all-padding rows, length-1 responses, a batch without one
prompt type, the lambda clamp, NaN-free stats), and a toy bandit that the PPO pieces together must solve."""

from __future__ import annotations

import math

import pytest
import torch

from components.rl.algorithms import (
    RlAlgoConfig,
    advantages_and_returns,
    bradley_terry_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_by_type,
    kl_coef_per_sequence,
    kl_penalty,
    length_adaptive_lambda,
    masked_whiten,
    normalise_scores,
    pair_accuracy,
    policy_loss,
    route_rewards,
    strip_thinking,
    thinking_verifier,
    token_rewards,
    truncate_rollouts,
    value_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_are_the_recipe() -> None:
    cfg = RlAlgoConfig()
    assert (cfg.alpha, cfg.lambda_critic, cfg.gamma, cfg.eps_low, cfg.eps_high) == (0.05, 1.0, 1.0, 0.2, 0.28)
    assert cfg.kl_coef == {"general": 1e-5, "verifiable": 0.0}
    assert RlAlgoConfig(value_clip=None).value_clip is None


@pytest.mark.parametrize("overrides, key", [
    ({"alpha": 0.0}, "rl.alpha"),
    ({"lambda_critic": 1.5}, "rl.lambda_critic"),
    ({"gamma": 0.0}, "rl.gamma"),
    ({"eps_low": 0.3, "eps_high": 0.2}, "rl.eps_high"),
    ({"kl_coef": {"general": 1e-5}}, "rl.kl_coef"),
    ({"kl_coef": {"general": -1.0, "verifiable": 0.0}}, "rl.kl_coef"),
    ({"kl_estimator": "k2"}, "rl.kl_estimator"),
    ({"value_clip": 0.0}, "rl.value_clip"),
    ({"pass_min_iou": 0.0}, "rl.pass_min_iou"),
    ({"max_response_tokens": 0}, "rl.max_response_tokens"),
])
def test_config_errors_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        RlAlgoConfig(**overrides)


# ---------------------------------------------------------------------------------------------- advantages


def test_length_adaptive_lambda_and_its_clamp() -> None:
    # 1 - 1/(0.05 * L): L=40 -> 1 - 1/2 = 0.5; L=100 -> 1 - 1/5 = 0.8; L=1000 -> 1 - 1/50 = 0.98;
    # L=20 -> 0; L=10 -> 1 - 2 = -1, clamped to 0; L=1 -> -19 -> 0; L=0 counts as 1 -> 0
    lengths = torch.tensor([40, 100, 1000, 20, 10, 1, 0])
    close(length_adaptive_lambda(lengths, 0.05), [0.5, 0.8, 0.98, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="alpha"):
        length_adaptive_lambda(lengths, 0.0)


def test_kl_coef_per_sequence() -> None:
    close(kl_coef_per_sequence(["general", "verifiable", "general"], RlAlgoConfig().kl_coef), [1e-5, 0.0, 1e-5])
    with pytest.raises(ValueError, match="unknown prompt types"):
        kl_coef_per_sequence(["math"], RlAlgoConfig().kl_coef)


def test_token_rewards_score_on_last_token_minus_kl() -> None:
    scores = torch.tensor([0.7, 1.0, 0.3])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # lengths 3, 1, 0 (all padding)
    close(token_rewards(scores, mask), [[0, 0, 0.7, 0], [1.0, 0, 0, 0], [0, 0, 0, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 99.0], [0.5, 99.0, 99.0, 99.0], [1.0, 1.0, 1.0, 1.0]])
    coef = torch.tensor([0.5, 0.0, 1.0])
    # row 0: -0.5*0.1 = -0.05, -0.5*0.2 = -0.1, 0.7 - 0.5*0.3 = 0.55, padding 0
    # row 1: coefficient 0 (a verifiable row): the score alone; row 2: all padding, nothing at all
    close(token_rewards(scores, mask, kl, coef), [[-0.05, -0.1, 0.55, 0], [1.0, 0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="kl_coef_per_seq"):
        token_rewards(scores, mask, kl)


def test_gae_hand_computed_three_tokens_with_padding() -> None:
    # row 0: r = [0, 0, 1], V = [0.5, 0.6, 0.7]; row 1: r = [0, 1], V = [0.2, 0.3], then padding holding garbage
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.3, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # lambda 1, gamma 1: A_t = reward-to-go - V_t = [1-0.5, 1-0.6, 1-0.7], [1-0.2, 1-0.3]; R_t = reward-to-go
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.4, 0.3], [0.8, 0.7, 0.0]])
    close(ret, [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # lambda 0.5: row 0 deltas d2 = 1 + 0 - 0.7 = 0.3 (no bootstrap after the end), d1 = 0 + 0.7 - 0.6 = 0.1,
    # d0 = 0 + 0.6 - 0.5 = 0.1; A2 = 0.3, A1 = 0.1 + 0.5*0.3 = 0.25, A0 = 0.1 + 0.5*0.25 = 0.225; R = A + V
    # row 1: d1 = 1 - 0.3 = 0.7, d0 = 0.3 - 0.2 = 0.1; A1 = 0.7, A0 = 0.1 + 0.5*0.7 = 0.45
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.225, 0.25, 0.3], [0.45, 0.7, 0.0]])
    close(ret, [[0.725, 0.85, 1.0], [0.65, 1.0, 0.0]])
    # a per-sequence lambda gives each row what its own lambda gives it alone
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=torch.tensor([1.0, 0.5]))
    close(adv, [[0.5, 0.4, 0.3], [0.45, 0.7, 0.0]])


def test_gae_with_discount() -> None:
    # r = [0, 1], V = [0, 0], gamma 0.5, lambda 1: A1 = 1, A0 = 0 + 0.5*0 - 0 + 0.5*1*1 = 0.5
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.5, lam=1.0)
    close(adv, [[0.5, 1.0]])
    close(ret, [[0.5, 1.0]])


def test_gae_lambda_one_is_reward_to_go_minus_value() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.rand(4, 7, generator=gen), torch.rand(4, 7, generator=gen)
    mask = (torch.arange(7)[None, :] < torch.tensor([7, 3, 1, 0])[:, None]).long()
    to_go = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1]) * mask
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, (to_go - values) * mask)
    torch.testing.assert_close(ret, to_go)


def test_gae_edge_cases() -> None:
    # a length-1 response: A = r - V = 0.8 - 0.3 = 0.5 whatever lambda; an all-padding row: zeros
    rewards, values = torch.tensor([[0.8, 0.0], [3.0, 3.0]]), torch.tensor([[0.3, 7.0], [1.0, 1.0]])
    mask = torch.tensor([[1, 0], [0, 0]])
    for lam in (0.0, 0.5, 1.0):
        adv, ret = gae(rewards, values, mask, 1.0, lam)
        close(adv, [[0.5, 0.0], [0.0, 0.0]])
        close(ret, [[0.8, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="lam"):
        gae(rewards, values, mask, 1.0, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="gamma"):
        gae(rewards, values, mask, 0.0, 1.0)


def test_advantages_and_returns_decouple_policy_and_critic_lambda() -> None:
    # row 0 has 40 tokens -> lambda_policy 0.5; row 1 has 1 token -> lambda_policy clamps to 0 (A = r - V)
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, 40, dtype=torch.long)
    mask[0], mask[1, 0] = 1, 1
    rewards = token_rewards(torch.tensor([1.0, 0.5]), mask)
    values = torch.rand(2, 40, generator=gen)
    adv, ret = advantages_and_returns(rewards, values, mask, RlAlgoConfig(normalise_advantages=False))
    expected_adv, _ = gae(rewards[:1], values[:1], mask[:1], 1.0, 0.5)
    _, expected_ret = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv[:1], expected_adv)
    torch.testing.assert_close(ret, expected_ret)  # lambda_critic 1: the reward-to-go, 1 and 0.5
    close(ret[:, 0], [1.0, 0.5])
    assert adv[1, 0].item() == pytest.approx(0.5 - values[1, 0].item())
    assert not adv[1, 1:].any()


def test_a_fixed_policy_lambda_replaces_the_length_adaptive_one() -> None:
    # a 2-token answer: the adaptive lambda is 0 (A_0 = V_1 - V_0, the critic's guess); lambda 1 gives r - V_0
    mask = torch.tensor([[1, 1]])
    rewards = token_rewards(torch.tensor([1.0]), mask)
    values = torch.tensor([[0.25, 0.75]])
    adaptive, _ = advantages_and_returns(rewards, values, mask, RlAlgoConfig(normalise_advantages=False))
    fixed, ret = advantages_and_returns(rewards, values, mask,
                                        RlAlgoConfig(normalise_advantages=False, lambda_policy=1.0))
    close(adaptive, [[0.5, 0.25]])
    close(fixed, [[0.75, 0.25]])
    close(ret, [[1.0, 1.0]])
    with pytest.raises(ValueError, match="lambda_policy"):
        RlAlgoConfig(lambda_policy=1.5)


def test_advantage_normalisation_over_all_response_tokens() -> None:
    adv = torch.tensor([[1.0, 2.0, 3.0], [5.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # tokens 1, 2, 3, 5: mean 2.75, population variance (3.0625 + 0.5625 + 0.0625 + 5.0625) / 4 = 2.1875
    white = masked_whiten(adv, mask)
    std = math.sqrt(2.1875)
    close(white, [[-1.75 / std, -0.75 / std, 0.25 / std], [2.25 / std, 0.0, 0.0]], atol=1e-5)
    rewards = token_rewards(torch.tensor([1.0, 0.0]), mask)
    a, r = advantages_and_returns(rewards, torch.zeros(2, 3), mask, RlAlgoConfig())
    assert a[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert a[mask.bool()].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    close(r, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert not masked_whiten(adv, torch.zeros_like(mask)).any()  # an empty mask: zeros, no NaN


# ---------------------------------------------------------------------------------------------- losses


def test_policy_loss_token_level_clip_higher() -> None:
    # ratios and advantages per token (old logprob 0, so logprob = log ratio); row 1's last token is padding
    #   ratio 1.5, A +1: max(-1.5, -1.28) = -1.28  (clipped high)
    #   ratio 0.5, A -1: max(0.5, 0.8)    =  0.8   (clipped low)
    #   ratio 1.5, A -1: max(1.5, 1.28)   =  1.5
    #   ratio 0.5, A +1: max(-0.5, -0.8)  = -0.5
    #   ratio 1.0, A +2: -2
    # token level: (-1.28 + 0.8 + 1.5 - 0.5 - 2) / 5 = -1.48 / 5 = -0.296
    # (a mean of per-sequence means would be (1.02/3 - 2.5/2) / 2 = -0.455)
    ratio = torch.tensor([[1.5, 0.5, 1.5], [0.5, 1.0, 100.0]])
    logprobs = ratio.log().requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0], [1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = policy_loss(logprobs, torch.zeros(2, 3), adv, mask, eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(-0.296, abs=1e-6)
    assert stats["clip_fraction_high"] == pytest.approx(0.2) and stats["clip_fraction_low"] == pytest.approx(0.2)
    assert stats["ratio_mean"] == pytest.approx(1.0)  # (1.5 + 0.5 + 1.5 + 0.5 + 1) / 5
    # approx_kl, (r - 1) - ln r: 1.5 -> 0.5 - 0.405465 = 0.094535, 0.5 -> -0.5 + 0.693147 = 0.193147, 1 -> 0
    assert stats["approx_kl"] == pytest.approx((2 * 0.094535 + 2 * 0.193147) / 5, abs=1e-5)
    # gradient: -A * ratio / 5 where unclipped, 0 where clipped and on padding
    loss.backward()
    close(logprobs.grad, [[0.0, 0.0, 1.5 / 5], [-0.5 / 5, -2.0 / 5, 0.0]])


def test_policy_loss_without_tokens_is_zero_and_nan_free() -> None:
    logprobs = torch.full((2, 2), float("nan"), requires_grad=True)
    loss, stats = policy_loss(logprobs, torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2), 0.2, 0.28)
    assert loss.item() == 0.0 and stats == {}
    loss.backward()
    assert not logprobs.grad.isnan().any()


def test_value_loss_clipped_and_unclipped() -> None:
    # token 0: V 0.5, V_old 0, R 1: unclipped (0.5-1)^2 = 0.25; V_clip = 0 + 0.2 = 0.2, (0.2-1)^2 = 0.64 -> 0.64
    # token 1: V 1, V_old 1, R 0: both 1; padding ignored. loss = 0.5 * (0.64 + 1) / 2 = 0.41
    values = torch.tensor([[0.5, 1.0, 50.0]])
    old, returns = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, -50.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.41) and stats == {"value_clip_fraction": 0.5}
    loss, stats = value_loss(values, old, returns, mask, clip=None)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.0) / 2) and stats == {}  # 0.3125
    assert value_loss(values, old, returns, torch.zeros_like(mask), clip=0.2) == (torch.tensor(0.0), {})


def test_kl_penalty_estimators() -> None:
    # pi = 0.5, pi_ref = 0.25: k1 = ln 2; k3 with d = ln(0.25/0.5) = -ln 2: e^d - d - 1 = 0.5 + ln 2 - 1
    logp, ref = torch.tensor([math.log(0.5), -1.0]), torch.tensor([math.log(0.25), -1.0])
    close(kl_penalty(logp, ref, "k1"), [LN2, 0.0])
    close(kl_penalty(logp, ref, "k3"), [LN2 - 0.5, 0.0])
    assert torch.isfinite(kl_penalty(torch.tensor([-500.0]), torch.tensor([0.0]), "k3")).all()
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, ref, "k2")


def test_kl_by_type_token_level_per_type() -> None:
    kl = torch.tensor([[0.1, 0.3, 99.0], [0.5, 99.0, 99.0], [0.2, 0.2, 0.2]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    # general rows 0 and 2: (0.1 + 0.3 + 0.2 * 3) / 5 tokens = 0.2; verifiable row 1: 0.5
    out = kl_by_type(kl, mask, ["general", "verifiable", "general"])
    assert out == pytest.approx({"general": 0.2, "verifiable": 0.5})
    assert kl_by_type(kl, mask, ["verifiable"] * 3).keys() == {"verifiable"}  # no general rows: absent
    with pytest.raises(ValueError, match="types"):
        kl_by_type(kl, mask, ["general"])


def test_explained_variance() -> None:
    # R = [1, 0, 1, 0]: var 0.25; R - V = [0, 0, 1, 0]: mean 0.25, var 0.1875; EV = 1 - 0.1875/0.25 = 0.25
    returns, values = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mask = torch.ones(2, 2)
    assert explained_variance(values, returns, mask) == pytest.approx(0.25)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(values, torch.ones(2, 2), mask) is None  # returns that do not vary
    assert explained_variance(values, returns, torch.tensor([[1, 0], [0, 0]])) is None  # one token


def test_entropy_from_logits() -> None:
    # token (0,0): uniform over 4 -> ln 4; token (0,1): two tokens of 1/2 (the others -inf) -> ln 2;
    # token (1,0) is padding. Mean over 2 response tokens: (ln 4 + ln 2) / 2 = 1.5 ln 2
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [3.0, 3.0, -math.inf, -math.inf]],
                           [[50.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0]])
    entropy = entropy_from_logits(logits, mask)
    assert entropy.item() == pytest.approx(1.5 * LN2)
    entropy.backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------- rewards


def test_route_rewards_mixed_batch() -> None:
    types = ["verifiable", "verifiable", "general", "verifiable", "verifiable", "general"]
    tasks = ["counting", "grounding", "caption", "counting", "counting", "caption"]
    responses = ["<think>one, two, three</think>3",
                 "<think>the cat</think>[0, 0, 10, 10]",  # IoU with [0,0,10,20]: 100 / 200 = 0.5, passes
                 "<think>...</think>A red square.",
                 "<think>x</think>3",  # no reference: 0, counted
                 "<think>x</think>3",  # "many" is no count: the verifier raises -> 0, counted
                 "<think>...</think>A cat."]
    references = ["3", "[0, 0, 10, 20]", None, None, "many", None]
    rm_scores = [None, None, 0.8, None, None, 0.4]
    rewards, stats = route_rewards(types, responses, references, tasks, thinking_verifier, rm_scores)
    assert rewards == pytest.approx([1.0, 0.5, 0.8, 0.0, 0.0, 0.4])
    assert stats == pytest.approx({
        "count/verifiable": 4, "count/general": 2,
        "reward/verifiable": 1.5 / 4, "reward/general": 0.6, "reward/all": 2.7 / 6, "rm/score": 0.6,
        "verifier/pass_rate": 2 / 4,  # counting: 1 of 3 (two rewarded 0), grounding: IoU 0.5 >= 0.5
        "verifier/counting/pass_rate": 1 / 3, "verifier/grounding/pass_rate": 1.0,
        "verifier/unparseable": 1, "verifier/no_reference": 1, "rm/nonfinite": 0})
    # the same grounding answer fails at a stricter IoU threshold
    _, strict = route_rewards(types, responses, references, tasks, thinking_verifier, rm_scores, min_iou=0.6)
    assert strict["verifier/grounding/pass_rate"] == 0.0


def test_route_rewards_with_one_type_missing_is_nan_free() -> None:
    rewards, stats = route_rewards(["general", "general"], ["a", "b"], [None, None], ["caption"] * 2,
                                   thinking_verifier, [0.25, 0.75])
    assert rewards == [0.25, 0.75]
    assert "reward/verifiable" not in stats and "verifier/pass_rate" not in stats
    assert stats["count/verifiable"] == 0 and stats["reward/general"] == 0.5
    rewards, stats = route_rewards([], [], [], [], thinking_verifier, [])
    assert rewards == [] and stats["count/general"] == stats["count/verifiable"] == 0 and "reward/all" not in stats
    _, stats = route_rewards(["verifiable"], ["3"], ["3"], ["counting"], thinking_verifier, [None])
    assert stats["reward/verifiable"] == 0.0 and "rm/score" not in stats  # no <think> block: format broken, 0
    assert not any(math.isnan(v) for v in stats.values())


def test_route_rewards_bad_verifier_outputs_and_caller_bugs() -> None:
    outputs = {"nan": float("nan"), "none": None, "big": 1.5, "raise": "raise"}

    def verifier(task: str, response: str, reference: str) -> float:
        if outputs[response] == "raise":
            raise RuntimeError("cannot parse")
        return outputs[response]  # type: ignore[return-value]

    rewards, stats = route_rewards(["verifiable"] * 4, list(outputs), ["r"] * 4, ["ocr"] * 4, verifier, [None] * 4)
    assert rewards == [0.0, 0.0, 1.0, 0.0] and stats["verifier/unparseable"] == 3  # 1.5 is clamped to 1
    rewards, stats = route_rewards(["general"], ["a"], [None], ["caption"], verifier, [float("nan")])
    assert rewards == [0.0] and stats["rm/nonfinite"] == 1 and "rm/score" not in stats
    with pytest.raises(ValueError, match="unknown prompt types"):
        route_rewards(["creative"], ["a"], [None], ["caption"], verifier, [0.5])
    with pytest.raises(ValueError, match="no reward-model score"):
        route_rewards(["general"], ["a"], [None], ["caption"], verifier, [None])
    with pytest.raises(ValueError, match="normalise_scores"):
        route_rewards(["general"], ["a"], [None], ["caption"], verifier, [3.2])
    with pytest.raises(ValueError, match="one entry per response"):
        route_rewards(["general"], ["a", "b"], [None], ["caption"], verifier, [0.5])


def test_truncate_rollouts() -> None:
    cut, n_cut = truncate_rollouts([[1, 2, 3, 4], [5], [], [6, 7, 8]], max_len=3)
    assert cut == [[1, 2, 3], [5], [], [6, 7, 8]] and n_cut == 1
    with pytest.raises(ValueError, match="max_len"):
        truncate_rollouts([[1]], 0)


# ---------------------------------------------------------------------------------------------- reward model


def test_bradley_terry_loss_and_pair_accuracy() -> None:
    # margins 0 and ln 3: -log sigmoid(0) = ln 2 = 0.693147; -log sigmoid(ln 3) = -log(3/4) = 0.287682
    chosen, rejected = torch.tensor([1.0, LN3], requires_grad=True), torch.tensor([1.0, 0.0])
    loss = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx((LN2 + math.log(4 / 3)) / 2)  # 0.490415
    loss.backward()
    assert (chosen.grad < 0).all()  # descending the loss raises the chosen scores
    assert pair_accuracy(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="non-empty"):
        bradley_terry_loss(torch.tensor([]), torch.tensor([]))


def test_normalise_scores_to_unit_interval() -> None:
    # mean 1, std 2: raw 1 -> sigmoid(0) = 0.5; 1 + 2 ln 3 -> sigmoid(ln 3) = 0.75; 1 - 2 ln 3 -> 0.25
    close(normalise_scores(torch.tensor([1.0, 1 + 2 * LN3, 1 - 2 * LN3]), mean=1.0, std=2.0), [0.5, 0.75, 0.25])
    with pytest.raises(ValueError, match="std"):
        normalise_scores(torch.tensor([1.0]), 0.0, 0.0)


def test_strip_thinking() -> None:
    assert strip_thinking("<think>the cat is red</think> A red cat.") == "A red cat."
    assert strip_thinking("A red cat.") == "A red cat."
    assert strip_thinking("<think>cut at the length limit") == ""
    assert strip_thinking("reasoning</think>answer</think>more") == "answer</think>more"


# ---------------------------------------------------------------------------------------------- end to end


def test_bandit_policy_learns_the_rewarded_token() -> None:
    """A categorical policy over 4 tokens (one-token responses), reward 1 for token 2, half the prompts
    general (a reward model that likes token 2) and half verifiable: 30 steps of two PPO epochs each."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = RlAlgoConfig()
    logits = torch.nn.Parameter(torch.zeros(4))
    critic = torch.nn.Parameter(torch.zeros(()))  # one shared value for every prompt
    optimiser = torch.optim.Adam([logits, critic], lr=0.1)
    ref_logprobs = torch.log_softmax(logits.detach(), -1)
    batch = 16
    types = ["general", "verifiable"] * (batch // 2)
    mask = torch.ones(batch, 1)

    def verifier(task: str, response: str, reference: str) -> float:
        return float(response == reference)

    for _ in range(30):
        with torch.no_grad():
            tokens = torch.multinomial(torch.softmax(logits, -1), batch, replacement=True, generator=gen)
            old_logprobs = torch.log_softmax(logits, -1)[tokens][:, None]
            rm = [float(t == 2) if kind == "general" else None for t, kind in zip(tokens.tolist(), types)]
            scores, _ = route_rewards(types, [str(t) for t in tokens.tolist()], ["2"] * batch, ["counting"] * batch,
                                      verifier, rm)
            kl = kl_penalty(old_logprobs, ref_logprobs[tokens][:, None], cfg.kl_estimator)
            rewards = token_rewards(torch.tensor(scores), mask, kl, kl_coef_per_sequence(types, cfg.kl_coef))
            old_values = critic.detach().expand(batch, 1)
            advantages, returns = advantages_and_returns(rewards, old_values, mask, cfg)
        for _ in range(2):
            logprobs = torch.log_softmax(logits, -1)[tokens][:, None]
            loss, _ = policy_loss(logprobs, old_logprobs, advantages, mask, cfg.eps_low, cfg.eps_high)
            v_loss, _ = value_loss(critic.expand(batch, 1), old_values, returns, mask, cfg.value_clip)
            optimiser.zero_grad()
            (loss + v_loss).backward()
            optimiser.step()
    assert torch.softmax(logits, -1)[2].item() > 0.8
    assert 0.0 < critic.item() <= 1.0  # the critic follows the mean reward up
