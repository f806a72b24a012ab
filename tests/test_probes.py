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


def test_region_of_cuts_any_grid_in_thirds() -> None:
    from components.common.probes import region_of

    assert [region_of(i, 3, 3) for i in range(9)] == list(range(9))
    assert [region_of(i, 1, 6) for i in range(6)] == [3, 3, 4, 4, 5, 5]  # one row: the middle third
    assert region_of(0, 8, 8) == 0 and region_of(63, 8, 8) == 8 and region_of(4 * 8 + 4, 8, 8) == 4


def test_cell_position_reads_where_a_token_sits_only_when_its_features_say_so() -> None:
    rng = np.random.default_rng(0)
    facts, grids = [], []
    for index in range(60):
        gh, gw = int(rng.integers(3, 8)), int(rng.integers(3, 8))
        facts.append(ImageFacts(key=f"k{index}", boxes=[("red", (0.0, 0.0, 28.0, 28.0))], width=gw * 28,
                                height=gh * 28, count=1))
        grids.append((gh, gw))
    # Translation-equivariant features (as relative positions give): the content, not the place.
    content = [rng.normal(size=(gh * gw, 16)).astype(np.float32) for gh, gw in grids]
    blind = run_probes(facts, content, grids)
    assert blind["cell_position"] < 0.25  # chance is 1/9

    def placed(tokens: np.ndarray, gh: int, gw: int) -> np.ndarray:
        rows = (np.arange(gh)[:, None].repeat(gw, 1).reshape(-1) + 0.5) / gh
        cols = (np.arange(gw)[None, :].repeat(gh, 0).reshape(-1) + 0.5) / gw
        return np.concatenate([tokens, 3 * rows[:, None], 3 * cols[:, None]], axis=1)

    seeing = run_probes(facts, [placed(t, gh, gw) for t, (gh, gw) in zip(content, grids)], grids)
    assert seeing["cell_position"] > 0.6
