"""Does an exported VLM place its grounding answers from the picture? The answer loss on the coordinate digits
of held-out grounding samples with their own picture and with another held-out sample's picture (teacher
forcing, the same answer tokens), for scenes of 1-3 objects and for the rest, split into each coordinate's first
digit and the others. A model that reads where the target is pays less with its own picture; about 2.2 nats a
digit is no better than a uniform guess over ten.

    .venv/bin/python benchmarks/grounding_digits.py RUN_ROOT/cache/vlm_stage1/<key>/vlm/model \\
        --shards RUN_ROOT/cache/write_shards/<key>/shards [--holdout 0.1] [--samples 80] [--max-tokens 512] [--name P4]

The holdout fraction must be the run's `train.vlm.holdout_fraction` (0.1 in the small profile), so the samples
are the ones the run never trained on. Records the table in benchmarks/results/grounding_digits.json (one
entry per --name, kept across calls).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results_file import REPO, record  # noqa: E402

from components.training.shards import DropCounter  # noqa: E402
from components.vlm.conversation import BadSample, encode_sample, turns_of  # noqa: E402
from components.vlm.data import held_out_samples, image_token_count, images_to_vit_input, select_frames  # noqa: E402
from components.vlm.eval_tasks import FEW_OBJECTS, scene_object_count  # noqa: E402
from components.vlm.inference import load_for_inference  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "grounding_digits.json"


@torch.no_grad()
def answer_token_losses(model, encoded) -> list[tuple[int, int, float]]:
    """(position, token id, loss) of every answer token of one encoded sample."""
    ids = torch.tensor([encoded.input_ids])
    packed = images_to_vit_input(list(encoded.media), model.vit.config)
    embeds = model.embed(ids, packed.pixel_values, packed.grid_hw)
    logits = model.llm(inputs_embeds=embeds, position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits[0]
    log_probs = torch.log_softmax(logits[:-1].float(), -1)
    labels = encoded.labels[1:]
    return [(t + 1, int(label), float(-log_probs[t, label])) for t, label in enumerate(labels) if label != -100]


def measure(export: Path, shards: Path, holdout: float, limit: int, max_tokens: int,
            shift: int = 7) -> dict[str, dict[str, float]]:
    model, tokenizer = load_for_inference(export)
    samples = list(held_out_samples(shards, ("grounding",), holdout, DropCounter()))[:limit]
    if len(samples) < 2:
        raise SystemExit(f"only {len(samples)} held-out grounding samples under {shards} at holdout {holdout}")
    digits = {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    openers = {tokenizer.convert_tokens_to_ids(t) for t in ("[", " ")}  # a coordinate starts after "[" or ", "
    sums: dict[str, list[float]] = {}
    skipped = 0
    for index, own in enumerate(samples):
        other = samples[(index + shift) % len(samples)]
        try:
            encoded = []
            for picture_of in (own, other):
                images, _ = select_frames(picture_of, 1)
                encoded.append(encode_sample(
                    key=own.key, task=own.task, turns=turns_of(own.info), tokenizer=tokenizer,
                    image_token_counts=[image_token_count(image, model.vit.config) for image in images],
                    media=images, max_tokens=max_tokens))
        except (BadSample, ValueError):
            skipped += 1
            continue
        true, shuffled = (answer_token_losses(model, e) for e in encoded)
        if [t for _, t, _ in true] != [t for _, t, _ in shuffled]:
            skipped += 1
            continue
        scene = "1-3 objects" if 1 <= scene_object_count(own.info) <= FEW_OBJECTS else "more objects"
        for (position, token, own_loss), (_, _, other_loss) in zip(true, shuffled):
            if token not in digits:
                continue
            place = "first digit" if encoded[0].input_ids[position - 1] in openers else "other digits"
            for group in (f"{scene}, {place}", "all digits"):
                cell = sums.setdefault(group, [0.0, 0.0, 0.0])
                cell[0] += own_loss
                cell[1] += other_loss
                cell[2] += 1
    rows = {group: {"digits": n, "own_picture": a / n, "other_picture": b / n, "gap": (b - a) / n}
            for group, (a, b, n) in sorted(sums.items())}
    rows["samples"] = {"used": float(len(samples) - skipped), "skipped": float(skipped)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an exported VLM folder (a stage's vlm/model)")
    parser.add_argument("--shards", type=Path, required=True, help="the run's write_shards output")
    parser.add_argument("--holdout", type=float, default=0.1, help="the run's train.vlm.holdout_fraction")
    parser.add_argument("--samples", type=int, default=80, help="held-out grounding samples to read")
    parser.add_argument("--max-tokens", type=int, default=512, help="the stage's max_tokens (trailing turns cut)")
    parser.add_argument("--name", default="", help="the row's name in the results file (default: the export)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = measure(args.export, args.shards, args.holdout, args.samples, args.max_tokens)
    print("| group | digits | own picture (nats) | another picture | gap |\n|---|---:|---:|---:|---:|")
    for group, row in rows.items():
        if group != "samples":
            print(f"| {group} | {int(row['digits'])} | {row['own_picture']:.3f} | {row['other_picture']:.3f} | "
                  f"{row['gap']:.3f} |")
    print(f"samples used {int(rows['samples']['used'])}, skipped {int(rows['samples']['skipped'])}")
    kept = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    name = args.name or str(args.export)
    kept = [row for row in kept if row.get("name") != name] + [{"name": name, "export": str(args.export), **rows}]
    record(RESULTS, {"holdout": args.holdout, "samples": args.samples, "max_tokens": args.max_tokens}, kept)


if __name__ == "__main__":
    main()
