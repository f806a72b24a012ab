"""The RL steps' pieces, fast and without Ray: the reward model's preference pairs and its split, Bradley-Terry
training of a value head on a tiny random VLM, the driver's batch assembly (both prompt types in every batch,
an empty type), the rollout's log-probs against the actor's teacher-forced ones, one actor and critic update,
and the loop's checkpoint round trip (a resumed update equals an uninterrupted one)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from components.rl.algorithms import RlAlgoConfig, bradley_terry_loss  # noqa: E402
from components.rl.config import KindAdaptation, RewardModelConfig, RlConfig  # noqa: E402
from components.rl.prompts import PromptSampler, type_counts  # noqa: E402
from components.rl.reward_model import (caption_pairs, colour_swapped, object_dropped, split_pairs,  # noqa: E402
                                         verifiable_pairs)
from components.training.config import DeepSpeedSettings  # noqa: E402

DS = DeepSpeedSettings(zero_stage=2, bf16=False)


def sample(key: str, response: str, correct: bool, turn: int = 0, reference: str = "3") -> dict[str, Any]:
    return {"key": key, "turn": turn, "task": "counting", "kind": "counting", "question": "<image>\nHow many?",
            "reference": reference, "response": response, "correct": correct}


# ---------------------------------------------------------------------------------------------- pairs


def test_verified_answers_are_preferred_to_wrong_ones_of_the_same_prompt() -> None:
    rows = [sample("a", "<think>count them</think> 3", True), sample("a", "<think>hmm</think> 5", False),
            sample("a", "7", False), sample("b", "3", True), sample("b", "2", False)]
    pairs = verifiable_pairs(rows, max_per_prompt=10, seed=0)
    by_prompt = {(p.prompt, p.chosen, p.rejected) for p in pairs}
    assert by_prompt == {("a:0", "3", "5"), ("a:0", "3", "7"), ("b:0", "3", "2")}  # the <think> part cut off
    assert {p.source for p in pairs} == {"verified"}


def test_a_prompt_without_a_correct_sample_prefers_its_reference() -> None:
    rows = [sample("a", "5", False, reference="4"), sample("a", "6", False, reference="4")]
    pairs = verifiable_pairs(rows, max_per_prompt=10, seed=0)
    assert {(p.chosen, p.rejected, p.source) for p in pairs} == {("4", "5", "reference"), ("4", "6", "reference")}


def test_pairs_skip_duplicates_and_wrong_answers_that_read_like_the_chosen_one() -> None:
    rows = [sample("a", "3", True), sample("a", " 3 ", False), sample("a", "5", False), sample("a", "5", False),
            sample("a", "", False)]
    pairs = verifiable_pairs(rows, max_per_prompt=10, seed=0)
    assert [(p.chosen, p.rejected) for p in pairs] == [("3", "5")]


def test_pairs_per_prompt_are_capped_and_seeded() -> None:
    rows = [sample("a", str(n), n == 3) for n in range(10)]
    first, again = verifiable_pairs(rows, 2, seed=1), verifiable_pairs(rows, 2, seed=1)
    assert len(first) == 2 and first == again


def test_captions_prefer_the_concise_reference_to_a_rambling_one() -> None:
    captions = [("k1", "<image>\nDescribe.", "a red circle on a white background."),
                ("k2", "<image>\nDescribe.", "two blue squares. They overlap."),
                ("k3", "<image>\nDescribe.", "a green triangle.")]
    pairs = caption_pairs(captions, sentences=2, seed=0)
    assert len(pairs) == 3
    for pair, (_, _, caption) in zip(pairs, captions):
        assert pair.chosen == caption and pair.rejected.startswith(caption) and len(pair.rejected) > len(caption)
        assert pair.source == "concise"
    assert caption_pairs(captions[:1], 2, 0) == []


def test_faithful_pairs_change_one_object_colour_and_never_the_background() -> None:
    import random

    caption = "a red circle and two black squares on a black background"
    swapped = colour_swapped(caption, 40, random.Random(0))
    assert len(swapped) == len(set(swapped)) == 14  # two object colour words, seven other colours each
    for wrong in swapped:
        assert wrong.endswith("on a black background") and wrong != caption
        assert sum(a != b for a, b in zip(wrong.split(), caption.split())) == 1
    assert colour_swapped("a dog on a sofa", 3, random.Random(0)) == []
    pairs = caption_pairs([("k1", "<image>\nDescribe.", caption)], sentences=2, seed=0, colour_swaps=2)
    assert [p.source for p in pairs] == ["faithful", "faithful"]  # one caption: no other to ramble with
    assert all(p.chosen == caption and p.prompt == "k1:0" for p in pairs)


def test_complete_pairs_leave_out_one_object_of_the_list() -> None:
    import random

    caption = "a red circle, a blue square and two green diamonds on a gray background"
    dropped = object_dropped(caption, 5, random.Random(0))
    assert sorted(dropped) == ["a blue square and two green diamonds on a gray background",
                               "a red circle and a blue square on a gray background",
                               "a red circle and two green diamonds on a gray background"]
    assert object_dropped("a red circle and a blue square on a black background", 1, random.Random(0))[0] in (
        "a red circle on a black background", "a blue square on a black background")
    assert object_dropped("a red circle on a black background", 3, random.Random(0)) == []  # one object
    assert object_dropped("a dog, a cat and a sofa", 3, random.Random(0)) == []  # not a scene caption
    pairs = caption_pairs([("k1", "<image>\nDescribe.", caption)], sentences=2, seed=0, omissions=2)
    assert [p.source for p in pairs] == ["complete", "complete"] and all(p.chosen == caption for p in pairs)
    with pytest.raises(ValueError, match=r"omissions"):
        RewardModelConfig(omissions=-1)


def test_the_split_keeps_every_prompt_on_one_side_and_both_sides_non_empty() -> None:
    rows = [sample(f"s{i}", str(n), n == 3) for i in range(20) for n in (3, 4, 5)]
    pairs = verifiable_pairs(rows, 10, seed=0)
    train, held = split_pairs(pairs, 0.25, seed=0)
    assert train and held and len(train) + len(held) == len(pairs)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    tiny_train, tiny_held = split_pairs(pairs[:2] + [p for p in pairs if p.prompt == "s1:0"], 0.0001, seed=0)
    assert tiny_train and tiny_held  # two prompts: one on each side, whatever the fraction


# ---------------------------------------------------------------------------------------------- batches


def test_every_batch_holds_both_types_in_the_mix() -> None:
    pools = {"general": [{"prompt_id": f"g{i}", "type": "general"} for i in range(3)],
             "verifiable": [{"prompt_id": f"v{i}", "type": "verifiable"} for i in range(10)]}
    sampler = PromptSampler(pools, {"general": 0.1, "verifiable": 0.9}, seed=0)
    for _ in range(12):
        batch = sampler.next_batch(4)
        assert len(batch) == 4 and {row["type"] for row in batch} == {"general", "verifiable"}
    assert type_counts(10, {"general": 0.3, "verifiable": 0.7}, {"general": 5, "verifiable": 5}) == \
        {"general": 3, "verifiable": 7}


def test_an_empty_type_gives_its_share_to_the_other() -> None:
    pools: dict[str, list[dict[str, Any]]] = {"general": [], "verifiable": [{"prompt_id": "v", "type": "verifiable"}]}
    sampler = PromptSampler(pools, {"general": 0.5, "verifiable": 0.5}, seed=0)
    assert [row["prompt_id"] for row in sampler.next_batch(3)] == ["v", "v", "v"]
    assert type_counts(4, {"general": 1.0, "verifiable": 1.0}, {"general": 0, "verifiable": 0}) == \
        {"general": 0, "verifiable": 0}


def test_the_sampler_resumes_where_its_state_says() -> None:
    pools = {"general": [{"prompt_id": f"g{i}"} for i in range(5)],
             "verifiable": [{"prompt_id": f"v{i}"} for i in range(7)]}
    mix = {"general": 0.5, "verifiable": 0.5}
    straight = PromptSampler(pools, mix, seed=3)
    batches = [straight.next_batch(4) for _ in range(6)]
    first = PromptSampler(pools, mix, seed=3)
    for _ in range(4):
        first.next_batch(4)
    resumed = PromptSampler(pools, mix, seed=3)
    resumed.load_state(first.state_dict())
    assert [resumed.next_batch(4) for _ in range(2)] == batches[4:]


def test_kind_shares_follow_the_pass_rates_and_resume() -> None:
    pools = {"general": [{"prompt_id": f"g{i}", "kind": "caption"} for i in range(4)],
             "verifiable": [{"prompt_id": f"{k}{i}", "kind": k} for k in ("counting", "ocr") for i in range(3)]
             + [{"prompt_id": "v0", "kind": "video_grounding"}]}
    plain = PromptSampler(pools, {"general": 0.0, "verifiable": 1.0}, seed=0)
    assert plain.shares("verifiable") == pytest.approx({"counting": 3 / 7, "ocr": 3 / 7, "video_grounding": 1 / 7})
    dealt = [row["kind"] for row in plain.next_batch(7)]
    assert sorted(dealt) == ["counting"] * 3 + ["ocr"] * 3 + ["video_grounding"]  # exact shares, no draw

    adaptive = PromptSampler(pools, {"general": 0.0, "verifiable": 1.0}, seed=0, adapt=True, adapt_floor=0.1,
                             adapt_momentum=0.5)
    assert adaptive.shares("verifiable") == pytest.approx({k: 1 / 3 for k in ("counting", "ocr", "video_grounding")})
    adaptive.observe({"counting": 0.5, "ocr": 0.0})  # first measurements set the running rates
    adaptive.observe({"counting": 0.3})  # 0.5 + 0.5 * (0.3 - 0.5) = 0.4; ocr and video unchanged
    weights = {"counting": 4 * 0.4 * 0.6, "ocr": 0.1, "video_grounding": 1.0}  # ocr at the floor, video unmeasured
    total = sum(weights.values())
    assert adaptive.shares("verifiable") == pytest.approx({k: w / total for k, w in weights.items()})
    assert adaptive.shares("general") == {"caption": 1.0}  # general kinds never adapt
    first = [row["kind"] for row in adaptive.next_batch(20)]
    assert first.count("counting") == round(20 * weights["counting"] / total)
    assert first.count("ocr") == round(20 * 0.1 / total)
    resumed = PromptSampler(pools, {"general": 0.0, "verifiable": 1.0}, seed=0, adapt=True, adapt_floor=0.1,
                            adapt_momentum=0.5)
    resumed.load_state(adaptive.state_dict())
    assert resumed.next_batch(5) == adaptive.next_batch(5)
    with pytest.raises(ValueError, match=r"kind_adaptation\.floor"):
        RlConfig(kind_adaptation=KindAdaptation(floor=0.0))


def test_config_mistakes_name_the_key_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"train\.vlm\.rl\.mix.*general"):
        RlConfig(mix={"generl": 1.0})
    with pytest.raises(ValueError, match=r"train\.vlm\.rl\.verifiable_kinds is empty"):
        RlConfig(verifiable_kinds=[])
    with pytest.raises(ValueError, match=r"max_response_tokens"):
        RlConfig(max_new_tokens=64, algo=RlAlgoConfig(max_response_tokens=16))
    with pytest.raises(ValueError, match=r"answer_mode"):
        RlConfig(answer_mode="chatty")


# ---------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlm_exports import write_random_export

    return write_random_export(tmp_path_factory.mktemp("rl") / "policy", weight_scale=0.05)


@pytest.fixture(scope="module")
def rm_export(export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from components.rl.sequences import ValueModel, export_value_model
    from components.vlm.model import load_vlm

    torch.manual_seed(0)
    vlm, tokenizer, _ = load_vlm(export)
    folder = tmp_path_factory.mktemp("rm") / "model"
    export_value_model(ValueModel(vlm), tokenizer, folder, {"stage": "rm"}, {"score_mean": 0.1, "score_std": 2.0})
    return folder


def test_bradley_terry_training_lowers_the_loss_on_a_toy(export: Path) -> None:
    from components.rl.sequences import Sequence, ValueModel, answer_ids, set_value_trainable
    from components.vlm.model import load_vlm

    torch.manual_seed(0)
    vlm, tokenizer, _ = load_vlm(export)
    model = ValueModel(vlm)
    groups = set_value_trainable(model, ["llm"])
    groups[0]["lr"], groups[1]["lr"] = 1e-3, 1e-2
    optimizer = torch.optim.AdamW(groups)
    prompt = list(tokenizer("How many red circles?", add_special_tokens=False)["input_ids"])
    pairs = [(Sequence(prompt, None, None, answer_ids(tokenizer, good, 16)),
              Sequence(prompt, None, None, answer_ids(tokenizer, bad, 16)))
             for good, bad in (("3", "a red circle a red circle a red"), ("2", "blue square blue square blue"))]

    def loss() -> torch.Tensor:
        return bradley_terry_loss(torch.stack([model.score(c) for c, _ in pairs]),
                                  torch.stack([model.score(r) for _, r in pairs]))

    first = float(loss().detach())
    for _ in range(8):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert float(loss().detach()) < first - 0.1


def test_the_critic_starts_on_the_rewards_scale(rm_export: Path) -> None:
    from components.rl.sequences import Sequence, load_value_model
    from components.rl.workers import CriticWorker

    raw_model, tokenizer, meta = load_value_model(rm_export)
    seq = Sequence(list(tokenizer("How many?", add_special_tokens=False)["input_ids"]), None, None,
                   list(tokenizer("3 red circles", add_special_tokens=False)["input_ids"]))
    critic = CriticWorker(str(rm_export), 1e-3, ["llm"], 0.5, DS)
    raw = raw_model.values(seq).detach()
    expected = 0.5 + 0.25 * (raw - meta["score_mean"]) / meta["score_std"]
    assert torch.allclose(torch.tensor(critic.values([seq])[0]), expected, atol=1e-5)


def rollouts(export: Path, tokenizer_source: Any = None) -> dict[str, Any]:
    from components.rl.workers import RolloutWorker

    worker = RolloutWorker(str(export), "You are a helpful assistant. Give the answer directly.")
    prompts = [{"question": "How many red circles?", "images": [], "timestamps": []},
               {"question": "Describe the image.", "images": [], "timestamps": []}]
    return worker.generate(prompts, max_new_tokens=6, temperature=1.0, top_p=1.0, n=2, seeds=[1, 2],
                           max_response_tokens=4)


def test_rollout_logprobs_match_the_actors_teacher_forced_ones(export: Path) -> None:
    from components.rl.sequences import response_logits, token_logprobs
    from components.rl.workers import ActorWorker

    out = rollouts(export)
    assert len(out["rollouts"]) == 4 and all(len(r["sequence"].response_ids) <= 4 for r in out["rollouts"])
    assert out["truncated"] == sum(r["generated_tokens"] > 4 for r in out["rollouts"])
    actor = ActorWorker(str(export), 1e-4, ["llm"], RlAlgoConfig(), 1.0, DS, -1, "/nonexistent/marker")
    with torch.no_grad():
        for rollout in out["rollouts"]:
            seq = rollout["sequence"]
            mine = token_logprobs(response_logits(actor.model, seq, 1.0), seq.response_ids)
            assert torch.allclose(mine, torch.tensor(rollout["logprobs"]), atol=1e-3)


def test_rollouts_longer_than_the_limit_are_cut_and_counted(export: Path) -> None:
    from components.rl.workers import RolloutWorker

    worker = RolloutWorker(str(export), "")
    out = worker.generate([{"question": "Describe the image.", "images": [], "timestamps": []}], max_new_tokens=8,
                          temperature=1.0, top_p=1.0, n=3, seeds=[0], max_response_tokens=2)
    assert all(len(r["sequence"].response_ids) <= 2 for r in out["rollouts"])
    assert out["truncated"] == sum(r["generated_tokens"] > 2 for r in out["rollouts"]) > 0
    # the engine's own stop at max_new_tokens is a cut too, though max_response_tokens is not reached
    out = worker.generate([{"question": "Describe the image.", "images": [], "timestamps": []}], max_new_tokens=2,
                          temperature=1.0, top_p=1.0, n=3, seeds=[0], max_response_tokens=8)
    assert out["truncated"] == sum(r["finish_reason"] == "length" for r in out["rollouts"]) > 0


def one_update(actor: Any, critic: Any, batch: list[Any], step: int) -> tuple[dict[str, float], dict[str, float]]:
    from components.rl.algorithms import advantages_and_returns, token_rewards
    from components.rl.sequences import pad_rows

    sequences = [r["sequence"] for r in batch]
    old_logprobs, mask = pad_rows([torch.tensor(r["logprobs"]) for r in batch])
    old_values, _ = pad_rows([torch.tensor(v) for v in critic.values(sequences)])
    rewards = token_rewards(torch.tensor([1.0, 0.0, 0.5, 0.0][:len(batch)]), mask)
    advantages, returns = advantages_and_returns(rewards, old_values, mask, RlAlgoConfig())
    return actor.update(sequences, old_logprobs, advantages, step), critic.update(sequences, old_values, returns)


def test_a_checkpoint_round_trip_resumes_the_same_update(export: Path, rm_export: Path, tmp_path: Path) -> None:
    from components.rl.driver import latest_checkpoint, read_checkpoint, write_checkpoint
    from components.rl.workers import ActorWorker, CriticWorker

    batch = rollouts(export)["rollouts"]

    def fresh() -> tuple[Any, Any]:
        torch.manual_seed(0)
        return (ActorWorker(str(export), 1e-3, ["llm"], RlAlgoConfig(), 1.0, DS, -1, str(tmp_path / "m")),
                CriticWorker(str(rm_export), 1e-3, ["llm"], 0.5, DS))

    actor, critic = fresh()
    stats, critic_stats = one_update(actor, critic, batch, 0)
    assert {"policy_loss", "entropy", "clip_fraction_low", "clip_fraction_high"} <= set(stats)
    assert "value_loss" in critic_stats

    def save(tmp: Path) -> None:
        actor.save(str(tmp / "actor"))
        critic.save(str(tmp / "critic"))

    for step in (1, 2, 3):
        write_checkpoint(tmp_path / "ckpt", step, {"epoch": {"general": step}, "position": {}}, save,
                         {"history": {str(s): {"reward/all": 0.1 * s} for s in range(step)}})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000002", "step-000003"]
    one_update(actor, critic, batch, 1)  # the uninterrupted run's next step

    resumed_actor, resumed_critic = fresh()
    checkpoint = latest_checkpoint(tmp_path / "ckpt")
    step, sampler, logged = read_checkpoint(checkpoint)
    assert step == 3 and sampler["epoch"] == {"general": 3} and sorted(logged["history"]) == ["0", "1", "2"]
    resumed_actor.load(str(checkpoint / "actor"))
    resumed_critic.load(str(checkpoint / "critic"))
    one_update(resumed_actor, resumed_critic, batch, 1)
    for mine, theirs in ((resumed_actor.model, actor.model), (resumed_critic.model, critic.model)):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.allclose(a, b, atol=1e-6), name


def test_the_test_only_kill_switch_fires_once(export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import components.rl.workers as workers

    exits = []
    monkeypatch.setattr(workers.os, "_exit", lambda code: exits.append(code))
    actor = workers.ActorWorker(str(export), 1e-3, ["llm"], RlAlgoConfig(), 1.0, DS, 2, str(tmp_path / "marker"))
    for step in (0, 1, 2, 2, 3):
        actor.maybe_fail(step)
    assert exits == [1]


def test_checkpoints_live_beside_the_staging_folder_under_the_cache_key(tmp_path: Path) -> None:
    from components.common.contract import StageContext
    from components.rl.driver import checkpoint_folder

    staged = tmp_path / "cache" / "vlm_rl" / ".staging-0123abcd-4242-deadbeef"
    ctx = StageContext(config=None, inputs={}, outputs={"vlm": staged / "vlm"}, workdir=staged)
    assert checkpoint_folder(ctx) == tmp_path / "cache" / "vlm_rl" / ".resume-0123abcd"
    elsewhere = StageContext(config=None, inputs={}, outputs={"vlm": tmp_path / "out" / "vlm"}, workdir=tmp_path / "out")
    assert checkpoint_folder(elsewhere) == tmp_path / "out" / "vlm" / "checkpoints"


def test_the_reward_group_routes_by_type_and_never_raises_on_bad_answers(rm_export: Path) -> None:
    from components.rl.workers import RewardWorker

    worker = RewardWorker(str(rm_export), thinking=False, max_tokens=64, min_iou=0.5)
    row = {"key": "k", "question": "How many?", "images": [], "timestamps": []}
    rows = [{**row, "type": "general", "kind": "caption", "reference": "a red circle",
             "text": "<think>long reasoning</think>a red circle"},
            {**row, "type": "verifiable", "kind": "counting", "reference": "3", "text": "3"},
            {**row, "type": "verifiable", "kind": "grounding", "reference": "<box>[1, 2, 30, 40]</box>",
             "text": "\ufffd<box>[[[nonsense"},
            {**row, "type": "verifiable", "kind": "ocr", "reference": None, "text": "anything"}]
    out = worker.score(rows)
    assert out["rewards"][1:] == [1.0, 0.0, 0.0] and 0.0 < out["rewards"][0] < 1.0
    stats = out["stats"]
    assert stats["verifier/no_reference"] == 1 and stats["count/general"] == 1 and stats["count/verifiable"] == 3
    assert stats["verifier/counting/pass_rate"] == 1.0 and stats["verifier/grounding/pass_rate"] == 0.0
    assert stats["rm/score"] == out["rewards"][0]


def test_reward_model_and_group_config_mistakes_name_the_key() -> None:
    from components.rl.config import GroupResources, RewardModelConfig

    with pytest.raises(ValueError, match=r"train\.vlm\.reward_model\.trainable.*\[vit, adapter, llm\]"):
        RewardModelConfig(trainable=["head"])
    with pytest.raises(ValueError, match=r"train\.vlm\.reward_model\.heldout_fraction"):
        RewardModelConfig(heldout_fraction=1.0)
    with pytest.raises(ValueError, match=r"num_gpus=1 on a cluster"):
        GroupResources(num_cpus=0.0, num_gpus=0.0)
