#!/usr/bin/env python3
"""Sets backend ``auto``'s order for a GPU architecture from a kernel benchmark run.

    python scripts/auto_order.py results/<run>/kernels_cuda_nhwc.json [more.json ...]

For each dtype in the runs, the compiled backends (``cuda``, ``triton``; not the eager
baseline, not the reference) are ranked by the geometric mean of their median time over
every (op, shape, layout) that all of them measured without error; the order, those
means, the card, the date and the commit go into resnet_fused/auto_order.json under the
run's architecture (``cuda:sm_90`` for an H100 or an H200). Other entries are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER_FILE = ROOT / "resnet_fused" / "auto_order.json"
NOT_CONTENDERS = ("eager", "reference", "torch")  # torch: the same-size copy, a yardstick


def rank(rows: list[dict]) -> dict[str, dict]:
    """{dtype: {"order": [...], "geomean_ms": {...}, "cases": n}} from benchmark rows."""
    by_dtype: dict[str, dict[tuple, dict[str, float]]] = {}
    for r in rows:
        if "error" in r or r["backend"] in NOT_CONTENDERS or not r.get("median_ms"):
            continue
        case = (r["op"], r["shape"], r.get("layout"))
        by_dtype.setdefault(r["dtype"], {}).setdefault(case, {})[r["backend"]] = r["median_ms"]
    ranked = {}
    for dtype, cases in by_dtype.items():
        backends = sorted({b for times in cases.values() for b in times})
        common = [times for times in cases.values() if all(b in times for b in backends)]
        if len(backends) < 2 or not common:
            continue  # nothing to choose between
        geomean = {b: math.exp(sum(math.log(t[b]) for t in common) / len(common)) for b in backends}
        ranked[dtype] = {"order": sorted(backends, key=geomean.get),
                         "geomean_ms": {b: round(v, 6) for b, v in geomean.items()}, "cases": len(common)}
    return ranked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="benchmarks/kernels.py JSON files of one GPU")
    parser.add_argument("--out", type=Path, default=ORDER_FILE)
    args = parser.parse_args(argv)
    envs, rows = [], []
    for path in args.runs:
        data = json.loads(path.read_text())
        envs.append(data["environment"])
        rows += data["rows"]
    archs = {env.get("arch") for env in envs}
    if len(archs) != 1 or None in archs or not str(envs[0].get("device", "")).startswith("cuda"):
        parser.error(f"expected runs of one CUDA architecture (environment 'arch'), got {sorted(map(str, archs))}")
    ranked = rank(rows)
    if not ranked:
        parser.error("no dtype has two compiled backends measured on the same cases")
    env = envs[0]
    key = f"cuda:{env['arch']}"
    table = json.loads(args.out.read_text()) if args.out.exists() else {"measured": {}}
    table.setdefault("measured", {})[key] = {
        dtype: {**entry, "card": env.get("card"), "date": env.get("timestamp"), "commit": env.get("git_commit"),
                "torch": env.get("torch"), "triton": env.get("triton"),
                "source": ", ".join(str(p) for p in args.runs)}
        for dtype, entry in sorted(ranked.items())
    }
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    for dtype, entry in sorted(ranked.items()):
        means = ", ".join(f"{b} {entry['geomean_ms'][b]:.4f} ms" for b in entry["order"])
        print(f"{key} {dtype}: {' > '.join(entry['order'])} (geometric means over {entry['cases']} cases: {means})")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
