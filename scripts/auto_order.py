#!/usr/bin/env python3
"""Sets backend ``auto``'s order for a GPU architecture from benchmark runs.

    python scripts/auto_order.py results/<run>/kernels_cuda_nhwc.json [more.json ...] \\
        [--blocks results/<run>/results.json]

Two measures, each a geometric mean over the cases every compiled backend (``cuda``,
``triton``; not the eager baseline, not the reference) measured without error:

- the kernels' time (``benchmarks/kernels.py``, per dtype): each op's CUDA-graph replay,
  device time alone;
- with ``--blocks``, the blocks' time (``benchmarks/run.py``'s ``results.json``): the
  fused blocks' and ResNet-50's steps by the clock, each backend as provider
  ``fused-<backend>``, over every workload, mode, shape and dtype of the run. This is what
  a user waits for: the host's time per launch counts there, and it differs between the
  backends far more than their kernels do (third GPU run: Triton's kernels within 2% of
  CUDA C++'s, its Bottleneck training steps 0.54x eager by the clock to CUDA C++'s
  1.16x). The host's share does not depend on the dtype, so the blocks' measure, of
  whichever dtypes the suite ran, applies to every dtype.

The order starts from ``resnet_fused.backends.AUTO_ORDER`` (CUDA C++ first: the shorter
host path) and a backend moves ahead of another only where it is faster by more than
``--margin`` (default 2%) in every measure given: the same eager code's rows moved by up
to 1.4% between the second and third GPU runs (``benchmarks/kernel_diff.py``), so a
smaller difference keeps the default. The order, the means, the margin, the card, the date
and the commit go into resnet_fused/auto_order.json under the run's architecture
(``cuda:sm_90`` for an H100 or an H200). Other entries are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from resnet_fused.backends import AUTO_ORDER  # noqa: E402

ORDER_FILE = ROOT / "resnet_fused" / "auto_order.json"
NOT_CONTENDERS = ("eager", "reference", "torch")  # torch: the same-size copy, a yardstick
BLOCK_PROVIDER_PREFIX = "fused-"  # the suite's provider of a backend's fused blocks
DEFAULT_MARGIN = 0.02


def geometric_means(cases: dict[tuple, dict[str, float]]) -> tuple[dict[str, float], int]:
    """({backend: geometric mean}, cases) over the cases every backend measured."""
    backends = sorted({b for times in cases.values() for b in times})
    common = [times for times in cases.values() if all(b in times for b in backends)]
    if len(backends) < 2 or not common:
        return {}, 0  # nothing to choose between
    return {b: math.exp(sum(math.log(t[b]) for t in common) / len(common)) for b in backends}, len(common)


def kernel_times(rows: list[dict]) -> dict[str, tuple[dict[str, float], int]]:
    """{dtype: ({backend: geometric mean ms}, cases)} from kernel benchmark rows."""
    by_dtype: dict[str, dict[tuple, dict[str, float]]] = {}
    for r in rows:
        if "error" in r or r["backend"] in NOT_CONTENDERS or not r.get("median_ms"):
            continue
        case = (r["op"], r["shape"], r.get("layout"))
        by_dtype.setdefault(r["dtype"], {}).setdefault(case, {})[r["backend"]] = r["median_ms"]
    return {dtype: means for dtype, cases in by_dtype.items() if (means := geometric_means(cases))[0]}


def block_times(rows: list[dict]) -> tuple[dict[str, float], int]:
    """({backend: geometric mean ms}, cases) of the fused providers' rows of a suite run."""
    cases: dict[tuple, dict[str, float]] = {}
    for r in rows:
        provider = r.get("provider", "")
        backend = provider.removeprefix(BLOCK_PROVIDER_PREFIX)
        if not provider.startswith(BLOCK_PROVIDER_PREFIX) or backend in NOT_CONTENDERS or not r.get("median_ms"):
            continue
        case = (r["workload"], r["mode"], r["shape"], r["dtype"], r.get("layout"))
        cases.setdefault(case, {})[backend] = r["median_ms"]
    return geometric_means(cases)


def order(measures: list[dict[str, float]], margin: float) -> list[str]:
    """The backends of ``measures[0]`` in AUTO_ORDER's order but where one is faster than the
    one before it by more than ``margin`` in every measure that has both."""

    def clearly_faster(a: str, b: str) -> bool:
        return all(m[a] < (1 - margin) * m[b] for m in measures if a in m and b in m)

    default = AUTO_ORDER["cuda"]
    ranked = sorted(measures[0], key=lambda b: default.index(b) if b in default else len(default))
    swapped = True
    while swapped:  # terminates: a swap always puts the lower time of measures[0] first
        swapped = False
        for i in range(len(ranked) - 1):
            if clearly_faster(ranked[i + 1], ranked[i]):
                ranked[i], ranked[i + 1] = ranked[i + 1], ranked[i]
                swapped = True
    return ranked


def rank(rows: list[dict], block_rows: Optional[list[dict]] = None, margin: float = DEFAULT_MARGIN) -> dict[str, dict]:
    """{dtype: {"order": [...], "geomean_ms": {...}, "cases": n[, "blocks_geomean_ms", "blocks_cases"],
    "margin": margin}} from kernel benchmark rows and, optionally, a suite run's rows."""
    blocks, block_cases = block_times(block_rows) if block_rows else ({}, 0)
    ranked = {}
    for dtype, (kernels, cases) in kernel_times(rows).items():
        entry = {"order": order([kernels, blocks], margin),
                 "geomean_ms": {b: round(v, 6) for b, v in kernels.items()}, "cases": cases}
        if blocks:
            entry.update(blocks_geomean_ms={b: round(v, 4) for b, v in blocks.items()}, blocks_cases=block_cases)
        ranked[dtype] = {**entry, "margin": margin}
    return ranked


def _read(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "rows" not in data or "environment" not in data:
        raise SystemExit(f"auto_order: {path} is not a benchmark run (expected 'environment' and 'rows')")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="benchmarks/kernels.py JSON files of one GPU")
    parser.add_argument("--blocks", type=Path, help="the same GPU's suite run (benchmarks/run.py results.json)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help=f"how much faster a backend must be to move ahead (default {DEFAULT_MARGIN})")
    parser.add_argument("--out", type=Path, default=ORDER_FILE)
    args = parser.parse_args(argv)
    if not 0 <= args.margin < 1:
        parser.error(f"--margin is a fraction in [0, 1), got {args.margin}")
    envs, rows = [], []
    for path in args.runs:
        data = _read(path)
        envs.append(data["environment"])
        rows += data["rows"]
    archs = {env.get("arch") for env in envs}
    if len(archs) != 1 or None in archs or not str(envs[0].get("device", "")).startswith("cuda"):
        parser.error(f"expected runs of one CUDA architecture (environment 'arch'), got {sorted(map(str, archs))}")
    block_rows = None
    if args.blocks:
        suite = _read(args.blocks)
        if suite["environment"].get("card") != envs[0].get("card"):
            parser.error(f"--blocks ran on {suite['environment'].get('card')!r}, the kernels on {envs[0].get('card')!r}")
        block_rows = suite["rows"]
    ranked = rank(rows, block_rows, args.margin)
    if not ranked:
        parser.error("no dtype has two compiled backends measured on the same cases")
    env = envs[0]
    key = f"cuda:{env['arch']}"
    sources = [str(p) for p in args.runs] + ([str(args.blocks)] if args.blocks else [])
    table = json.loads(args.out.read_text()) if args.out.exists() else {"measured": {}}
    table.setdefault("measured", {})[key] = {
        dtype: {**entry, "card": env.get("card"), "date": env.get("timestamp"), "commit": env.get("git_commit"),
                "torch": env.get("torch"), "triton": env.get("triton"), "source": ", ".join(sources)}
        for dtype, entry in sorted(ranked.items())
    }
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    for dtype, entry in sorted(ranked.items()):
        means = ", ".join(f"{b} {entry['geomean_ms'][b]:.4f} ms" for b in entry["order"])
        blocks = entry.get("blocks_geomean_ms")
        block_means = (f"; blocks over {entry['blocks_cases']} cases: "
                       + ", ".join(f"{b} {blocks[b]:.3f} ms" for b in entry["order"] if b in blocks)) if blocks else ""
        print(f"{key} {dtype}: {' > '.join(entry['order'])} (kernels over {entry['cases']} cases: {means}"
              f"{block_means}; margin {entry['margin']:.0%})")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
