"""The SFT data step's templated reasoning and answer modes, the rejection-sampling verdicts and selection,
the shard tree the second SFT round reads, and the report's per-mode evaluation table (no pipeline run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.common.report import eval_table, split_modes
from components.training.shards import DropCounter, RawSample, ShardStream
from components.vlm.modes import DIRECT_SYSTEM_PROMPT, MODES, THINKING_SYSTEM_PROMPT, system_prompt
from components.vlm.rejection_sampling import acceptance_metrics, accepted_sample, judge, select_accepted
from components.vlm.sample_shards import ShardWriter
from components.vlm.sft_data import (caption_reasoning, counting_reasoning, grounding_reasoning, mode_of,
                                     ocr_reasoning, sft_conversation, sft_sample, where)
from components.vlm.stages import merged_shard_tree

OBJECTS = [{"box": [733, 79, 793, 156], "colour": "purple", "point": [763, 117], "shape": "diamond"},
           {"box": [694, 681, 806, 823], "colour": "black", "point": [750, 752], "shape": "diamond"},
           {"box": [10, 400, 90, 480], "colour": "red", "point": [50, 440], "shape": "circle"}]
COUNTING = {"task": "counting", "key": "scene-1",
            "annotations": {"objects": OBJECTS, "counting": [
                {"question": "How many diamonds are there?", "answer": 2, "colour": None, "shape": "diamond",
                 "points": [[763, 117], [750, 752]]},
                {"question": "How many green shapes are there?", "answer": 0, "colour": "green", "shape": None,
                 "points": []}]},
            "conversations": [{"from": "human", "value": "<image>\nHow many diamonds are there?"},
                              {"from": "gpt", "value": "2"},
                              {"from": "human", "value": "How many green shapes are there?"},
                              {"from": "gpt", "value": "0"}]}


def test_the_modes_are_defined_once_and_serving_uses_them() -> None:
    from components.serve.config import ThinkingConfig

    assert ThinkingConfig().thinking_system_prompt == THINKING_SYSTEM_PROMPT == system_prompt("thinking")
    assert ThinkingConfig().non_thinking_system_prompt == DIRECT_SYSTEM_PROMPT == MODES["direct"]
    with pytest.raises(ValueError, match="unknown answer mode"):
        system_prompt("fast")


def test_counting_reasoning_counts_then_enumerates() -> None:
    annotations = COUNTING["annotations"]
    text = counting_reasoning("<image>\nHow many diamonds are there?", "2", annotations)
    assert text == "I count 2. The diamonds: one at the top right and one at the bottom right."
    assert counting_reasoning("How many green shapes are there?", "0", annotations) == (
        "I count 0. I find no green shapes.")
    assert counting_reasoning("How many diamonds are there?", "3", annotations) is None  # answer disagrees
    assert counting_reasoning("How many stars are there?", "1", annotations) is None  # no such question
    crowd = {"counting": [{"question": "How many shapes are there?", "answer": 12, "colour": None, "shape": None,
                           "points": [[900, 900]] * 2 + [[100, 100]] * 9 + [[500, 500]]}]}
    assert counting_reasoning("How many shapes are there?", "12", crowd) == (
        "I count 12. The shapes: nine at the top left, one at the middle and two at the bottom right.")


def test_caption_reasoning_opens_with_the_background_unlike_counting() -> None:
    scene = {"width": 200, "height": 100, "caption": "a red circle and a green square on a beige background",
             "meta": {"synthetic": {"true_caption": "a red circle and a green square on a beige background",
                                    "objects": [{"colour": "red", "shape": "circle", "box": [10, 10, 30, 30]},
                                                {"colour": "green", "shape": "square", "box": [90, 40, 110, 60]}]}}}
    assert caption_reasoning(scene) == ("The background is beige. On it: a red circle at the top left and a green "
                                        "square at the middle.")
    assert caption_reasoning({**scene, "meta": {"synthetic": {"objects": [{"colour": "red"}]}}}) is None
    assert caption_reasoning({"caption": "a dog", "width": 9, "height": 9}) is None  # a web caption: no reasoning


def test_grounding_ocr_and_position_words() -> None:
    annotations = {"objects": OBJECTS, "referring": [{"expression": "the black shape", "target": 1},
                                                     {"expression": "the red circle", "target": 7}]}
    text = grounding_reasoning("Point to the black shape.", "<point>[750, 752]</point>", annotations)
    assert text == "The black shape is a black diamond at the bottom right. Its point follows."
    assert grounding_reasoning("Box of the red circle?", "<box>[1, 2, 3, 4]</box>", annotations) is None
    assert (where([500, 500]), where([0, 998]), where([998, 400])) == ("middle", "bottom left", "middle right")
    lines = {"lines": [{"text": "Total $4.50"}, {"text": "Thank you!"}]}
    assert ocr_reasoning("Read the text.", "Total $4.50 Thank you!", lines) == (
        "The picture has 2 lines of text. Line 1: Total $4.50. Line 2: Thank you!")
    assert ocr_reasoning("Read the text.", "x", {"lines": []}) is None


def test_conversation_modes_and_fallback_to_direct() -> None:
    conversation, mode = sft_conversation(COUNTING, "counting", "thinking")
    assert mode == "thinking" and conversation[0] == {"from": "system", "value": THINKING_SYSTEM_PROMPT}
    answers = [turn["value"] for turn in conversation if turn["from"] == "gpt"]
    assert answers[0].startswith("<think>I count 2. The diamonds: one at")
    assert answers[1].startswith("<think>I count 0.")
    assert answers[0].endswith("</think>2") and answers[1].endswith("</think>0")
    direct, mode = sft_conversation(COUNTING, "counting", "direct")
    assert mode == "direct" and direct[0]["value"] == DIRECT_SYSTEM_PROMPT and [t["value"] for t in direct[2::2]] == ["2", "0"]
    # a real web caption has no annotations to reason from: written in direct mode
    caption, mode = sft_conversation({"caption": "a dog on a sofa", "key": "k"}, "caption", "thinking")
    assert mode == "direct" and caption[-1]["value"] == "a dog on a sofa"


def test_mode_share_is_stable_and_close_to_the_setting() -> None:
    keys = [f"sample-{i}" for i in range(2000)]
    share = sum(mode_of(k, 0.3) == "thinking" for k in keys) / len(keys)
    assert abs(share - 0.3) < 0.04 and [mode_of(k, 0.3) for k in keys[:50]] == [mode_of(k, 0.3) for k in keys[:50]]
    assert {mode_of(k, 0.0) for k in keys} == {"direct"} and {mode_of(k, 1.0) for k in keys} == {"thinking"}


def test_sft_samples_count_every_drop_and_write_readable_shards(tmp_path: Path) -> None:
    counter = DropCounter()
    good = RawSample("scene-1", {"png": b"\x89PNG", "json": json.dumps(COUNTING).encode(), "txt": b"x"})
    samples = [good, RawSample("bad", {"png": b"x", "json": b"[1"}), RawSample("noimg", {"json": b"{}"}),
               RawSample("odd", {"png": b"x", "json": json.dumps({"conversations": [{"from": "human", "value": "hi"}]}).encode()})]
    written = [s for s in (sft_sample(raw, "counting", 1.0, counter) for raw in samples) if s is not None]
    assert dict(counter) == {"kept": 1, "mode_thinking": 1, "bad_json": 1, "missing_image": 1, "bad_conversation": 1}
    assert sum(counter[k] for k in ("kept", "bad_json", "missing_image", "bad_conversation")) == len(samples)
    assert set(written[0].members) == {"png", "json"}  # the old caption text is not carried along
    writer = ShardWriter(tmp_path / "counting", "sft", 1)
    writer.add(written[0])
    writer.add(written[0])
    shards = writer.close()
    assert [p.name for p in shards] == ["sft-000000.tar", "sft-000001.tar"] and not list(tmp_path.rglob("*.tmp"))
    read = list(ShardStream(shards, 0, 1, 0, held_out=False, holdout_fraction=0.5, counter=DropCounter(),
                            split_key=lambda raw, task: None).epoch(0))
    assert len(read) == 2 and json.loads(read[0].members["json"])["sft_mode"] == "thinking"


def test_merged_shard_tree_links_every_source(tmp_path: Path) -> None:
    for source, task in (("a", "counting"), ("a", "ocr"), ("b", "counting")):
        (tmp_path / source / task).mkdir(parents=True, exist_ok=True)
        (tmp_path / source / task / "x-000000.tar").write_bytes(source.encode())
    tree = merged_shard_tree([tmp_path / "a", tmp_path / "b"], tmp_path / "mix")
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*.tar")) == [
        "counting/00-x-000000.tar", "counting/01-x-000000.tar", "ocr/00-x-000000.tar"]
    assert (tree / "counting" / "01-x-000000.tar").read_bytes() == b"b"


def row(kind: str, reference: str, response: str, sample: int, tokens: int, key: str = "k", turn: int = 0) -> dict:
    return {"key": key, "turn": turn, "task": "grounding" if kind == "grounding" else "counting", "kind": kind,
            "question": "<image>\nq", "reference": reference, "response": response, "sample": sample,
            "tokens": tokens, "finish_reason": "stop"}


def test_rejection_verdicts_selection_and_rates() -> None:
    judged = [judge(r) for r in (
        row("counting", "3", "<think>one two three</think>3", 0, 9),
        row("counting", "3", "<think>one two three</think> 3", 1, 8),  # the same text: a duplicate
        row("counting", "3", "<think>a b</think>3", 2, 12),
        row("counting", "3", "3", 3, 1),  # right number, no reasoning: the format fails
        row("counting", "3", "<think>x</think>4", 4, 5),
        row("grounding", "<box>[0, 0, 100, 100]</box>", "<think>top left</think><box>[0, 0, 100, 90]</box>", 0, 7,
            key="g"),
        row("grounding", "<box>[0, 0, 100, 100]</box>", "<think>?</think><box>[0, 0, 40, 40]</box>", 1, 6, key="g"),
    )]
    assert [r["correct"] for r in judged] == [True, True, True, False, False, True, False]
    unreadable = judge(row("counting", "many", "<think>x</think>3", 0, 5))  # no whole number to check against
    assert unreadable["correct"] is False and unreadable["reward"] == 0.0 and not unreadable["reference_readable"]
    assert judged[3]["format_ok"] is False and judged[3]["reward"] == 0.0
    assert judged[5]["reward"] == pytest.approx(0.9)
    accepted = select_accepted(judged, keep=2)
    assert [r["sample"] for r in accepted["k", 0]] == [1, 2]  # shortest first, the duplicate dropped
    assert [r["sample"] for r in select_accepted(judged, keep=1)["g", 0]] == [0]
    prompts = [{"key": "k", "turn": 0, "task": "counting"}, {"key": "g", "turn": 0, "task": "grounding"},
               {"key": "z", "turn": 1, "task": "counting"}]
    metrics = acceptance_metrics(judged, accepted, prompts)
    assert metrics["counting/acceptance_rate"] == pytest.approx(0.5) and metrics["counting/accepted"] == 2
    assert metrics["all/prompts"] == 3 and metrics["counting/format_failures"] == 1
    assert metrics["counting/sample_pass_rate"] == pytest.approx(3 / 5)
    raw = RawSample("k", {"png": b"p", "json": json.dumps({"task": "counting", "conversations": []}).encode()})
    sample = accepted_sample(raw, accepted["k", 0][:1])
    info = json.loads(sample.members["json"])
    assert sample.key == "k-rs0-1" and set(sample.members) == {"png", "json"}
    assert [t["from"] for t in info["conversations"]] == ["system", "human", "gpt"]
    assert info["conversations"][0]["value"] == THINKING_SYSTEM_PROMPT and info["sft_mode"] == "thinking"


def test_report_splits_the_sft_evaluation_by_mode() -> None:
    metrics = {"eval_direct/counting_accuracy": 0.5, "eval_direct_shuffled/counting_accuracy": 0.25,
               "eval_thinking/counting_accuracy": 0.75, "eval_thinking_gap/counting_accuracy": 0.1,
               "eval/caption_f1": 0.3}
    modes = split_modes(metrics)
    assert modes["direct"] == {"eval/counting_accuracy": 0.5, "eval_shuffled/counting_accuracy": 0.25}
    assert modes["thinking"] == {"eval/counting_accuracy": 0.75, "eval_gap/counting_accuracy": 0.1}
    assert modes[""] == {"eval/caption_f1": 0.3}
    names, _, table = eval_table([{"name": "vlm_eval_sft", "metrics": metrics}])
    assert sorted(names) == ["vlm_eval_sft", "vlm_eval_sft (direct)", "vlm_eval_sft (thinking)"]
    assert table["vlm_eval_sft (thinking)"]["eval"]["counting_accuracy"] == 0.75


def test_evaluation_views_name_their_modes_and_probes() -> None:
    """Stages 0-2 are probed and asked under their own prompt; SFT in both modes, probed as configured (not in the
    tiny profile); RL in the modes it rolled out in: direct only for a direct-mode RL (the tiny profile's)."""
    from components.schema import load_config
    from components.vlm.config import eval_view, rl_eval_view

    vlm = load_config("tiny")[0].train.vlm
    stage, sft = eval_view("stage1")(vlm), eval_view("sft")(vlm)
    assert stage.modes == () and stage.probes
    assert sft.modes == ("direct", "thinking") and not sft.probes
    assert vlm.rl.answer_mode == "direct" and rl_eval_view(vlm).modes == ("direct",)
    thinking = load_config("tiny", overrides=["train.vlm.rl.answer_mode=thinking"])[0].train.vlm
    rl = rl_eval_view(thinking)
    assert rl.modes == ("direct", "thinking") and rl.stage_name == "rl" and not rl.probes
    assert eval_view("sft")(load_config("full")[0].train.vlm).probes
