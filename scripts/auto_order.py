#!/usr/bin/env python3
"""Sets backend ``auto``'s order for a GPU architecture from benchmark runs.

    python scripts/auto_order.py results/<run>/kernels_cuda_nhwc.json [more.json ...] \\
        [--blocks results/<run>/results.json]

Two measures, each a geometric mean over the cases every compiled backend (``cuda``,
``triton``; not the eager baseline, not the reference) measured without error:

- the kernels' time (``benchmarks/kernels.py``, per dtype): each op's CUDA-graph replay,
  device time alone;
- with ``--blocks``, the blocks' time (``benchmarks/run.py``'s ``results.json``): the
  fused blocks' and ResNet-50's steps by the clock, each backend of the kernels' measure as
  provider ``fused-<backend>``, over every workload, mode, shape and dtype of the run that
  they all measured (none is an error). This is what
  a user waits for: the host's time per launch counts there, and it differs between the
  backends far more than their kernels do (third GPU run: Triton's kernels within 2% of
  CUDA C++'s, its Bottleneck training steps 0.54x eager by the clock to CUDA C++'s
  1.16x). The host's share does not depend on the dtype, so the blocks' measure, of
  whichever dtypes the suite ran, applies to every dtype.

The order starts from ``resnet_fused.backends.AUTO_ORDER`` (CUDA C++ first: the shorter
host path) and a backend moves ahead of another only where it is faster by more than
``--margin`` (default 2%) in every measure given. The margin is a policy, not a noise
bound: the same eager code's geometric means moved by 0.05% between the second and third
GPU runs (single rows by up to 1.4%; the blocks' run-to-run spread is unmeasured), and a
near-tie keeps the default, whose host path is the shorter. The order, the means, the
margin, the card, the date and the commit go into resnet_fused/auto_order.json under the
run's architecture (``cuda:sm_90`` for an H100 or an H200). Other entries are kept.
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
ABOUT = ("The order in which backend 'auto' tries the compiled backends, per device (cuda:sm_XY) and dtype: "
         "resnet_fused.backends.AUTO_ORDER's, but where a backend is faster than one before it by more than the "
         "margin in its kernels' device time (benchmarks/kernels.py) and, where the entry has blocks_*, in whole "
         "fused blocks by the clock, host time included (benchmarks/run.py). Written by scripts/auto_order.py; "
         "never by hand. A device or dtype absent here takes AUTO_ORDER's default.")


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


def block_times(rows: list[dict], backends: set[str]) -> tuple[dict[str, float], int, list[str]]:
    """({backend: geometric mean ms}, cases, dtypes) of ``backends``' fused providers in a
    suite run, over the cases all of them measured."""
    cases: dict[tuple, dict[str, float]] = {}
    for r in rows:
        backend = r.get("provider", "").removeprefix(BLOCK_PROVIDER_PREFIX)
        if r.get("provider") != BLOCK_PROVIDER_PREFIX + backend or backend not in backends or not r.get("median_ms"):
            continue
        case = (r["workload"], r["mode"], r["shape"], r["dtype"], r.get("layout"))
        cases.setdefault(case, {})[backend] = r["median_ms"]
    common = {case: times for case, times in cases.items() if set(times) == backends}
    means, count = geometric_means(common)
    return means, count, sorted({case[3] for case in common})


def order(measures: list[dict[str, float]], margin: float) -> list[str]:
    """The backends of ``measures[0]`` in AUTO_ORDER's order, but each placed ahead of those
    before it that it is faster than by more than ``margin`` in every measure."""

    def clearly_faster(a: str, b: str) -> bool:
        return all(m[a] < (1 - margin) * m[b] for m in measures)

    default = AUTO_ORDER["cuda"]
    ranked: list[str] = []
    for backend in sorted(measures[0], key=lambda b: default.index(b) if b in default else len(default)):
        place = len(ranked)
        while place > 0 and clearly_faster(backend, ranked[place - 1]):
            place -= 1
        ranked.insert(place, backend)
    return ranked


def rank(rows: list[dict], block_rows: Optional[list[dict]] = None, margin: float = DEFAULT_MARGIN) -> dict[str, dict]:
    """{dtype: {"order": [...], "geomean_ms": {...}, "cases": n[, "blocks_geomean_ms",
    "blocks_cases", "blocks_dtypes"], "margin": margin}} from kernel benchmark rows and,
    optionally, a suite run's rows (SystemExit where those time no case of every backend)."""
    ranked = {}
    for dtype, (kernels, cases) in kernel_times(rows).items():
        entry = {"geomean_ms": {b: round(v, 6) for b, v in kernels.items()}, "cases": cases}
        measures = [kernels]
        if block_rows is not None:
            blocks, block_cases, block_dtypes = block_times(block_rows, set(kernels))
            if not blocks:
                raise SystemExit(f"auto_order: the suite run timed no case of every one of {sorted(kernels)}'s "
                                 "fused blocks (provider fused-<backend>): nothing to weigh the kernels against")
            measures.append(blocks)
            entry.update(blocks_geomean_ms={b: round(v, 4) for b, v in blocks.items()}, blocks_cases=block_cases,
                         blocks_dtypes=block_dtypes)
        ranked[dtype] = {"order": order(measures, margin), **entry, "margin": margin}
    return ranked


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"auto_order: cannot read {path} as a benchmark run: {error}") from None
    if not isinstance(data, dict) or "rows" not in data or "environment" not in data:
        raise SystemExit(f"auto_order: {path} is not a benchmark run (expected 'environment' and 'rows')")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="benchmarks/kernels.py JSON files of one GPU")
    parser.add_argument("--blocks", type=Path, help="the same GPU's suite run (benchmarks/run.py results.json)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help=f"how much faster a backend must be to move ahead (default {DEFAULT_MARGIN})")
    parser.add_argument("--out", type=Path, default=ORDER_FILE,
                        help=f"where to write the order (default {ORDER_FILE.relative_to(ORDER_FILE.parents[1])}: the package's own)")
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
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    table = {"about": ABOUT, "measured": table.get("measured", {})}
    table["measured"][key] = {
        dtype: {**entry, "card": env.get("card"), "date": env.get("timestamp"), "commit": env.get("git_commit"),
                "torch": env.get("torch"), "triton": env.get("triton"), "source": ", ".join(sources)}
        for dtype, entry in sorted(ranked.items())
    }
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    for dtype, entry in sorted(ranked.items()):
        means = ", ".join(f"{b} {entry['geomean_ms'][b]:.4f} ms" for b in entry["order"])
        blocks = entry.get("blocks_geomean_ms")
        block_means = (f"; blocks over {entry['blocks_cases']} {'/'.join(entry['blocks_dtypes'])} cases: "
                       + ", ".join(f"{b} {blocks[b]:.3f} ms" for b in entry["order"] if b in blocks)) if blocks else ""
        print(f"{key} {dtype}: {' > '.join(entry['order'])} (kernels over {entry['cases']} cases: {means}"
              f"{block_means}; margin {entry['margin']:.0%})")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
