"""Dedup core: the LSH index finds exactly the pairs brute force finds, groups and representatives
are deterministic, and pHash behaves as the threshold assumes on synthetic-crawl-like images."""

from __future__ import annotations

import hashlib
import io
import random

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

from components.data.lib.dedup_core import (
    HammingIndex,
    LSHStats,
    band_layout,
    choose_bands,
    choose_representatives,
    content_hash,
    dedup_against,
    find_duplicate_groups,
    hamming,
    near_pairs,
    phash64,
    sort_by_key,
)

# --- helpers -------------------------------------------------------------------------------------


def flip_bits(rng: np.random.Generator, value: int, distance: int) -> int:
    for bit in rng.choice(64, size=distance, replace=False):
        value ^= 1 << int(bit)
    return value


def planted_hashes(
    seed: int, n: int, distances: range, per_distance: int
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """n hashes: random ones plus `per_distance` copies of random earlier ones at each distance."""
    rng = np.random.default_rng(seed)
    planted_count = per_distance * len(distances)
    values = [int(v) for v in rng.integers(0, 2**64, size=n - planted_count, dtype=np.uint64)]
    planted = []
    for d in distances:
        for _ in range(per_distance):
            source = int(rng.integers(len(values)))
            values.append(flip_bits(rng, values[source], d))
            planted.append((source, len(values) - 1, d))
    return np.array(values, dtype=np.uint64), planted


def brute_pairs(hashes: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])  # (n, n)
    i, j = np.nonzero(np.triu(distance <= threshold, k=1))
    return set(zip(i.tolist(), j.tolist()))


def brute_groups(n: int, pairs: set[tuple[int, int]]) -> list[set[int]]:
    neighbours: dict[int, set[int]] = {}
    for a, b in pairs:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    seen: set[int] = set()
    groups = []
    for start in sorted(neighbours):
        if start in seen:
            continue
        stack, group = [start], set()
        while stack:
            node = stack.pop()
            if node not in group:
                group.add(node)
                stack.extend(neighbours[node] - group)
        seen |= group
        groups.append(group)
    return groups


def random_scene(rng: random.Random, width: int = 320, height: int = 240) -> Image.Image:
    """A synthetic-crawl-like picture: a few coloured circles and rectangles on a plain background."""
    image = Image.new("RGB", (width, height), tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 5)):
        size = rng.randint(height // 10, height // 2)
        x, y = rng.randint(-size // 4, width - 3 * size // 4), rng.randint(-size // 4, height - 3 * size // 4)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + size, y + size), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return image


def jpeg50(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=50)
    return Image.open(io.BytesIO(buffer.getvalue()))


def resize80(image: Image.Image) -> Image.Image:
    return image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.BILINEAR)


def crop4(image: Image.Image) -> Image.Image:
    dx, dy = round(image.width * 0.04), round(image.height * 0.04)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


# --- hashes --------------------------------------------------------------------------------------


def test_content_hash_is_sha256() -> None:
    assert content_hash(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert content_hash(b"abc") != content_hash(b"abd")


def test_phash64_is_imagehash_phash_as_int() -> None:
    image = random_scene(random.Random(0))
    value = phash64(image)
    assert value == int(str(imagehash.phash(image, hash_size=8)), 16)
    assert 0 <= value < 2**64
    assert hamming(value, value ^ 0b1011) == 3


def test_band_layout_covers_all_bits_evenly() -> None:
    for bands in range(1, 65):
        layout = band_layout(bands)
        assert [shift for shift, _ in layout] == [sum(w for _, w in layout[:i]) for i in range(bands)]
        widths = [w for _, w in layout]
        assert sum(widths) == 64 and max(widths) - min(widths) <= 1
    assert [w for _, w in band_layout(9)] == [8, 7, 7, 7, 7, 7, 7, 7, 7]


# --- the LSH index against brute force ----------------------------------------------------------


@pytest.mark.parametrize("key_bits", [1, 7, 16, 17, 21, 33, 48, 64])
def test_radix_sort_by_key_is_a_stable_sort(key_bits: int) -> None:
    rng = np.random.default_rng(key_bits)
    key = rng.integers(0, 2**key_bits, size=3000, dtype=np.uint64) if key_bits < 64 else \
        rng.integers(0, 2**64, size=3000, dtype=np.uint64)
    key[::7] = key[0]  # many ties: their order must stay the input order
    sorted_keys, order = sort_by_key(key, key_bits)
    expected = np.argsort(key, kind="stable")
    assert np.array_equal(order, expected) and np.array_equal(sorted_keys, key[expected])


@pytest.mark.parametrize(("threshold", "bands"), [(8, None), (8, 9), (8, 12), (4, None), (10, None), (0, None), (3, 4)])
def test_lsh_finds_exactly_the_brute_force_pairs(threshold: int, bands: int | None) -> None:
    hashes, planted = planted_hashes(seed=threshold, n=2000, distances=range(0, threshold + 4), per_distance=20)
    pairs, stats = near_pairs(hashes, threshold, bands=bands)
    found = set(map(tuple, pairs.tolist()))

    assert found == brute_pairs(hashes, threshold)
    assert all(hamming(int(hashes[a]), int(hashes[b])) <= threshold for a, b in found)
    for source, copy, d in planted:
        assert ((source, copy) in found) == (d <= threshold), (source, copy, d)
    assert stats.verified_pairs == len(found) and stats.oversized_buckets == 0
    assert stats.candidate_pairs < 2000 * 1999 // 2  # never all pairs


def test_groups_match_brute_force_components() -> None:
    threshold = 8
    hashes, _ = planted_hashes(seed=1, n=2000, distances=range(0, 12), per_distance=30)
    # chains: b near a and c near b can put a and c beyond the threshold, yet in one group
    rng = np.random.default_rng(7)
    chain = [int(hashes[0])]
    for _ in range(5):
        chain.append(flip_bits(rng, chain[-1], threshold))
    hashes = np.concatenate([hashes, np.array(chain[1:], dtype=np.uint64)])
    keys = [f"k{i:05d}" for i in range(hashes.size)]
    stats = LSHStats()

    groups = find_duplicate_groups(keys, hashes, threshold, stats=stats)

    expected = brute_groups(hashes.size, brute_pairs(hashes, threshold))
    assert sorted(map(sorted, groups)) == sorted(map(sorted, expected))
    assert all(len(g) >= 2 for g in groups)
    assert stats.unique_hashes < hashes.size  # distance-0 copies were collapsed before indexing
    assert any(set(range(2000, 2005)) <= set(g) for g in groups)


def test_oversized_buckets_stay_bounded_and_counted() -> None:
    rng = np.random.default_rng(3)
    n, threshold, max_bucket = 600, 8, 50
    shared_high_bits = int(rng.integers(0, 2**48, dtype=np.uint64)) << 16
    hashes = np.array([shared_high_bits | int(v) for v in rng.choice(2**16, size=n, replace=False)], dtype=np.uint64)

    pairs, stats = near_pairs(hashes, threshold, max_bucket=max_bucket)

    truth = brute_pairs(hashes, threshold)
    found = set(map(tuple, pairs.tolist()))
    assert found <= truth  # every reported pair is verified
    assert stats.oversized_buckets > 0 and stats.skipped_pairs > 0
    assert stats.candidate_pairs <= stats.tables * n * (max_bucket - 1)
    complete, _ = near_pairs(hashes, threshold, max_bucket=n + 1)
    assert set(map(tuple, complete.tolist())) == truth


def test_dedup_against_matches_brute_force() -> None:
    threshold = 8
    rng = np.random.default_rng(11)
    reference = rng.integers(0, 2**64, size=3000, dtype=np.uint64)
    near = [flip_bits(rng, int(reference[rng.integers(3000)]), int(d)) for d in rng.integers(0, threshold + 1, 300)]
    far = [flip_bits(rng, int(reference[rng.integers(3000)]), int(d)) for d in rng.integers(threshold + 1, 14, 300)]
    new = np.concatenate([np.array(near + far, dtype=np.uint64), rng.integers(0, 2**64, size=400, dtype=np.uint64)])
    expected = np.bitwise_count(new[:, None] ^ reference[None, :]).min(axis=1) <= threshold

    for bands in (None, threshold + 1, threshold + 3):
        matched = dedup_against(reference, new, threshold, bands=bands)
        assert np.array_equal(matched, expected)
    assert matched[:300].all() and not matched[300:600].any()


def test_index_query_falls_back_on_oversized_buckets() -> None:
    rng = np.random.default_rng(5)
    low = rng.choice(2**16, size=800, replace=False)
    reference = np.array([(0xABCDEF << 16) | int(v) for v in low[:500]], dtype=np.uint64)
    new = np.array([(0xABCDEF << 16) | int(v) for v in low[500:]], dtype=np.uint64)
    index = HammingIndex(reference, 8, max_bucket=40)

    matched = index.query(new)

    truth = np.bitwise_count(new[:, None] ^ reference[None, :]).min(axis=1) <= 8
    assert not (matched & ~truth).any()  # no false positives
    assert index.stats.oversized_buckets > 0 and index.stats.skipped_pairs > 0


def test_layout_and_input_errors_are_specific() -> None:
    hashes = np.arange(10, dtype=np.uint64)
    with pytest.raises(ValueError, match="bands must be in"):
        near_pairs(hashes, 8, bands=8)
    with pytest.raises(ValueError, match="threshold"):
        near_pairs(hashes, 64)
    with pytest.raises(ValueError, match="one key per hash"):
        find_duplicate_groups(["a"], hashes, 8)
    with pytest.raises(ValueError, match="unique"):
        find_duplicate_groups(["a"] * 10, hashes, 8)
    assert choose_bands(1000, 8) == 9 and choose_bands(1_000_000, 8) > 9
    assert find_duplicate_groups([], np.empty(0, dtype=np.uint64), 8) == []


# --- representatives -----------------------------------------------------------------------------


def test_representative_rule_largest_area_then_smallest_key() -> None:
    keys = ["b", "a", "c", "d"]
    scores = [(200,), (200,), (100,), (50,)]
    assert choose_representatives([[0, 1, 2]], keys, scores) == {0: 1, 2: 1}
    assert choose_representatives([[2, 3]], keys, scores) == {3: 2}


def test_representatives_are_deterministic_under_shuffling() -> None:
    hashes, _ = planted_hashes(seed=4, n=1500, distances=range(0, 9), per_distance=40)
    rng = np.random.default_rng(4)
    keys = [f"s{i:05d}" for i in range(hashes.size)]
    areas = rng.choice([240 * 320, 200 * 260, 192 * 256], size=hashes.size)  # many ties on purpose
    scores = [(int(a),) for a in areas]

    def kept_by_key(order: np.ndarray) -> dict[str, str]:
        k = [keys[i] for i in order]
        s = [scores[i] for i in order]
        groups = find_duplicate_groups(k, hashes[order], 8)
        return {k[d]: k[r] for d, r in choose_representatives(groups, k, s).items()}

    baseline = kept_by_key(np.arange(hashes.size))
    assert len(baseline) > 300
    for seed in range(3):
        assert kept_by_key(np.random.default_rng(seed).permutation(hashes.size)) == baseline


# --- pHash on real pixels ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes() -> list[Image.Image]:
    rng = random.Random(2024)
    return [random_scene(rng) for _ in range(200)]


def test_reencoded_and_resized_copies_stay_within_10(scenes: list[Image.Image]) -> None:
    for image in scenes:
        original = phash64(image)
        assert hamming(original, phash64(jpeg50(image))) <= 10
        assert hamming(original, phash64(resize80(image))) <= 10


def test_cropped_copies_mostly_within_10(scenes: list[Image.Image]) -> None:
    """pHash is not crop-invariant: cutting 4% off every border moves the hash by ~8 bits on
    average (measured on these 200 scenes: median 8, max 20, 82% within 10). Pinned so a change shows."""
    distances = np.array([hamming(phash64(image), phash64(crop4(image))) for image in scenes])
    assert np.median(distances) <= 10
    assert (distances <= 10).mean() >= 0.75


def test_distinct_scenes_rarely_within_10(scenes: list[Image.Image]) -> None:
    hashes = np.array([phash64(image) for image in scenes], dtype=np.uint64)
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    pairwise = distance[np.triu_indices(len(scenes), k=1)]  # 19,900 pairs
    assert (pairwise <= 10).mean() <= 0.01
