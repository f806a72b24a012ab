"""The grounding/counting step on Ray Data: rows per scene, answers that match the drawn pixels."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from components.common.coords import box_to_pixels, parse_boxes, parse_points, point_to_pixels
from components.common.executor import run_into
from components.data.config import GroundingConfig
from components.data.grounding_samples import grounding_samples
from components.data.synthetic_crawl import COLOURS
from components.data.lib.table import data_dir, read_stats


def test_step_rows_answer_from_the_pixels(tmp_path: Path, local_ray: None) -> None:
    cfg = GroundingConfig(num_samples=6, min_side=96, max_side=300)
    run_into(grounding_samples, cfg, {}, tmp_path, seed=3)
    rows = [r for f in sorted(data_dir(tmp_path / "samples").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    stats = read_stats(tmp_path / "samples")
    assert stats["in"] == stats["kept"] == len(rows) and {r["task"] for r in rows} == {"grounding", "counting"}
    for row in rows:
        image = np.asarray(Image.open(io.BytesIO(row["images"][0])).convert("RGB"))
        assert image.shape[:2] == (row["height"], row["width"])
        talk = json.loads(row["conversations"])
        assert talk[0]["value"].startswith("<image>\n") and len(talk) % 2 == 0
        objects = json.loads(row["annotations"])["objects"]
        for question, answer in zip(talk[0::2], talk[1::2]):
            if row["task"] == "counting":
                asked = next(c for c in json.loads(row["annotations"])["counting"]
                             if question["value"].endswith(c["question"]))
                matching = [o for o in objects if asked.get("colour") in (None, o["colour"])
                            and asked.get("shape") in (None, o["shape"])]
                assert answer["value"] == str(len(matching)) == str(len(asked["boxes"]))
                continue
            expression = re.sub(r"^(?:<image>\n)?(?:Give the bounding box of|Point to) ", "", question["value"])[:-1]
            ref = next(r for r in json.loads(row["annotations"])["referring"] if r["expression"] == expression)
            target = objects[ref["target"]]
            rgb = np.array(COLOURS[target["colour"]])
            if answer["value"].startswith("<box>"):
                (box,) = parse_boxes(answer["value"])
                x0, y0, x1, y1 = (int(round(v)) for v in box_to_pixels(box, row["width"], row["height"]))
                region = image[y0:y1, x0:x1]
                assert (np.abs(region.astype(int) - rgb).sum(-1) < 30).any()  # the object is inside the box
            else:
                (point,) = parse_points(answer["value"])
                x, y = point_to_pixels(point, row["width"], row["height"])
                assert np.abs(image[int(y), int(x)].astype(int) - rgb).sum() < 30  # the point is on the object
    again = tmp_path / "again"
    run_into(grounding_samples, cfg, {}, again, seed=3)
    rows_again = [r for f in sorted(data_dir(again / "samples").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted((r["key"], r["images"][0]) for r in rows) == sorted((r["key"], r["images"][0]) for r in rows_again)
