"""The full recipe's size on paper: parameter counts of a profile's model (built on the meta device:
no memory, seconds), GPU hours per VLM stage at the paper's token counts (stage 0: 16B, stage 1: 3T,
stage 2: 240B) from the public MFU anchors, and data throughput per CPU node of cluster/raycluster.yaml
from benchmarks/cpu_path.py's measured per-core rate.

    .venv/bin/python benchmarks/scale_on_paper.py [--profile paper] [--cores-per-node 16]

Prints the tables and records them in benchmarks/results/scale_on_paper.json. The FLOP model and its
assumptions are in components/vlm/sizing.py (attention's sequence term is left out: lower bounds)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from results_file import record

from components.schema import load_config
from components.vlm.sizing import H100_BF16_PEAK_FLOPS, PAPER_STAGES, count_parameters, stage_table

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "scale_on_paper.json"
CPU_PATH = REPO / "benchmarks" / "results" / "cpu_path.json"
CPU_ROW = "pipeline UDFs (two decodes)"  # the pipeline's own step functions in order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--cores-per-node", type=int, default=16, help="CPUs of a cpu worker in cluster/raycluster.yaml")
    args = parser.parse_args()

    config, _ = load_config(args.profile)
    counts = count_parameters(config)
    print(f"Profile {args.profile!r}, built on the meta device:\n{counts.table()}\n")

    rows = stage_table(counts)
    print(f"| stage | tokens | visual share | PFLOP | H100 GPU hours at {PAPER_STAGES[0].mfu[1]:.0%}..{PAPER_STAGES[0].mfu[0]:.0%} MFU "
          "(stage 2: 35..25 %) | days on 1,024 GPUs |")
    print("|---|---:|---:|---:|---:|---:|")
    for row, stage in zip(rows, PAPER_STAGES):
        low, high = row["gpu_hours_at_high_mfu"], row["gpu_hours_at_low_mfu"]
        print(f"| {row['stage']} | {row['tokens']:.3g} | {stage.visual_share:.1f} | {row['flops'] / 1e15:,.0f} | "
              f"{low:,.0f} .. {high:,.0f} | {low / 1024 / 24:.1f} .. {high / 1024 / 24:.1f} |")

    cpu = json.loads(CPU_PATH.read_text())
    per_core = next(r["images_per_s_per_core"] for r in cpu["rows"] if r["row"] == CPU_ROW)
    per_node = per_core * args.cores_per_node
    print(f"\nData path, {CPU_ROW}: {per_core:,.0f} images/s per core ({cpu['date']}, {cpu['machine']}) -> "
          f"{per_node:,.0f} images/s per {args.cores_per_node}-core node if it scales with cores, "
          f"{per_node * 86400 / 1e6:,.0f}M images a day")
    record(RESULTS, {"profile": args.profile, "peak_flops": H100_BF16_PEAK_FLOPS, "cores_per_node": args.cores_per_node},
           [{"parameters": counts.__dict__ | {"total": counts.total, "active": counts.active}},
            *rows, {"data_images_per_s_per_core": per_core, "data_images_per_s_per_node": per_node}])


if __name__ == "__main__":
    main()
