"""One audit across many workers: collect the three measurements into ``benchmarks/results/scale.json``.

Each figure is measured by its own benchmark, which compares its configurations within one run:
- ``extract_speed.py --replicas 1,2``: extraction tokens/s of the extract stage with 1 and 2 replicas per model;
- ``scale_training.py``: training tokens/s (mean over a whole run) with 1 and 2 data-parallel workers;
- ``paper_scale.py``: the memory per GPU, stored bytes per token and the GPUs → hours table of a paper-scale audit.

This script reads their results, prints one table with the ratios to one replica / one worker, and writes
``scale.json``. Run the three first, then: ``python benchmarks/scale.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = {
    "extraction_tokens_per_s": ("extract_speed.json", "python benchmarks/extract_speed.py --replicas 1,2"),
    "training_tokens_per_s": ("scale_training.json", "python benchmarks/scale_training.py"),
    "paper_scale": ("paper_scale.json", "python benchmarks/paper_scale.py"),
}


def collect(results: Path = RESULTS) -> dict[str, Any]:
    """The three measurements, each with the file it came from; a missing one names the command that makes it."""
    out: dict[str, Any] = {}
    for key, (name, command) in SOURCES.items():
        path = results / name
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SystemExit(f"{path} is missing: run `{command}` first") from None
        if key not in data:
            raise SystemExit(f"{path} has no '{key}': run `{command}` again (it writes that key)")
        out[key] = data[key]
        out.setdefault("sources", {})[key] = name
    return out


def table(scale: dict[str, Any]) -> list[str]:
    """Rows: what, count, tokens/s, ratio to one."""
    rows = [f"{'measure':<24} {'n':>3} {'tokens/s':>10} {'vs 1':>6}"]
    for key, label in (("extraction_tokens_per_s", "extraction (replicas)"),
                       ("training_tokens_per_s", "training (workers)")):  # fmt: skip
        figures = scale[key]
        for n, value in sorted(figures.items(), key=lambda kv: int(kv[0])):
            rows.append(f"{label:<24} {n:>3} {value:>10.0f} {value / figures['1']:>5.2f}x")
    rows.append(f"\n{'GPUs':>5} {'extraction h':>13} {'training h':>11}")
    for row in scale["paper_scale"]["hours"]:
        rows.append(f"{row['gpus']:>5} {row['extraction_h']:>13.1f} {row['training_h']:>11.1f}")
    return rows


def main() -> int:
    scale = collect()
    print("\n".join(table(scale)))
    print("\n2 CPU cores show equality and bookkeeping, not speed-up (RESULTS.md, 'One audit across many workers').")
    path = RESULTS / "scale.json"
    path.write_text(json.dumps(scale, indent=2) + "\n")
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
