"""Small PNG plots logged as stage artifacts (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def bar_chart(counts: Mapping[str, float], title: str, path: Path) -> Path:
    """A horizontal bar chart of named counts, largest at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(counts.items(), key=lambda kv: kv[1])
    figure, axes = plt.subplots(figsize=(6, 0.4 * max(3, len(items)) + 1))
    axes.barh([k for k, _ in items], [v for _, v in items], color="#4c72b0")
    for index, (_, value) in enumerate(items):
        axes.text(value, index, f" {value:g}", va="center", fontsize=8)
    axes.set_title(title)
    axes.set_xlabel("rows")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
