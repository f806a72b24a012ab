"""The shuffled-image control of the VLM evaluation: every item asked again with another sample's media,
scored apart, and its gap beside each score."""

from __future__ import annotations

from pathlib import Path

from components.vlm.evaluate import prefixed, score_answers, shuffled_control


def rows() -> list[dict]:
    out = []
    for key, count in (("a", 2), ("b", 1), ("c", 3)):  # sample a holds two counting items
        for turn in range(1 if key != "a" else 2):
            out.append({"key": key, "kind": "counting", "question": "<image>\nHow many?", "reference": str(count),
                        "turn": turn, "images": [f"png-{key}".encode()], "timestamps": [], "control": "true"})
    out.append({"key": "v", "kind": "video_qa", "question": "<video>\nWhat?", "reference": "red", "turn": 0,
                "images": [b"f1", b"f2"], "timestamps": [0.0, 1.0], "control": "true"})
    return out


def test_every_item_gets_another_samples_media_of_its_kind() -> None:
    original = rows()
    for seed in range(6):
        shuffled = shuffled_control(original, seed)
        assert [r["control"] for r in shuffled] == ["shuffled"] * 4  # the lone video sample has no donor
        assert all(r["images"] != [f"png-{r['key']}".encode()] for r in shuffled)
        own = {r["key"]: r["images"] for r in original}
        a_rows = [r for r in shuffled if r["key"] == "a"]
        assert a_rows[0]["images"] == a_rows[1]["images"] != own["a"]  # both of a's items get one donor
        assert {tuple(r["images"]) for r in shuffled} <= {tuple(v) for v in own.values()}
        assert all(r["question"] == o["question"] and r["reference"] == o["reference"]
                   for r, o in zip(shuffled, [o for o in original if o["kind"] == "counting"]))


def test_scores_per_control_and_their_gap() -> None:
    answers = [{**r, "prediction": r["reference"]} for r in rows()]
    answers += [{**r, "control": "shuffled", "prediction": "1"} for r in rows() if r["kind"] == "counting"]
    by_control, examples = score_answers(answers)
    assert by_control["true"]["counting_accuracy"] == 1.0
    assert by_control["shuffled"]["counting_accuracy"] == 0.25  # "1" is right only for b, of 4 items
    assert len(examples) == 5
    first = next(e for e in examples if e["key"] == "b")
    assert first["prediction"] == "1" and first["prediction_shuffled"] == "1"
    assert first["counting_accuracy"] == 1.0 and first["counting_accuracy_shuffled"] == 1.0
    keys = prefixed("eval", {"counting_accuracy": 1.0, "shuffled/counting_accuracy": 0.25,
                             "gap/counting_accuracy": 0.75})
    assert keys == {"eval/counting_accuracy": 1.0, "eval_shuffled/counting_accuracy": 0.25,
                    "eval_gap/counting_accuracy": 0.75}


def test_held_out_rows_take_items_turn_by_turn_across_samples(monkeypatch) -> None:
    """One question per sample before any sample's second, every turn among them: many pictures per kind."""
    import types

    from PIL import Image

    import components.vlm.data as vlm_data
    from components.vlm.evaluate import held_out_rows

    def counting(key: str) -> types.SimpleNamespace:
        turns = [{"from": role, "value": text} for q, a in (("<image>\nHow many shapes are there?", "2"),
                 ("How many red shapes are there?", "1"), ("How many blue squares are there?", "0"))
                 for role, text in (("human", q), ("gpt", a))]
        return types.SimpleNamespace(info={"conversations": turns}, task="counting", key=key,
                                     images=[Image.new("RGB", (8, 8))])

    samples = [counting(f"s{i}") for i in range(4)]
    monkeypatch.setattr(vlm_data, "held_out_samples", lambda *args: iter(samples))
    monkeypatch.setattr(vlm_data, "select_frames", lambda sample, frames: (sample.images, None))
    job = types.SimpleNamespace(holdout_fraction=0.1, frames_per_clip=4,
                                eval=types.SimpleNamespace(max_items_per_kind=6))
    rows, counter = held_out_rows(Path("unused"), job)
    assert [(r["key"], r["turn"]) for r in rows] == [("s0", 0), ("s1", 1), ("s2", 2), ("s3", 0), ("s0", 1), ("s1", 2)]
    assert counter["kept"] == 4 and all(r["images"] and r["control"] == "true" for r in rows)
    assert rows[0]["images"] is rows[4]["images"]  # one encoding per sample
