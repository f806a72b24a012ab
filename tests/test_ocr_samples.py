"""The OCR step on Ray Data: every sample transcribes its exact text, with line boxes in [0, 999]."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from components.common.executor import run_into
from components.common.resources import Resources
from components.data.config import OcrConfig
from components.data.ocr_samples import TRANSCRIBE, ocr_fingerprint, ocr_samples
from components.data.lib.table import data_dir, read_stats


def test_step_rows_carry_exact_text_and_qa(tmp_path: Path, local_ray: None) -> None:
    cfg = OcrConfig(num_samples=8, max_side=400, font_dirs=[], resources=Resources(batch_size=4))  # built-in font only
    run_into(ocr_samples, cfg, {}, tmp_path, seed=1)
    rows = [r for f in sorted(data_dir(tmp_path / "samples").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == read_stats(tmp_path / "samples")["kept"] == 8
    assert {r["task"] for r in rows} == {"ocr"} and len({r["key"] for r in rows}) == 8
    for row in rows:
        notes, talk, meta = json.loads(row["annotations"]), json.loads(row["conversations"]), json.loads(row["meta"])
        assert talk[0]["value"] == f"<image>\n{TRANSCRIBE}" and talk[1]["value"] == notes["text"]
        assert notes["text"] == "\n".join(line["text"] for line in notes["lines"])
        assert all(0 <= v <= 999 for line in notes["lines"] for v in line["box"])
        assert [t["value"] for t in talk[3::2]] == [qa["answer"] for qa in notes["qa"][: len(talk[3::2])]]
        assert meta["font"] == "default"
        with Image.open(io.BytesIO(row["images"][0])) as image:
            assert image.format == "PNG" and image.size == (row["width"], row["height"])


def test_fonts_enter_the_cache_key(tmp_path: Path) -> None:
    assert ocr_fingerprint(OcrConfig(font_dirs=[str(tmp_path)])) == {"fonts": []}
    (tmp_path / "a.ttf").write_bytes(b"not really a font")
    assert ocr_fingerprint(OcrConfig(font_dirs=[str(tmp_path)])) == {"fonts": [("a.ttf", 17)]}
