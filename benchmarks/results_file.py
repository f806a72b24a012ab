"""Recording a benchmark's table: the rows plus where and when they were measured, as JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def record(path: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write `settings`, the machine, Python version, date and `rows` to `path`, and say where."""
    payload = settings | {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path  # e.g. a GPU machine's $OUT
    print(f"\nrecorded in {shown}")
