"""Each kernel's time split into a streaming rate and a fixed cost, from a kernel benchmark run.

    python benchmarks/kernel_fit.py results/nvidia-h200-2026-11-27/kernels/kernels_cuda_nhwc.json

For every kernel of the run's breakdowns (``kernels`` in each row of
``benchmarks/kernels.py``'s JSON) and for the same-size copies, fits
``time = F + bytes / R`` by least squares over the shapes whose activation (one tensor)
is at least ``--min-tensor-mb`` (default 100 MB, well above an H100's or H200's 50-60 MB
L2: below it a kernel's whole output can stay in L2 when it ends, unwritten, and the
point leaves the line). ``R`` is the rate the kernel streams at
once under way, ``F`` what it costs whatever the size: its ramp and tail, a finalize's
round trips, and, after a write flush (``--l2-flush`` in benchmarks/kernels.py), the
dirty lines the flush leaves it to write back. Two shapes at least per fit; with exactly two
the line goes through both.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional


@dataclass(frozen=True)
class Fit:
    op: str
    dtype: str
    backend: str
    kernel: str  # a kernel role, or "op" for the copy rows (their whole-op time)
    shapes: tuple[str, ...]
    rate_tbs: float  # R, TB/s
    fixed_us: float  # F, µs
    pct_copy: float  # R against the run's copy bandwidth


_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def tensor_mb(row: dict) -> float:
    """MB of one activation of the row's shape and dtype."""
    return row["n"] * row["c"] * row["h"] * row["w"] * _ELEMENT_BYTES[row["dtype"]] / 1e6


def _points(rows: Iterable[dict], copy_gbs: float,
            min_tensor_mb: float) -> dict[tuple, list[tuple[str, float, float]]]:
    """(op, dtype, backend, kernel) -> [(shape, MB moved, µs)] from a run's rows whose
    activation is at least min_tensor_mb."""
    points: dict[tuple, list[tuple[str, float, float]]] = {}
    for row in rows:
        if "error" in row or tensor_mb(row) < min_tensor_mb:
            continue
        if row["op"] == "copy":
            points.setdefault(("copy", row["dtype"], row["backend"], "op"), []).append(
                (row["shape"], row["bytes"] / 1e6, row["median_ms"] * 1e3))
            continue
        for kernel, entry in (row.get("kernels") or {}).items():
            if kernel == "error" or "pct_copy" not in entry:
                continue  # a finalize: no streaming traffic to fit
            megabytes = entry["pct_copy"] / 100 * copy_gbs * entry["us"] / 1e3  # what its share of copy moved
            points.setdefault((row["op"], row["dtype"], row["backend"], kernel), []).append(
                (row["shape"], megabytes, entry["us"]))
    return points


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(F, R) of time = F + bytes / R, least squares over (MB, µs) points; R in TB/s."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx  # µs per MB
    return mean_y - slope * mean_x, 1 / slope  # MB per µs = TB/s


def fits(run: dict, min_tensor_mb: float = 100.0) -> list[Fit]:
    """One Fit per kernel measured at two sizes or more of at least min_tensor_mb."""
    copy_gbs = run["environment"]["copy_gbs"]
    out = []
    for (op, dtype, backend, kernel), points in sorted(_points(run["rows"], copy_gbs, min_tensor_mb).items()):
        if len({mb for _, mb, _ in points}) < 2:
            continue
        fixed, rate = fit_line([(mb, us) for _, mb, us in points])
        out.append(Fit(op, dtype, backend, kernel, tuple(s for s, _, _ in points), rate, fixed,
                       100 * rate * 1e3 / copy_gbs))
    return out


def format_fits(rows: list[Fit], copy_gbs: float) -> str:
    header = f"{'op':<26} {'kernel':<21} {'dtype':<9} {'backend':<7} {'R TB/s':>7} {'% copy':>6} {'F us':>6}  shapes"
    lines = [f"time = F + bytes / R per kernel (copy bandwidth {copy_gbs:.0f} GB/s)", header, "-" * len(header)]
    for f in rows:
        lines.append(f"{f.op:<26} {f.kernel:<21} {f.dtype:<9} {f.backend:<7} {f.rate_tbs:>7.2f} {f.pct_copy:>6.0f} "
                     f"{f.fixed_us:>6.1f}  {', '.join(f.shapes)}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a kernels_cuda_*.json written by benchmarks/kernels.py")
    parser.add_argument("--min-tensor-mb", type=float, default=100.0,
                        help="least size of one activation of a shape in a fit (MB)")
    args = parser.parse_args(argv)
    run = json.loads(args.run.read_text())
    rows = fits(run, args.min_tensor_mb)
    if not rows:
        print(f"no kernel of {args.run} was measured at two shapes with activations of {args.min_tensor_mb:g} MB "
              "or more", file=sys.stderr)
        return 1
    print(format_fits(rows, run["environment"]["copy_gbs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
