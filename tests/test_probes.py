"""Linear probes of per-image facts: facts parsed from the synthesis steps' annotations and captions, the
cell labels of box-annotated objects, and probes that read what the features hold (and only that)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from components.common.probes import (ImageFacts, cell_labels, facts_from_info, pixel_tokens, probe_set,
                                      run_probes)
from components.data.synthetic_crawl import random_scene, render


def test_facts_from_captions_and_annotations() -> None:
    facts = facts_from_info("k", "caption", {"caption": "a red circle and two blue squares on a white background"},
                            200, 100)
    assert facts is not None
    assert facts.colours == {"red", "blue"} and facts.shapes == {"circle", "square"}
    assert facts.count == 3 and facts.background == "white" and not facts.boxes
    assert facts_from_info("k", "caption", {"caption": "a dog on a beach"}, 10, 10) is None
    assert facts_from_info("k", "caption", {"caption": "a pink circle on a white background"}, 10, 10) is None
    info = {"caption": "2 shapes on a gray background (sparse layout)",
            "annotations": {"objects": [{"shape": "circle", "colour": "red", "box": [0, 0, 500, 500]},
                                        {"shape": "square", "colour": "red", "box": [600, 600, 800, 800]}]}}
    grounded = facts_from_info("g", "grounding", info, 112, 200)  # boxes in [0, 999] -> pixels
    assert grounded is not None and grounded.count == 2 and grounded.background == "gray"
    assert grounded.colours == {"red"} and grounded.boxes[0] == ("red", (0.0, 0.0, 56.0, 100.0))
    crawl = {"caption": "a red circle on a white background",
             "meta": {"width": 200, "height": 100, "synthetic": {
                 "noise": None, "true_caption": "a red circle on a white background",
                 "objects": [{"box": [20, 10, 60, 50], "colour": "red", "shape": "circle"}]}}}
    scene = facts_from_info("c", "caption", crawl, 100, 50)  # the decoded picture is half the original size
    assert scene is not None and scene.boxes == [("red", (10.0, 5.0, 30.0, 25.0))]
    assert facts_from_info("g", "grounding", {"annotations": {}}, 1, 1) is None


def test_cell_labels_mark_covered_cells_and_leave_out_partial_ones() -> None:
    facts = ImageFacts(key="k", boxes=[("red", (0, 0, 56, 56)), ("blue", (60, 60, 80, 80))], width=112, height=112)
    labels = cell_labels(facts, 4, 4)  # 28-pixel cells
    assert labels[0] == labels[1] == labels[4] == labels[5] == "red"
    assert labels[10] is None  # the small blue box covers a third of cell (2, 2)
    assert labels[15] == "background"


def scenes(count: int, seed: int = 0) -> list[tuple[str, str, dict, Image.Image]]:
    import random

    rng = random.Random(seed)
    out = []
    for index in range(count):
        scene = random_scene(rng, 112, 112)
        out.append((f"crawl-{index}", "caption", {"caption": scene.caption()}, render(scene)))
    return out


def test_pixel_histograms_read_object_colours_and_noise_does_not() -> None:
    probes = probe_set(scenes(200), max_images=200)
    assert len(probes.images) == 200
    grids = [(4, 4)] * len(probes.images)
    pixels = run_probes(probes.facts, [pixel_tokens(i, 4, 4) for i in probes.images], grids)
    assert pixels["background_mean"] > 0.9
    assert pixels["colour_present_mean"] > 0.75
    rng = np.random.default_rng(0)
    noise = run_probes(probes.facts, [rng.normal(size=(16, 64)).astype(np.float32) for _ in probes.images], grids)
    assert noise["colour_present_mean"] < 0.65 and noise["background_mean"] < 0.5
    assert set(noise) >= {"count_mean", "count_max", "count_majority", "shape_present_max", "images"}
