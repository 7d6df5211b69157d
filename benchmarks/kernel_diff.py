"""Two kernel benchmark runs side by side: what a change (or a setting) moved, kernel by kernel.

    python benchmarks/kernel_diff.py BEFORE.json AFTER.json
    python benchmarks/kernel_diff.py before/kernels_cuda_nhwc.json after/kernels_cuda_nhwc.json --backends cuda,eager

Reads two JSON files of ``benchmarks/kernels.py`` and, for every row both measured (op,
shape, dtype, layout, backend), prints the op's median time in each and their ratio, then
each kernel of the row's breakdown (``kernels``: device time per call, profiler) the same
way; last, per (op, kernel, dtype, backend), the geometric mean of the ratios over the
shapes. A ratio below 1 means the second run was faster. The header says how the two runs
differ: card, commit, L2 flush, early launches, the ``RESNET_FUSED_*`` variables set, and
the configurations Triton's autotuner chose differently for a key both runs tuned. Rows
one run failed or skipped (no time) are listed, not compared; a row whose profile failed
is compared as a whole op.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

_ROW_KEY = ("op", "shape", "dtype", "layout", "backend")
# What the header compares: the run's conditions that can move a time.
_CONDITIONS = ("card", "driver", "torch", "triton", "git_commit", "source_sha1", "l2_flush", "early_launch",
               "copy_gbs", "resnet_fused_env")


def load(path: Path) -> tuple[dict, dict[tuple, dict]]:
    """(environment, rows by key) of a kernels.py JSON file."""
    data = json.loads(Path(path).read_text())
    rows = {tuple(row.get(k) for k in _ROW_KEY): row for row in data["rows"]}
    return data.get("environment", {}), rows


def _timed(row: dict) -> Optional[float]:
    ms = row.get("median_ms")
    return ms if isinstance(ms, (int, float)) and ms > 0 else None


def _breakdown(row: dict) -> dict[str, dict]:
    """A row's kernels by role; none where its profile failed (``{"error": ...}``)."""
    return {role: k for role, k in (row.get("kernels") or {}).items() if isinstance(k, dict)}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return b / a if a and b else None


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def compare(before: dict[tuple, dict], after: dict[tuple, dict], ops=None, backends=None,
            dtypes=None) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(lines, geometric means, unmatched): each line is (key, kernel or "op", before µs,
    after µs, ratio); each mean is ((op, kernel, dtype, backend), ratio, cases)."""
    lines, unmatched = [], []
    ratios: dict[tuple, list[float]] = defaultdict(list)
    for key in sorted(set(before) | set(after), key=lambda k: tuple(str(v) for v in k)):
        op, _, dtype, _, backend = key
        if (ops and op not in ops) or (backends and backend not in backends) or (dtypes and dtype not in dtypes):
            continue
        a, b = before.get(key), after.get(key)
        if a is None or b is None or _timed(a) is None or _timed(b) is None:
            unmatched.append((key, "before" if a is None or _timed(a) is None else "after"))
            continue
        a_us, b_us = _timed(a) * 1e3, _timed(b) * 1e3
        lines.append((key, "op", a_us, b_us, _ratio(a_us, b_us)))
        ratios[(op, "op", dtype, backend)].append(b_us / a_us)
        a_kernels, b_kernels = _breakdown(a), _breakdown(b)
        for kernel in a_kernels:
            if kernel not in b_kernels:
                continue
            ka, kb = a_kernels[kernel].get("us"), b_kernels[kernel].get("us")
            r = _ratio(ka, kb)
            lines.append((key, kernel, ka, kb, r))
            if r is not None:
                ratios[(op, kernel, dtype, backend)].append(r)
    means = [(group, math.exp(sum(map(math.log, rs)) / len(rs)), len(rs)) for group, rs in sorted(ratios.items())]
    return lines, means, unmatched


def header(env_a: dict, env_b: dict) -> str:
    differ = [f"  {k}: {env_a.get(k)!r} -> {env_b.get(k)!r}" for k in _CONDITIONS if env_a.get(k) != env_b.get(k)]
    differ += config_changes(env_a.get("triton_configs") or {}, env_b.get("triton_configs") or {})
    same = ", ".join(f"{k}={env_a.get(k)}" for k in ("card", "torch", "triton") if env_a.get(k) == env_b.get(k))
    return "\n".join([f"same: {same or '-'}", "differ:" if differ else "differ: nothing recorded", *differ])


def config_changes(before: dict, after: dict) -> list[str]:
    """The Triton autotuner's choices (``triton_configs``) that differ between two runs, per
    kernel and key both runs tuned: an autotune choice can move a time by itself."""
    def by_key(configs: dict) -> dict[tuple, dict]:
        return {(kernel, json.dumps(entry["key"])): entry["config"] for kernel, entries in configs.items()
                for entry in entries}

    a, b = by_key(before), by_key(after)
    return [f"  triton config {kernel} {key}: {a[kernel, key]} -> {b[kernel, key]}"
            for kernel, key in sorted(a.keys() & b.keys()) if a[kernel, key] != b[kernel, key]]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--ops", help="comma-separated ops to compare (default: all)")
    parser.add_argument("--backends", help="comma-separated backends (default: all)")
    parser.add_argument("--dtype", help="comma-separated dtypes, e.g. bfloat16 (default: all)")
    args = parser.parse_args(argv)

    def split(value):
        return {v.strip() for v in value.split(",") if v.strip()} if value else None

    env_a, before = load(args.before)
    env_b, after = load(args.after)
    lines, means, unmatched = compare(before, after, split(args.ops), split(args.backends), split(args.dtype))
    print(f"before: {args.before}\nafter:  {args.after}\n{header(env_a, env_b)}\n")
    print(f"{'op':<26} {'shape':<11} {'dtype':<9} {'layout':<14} {'backend':<8} {'kernel':<24} "
          f"{'before us':>10} {'after us':>10} {'after/before':>12}")
    for (op, shape, dtype, layout, backend), kernel, a, b, r in lines:
        name = "(whole op)" if kernel == "op" else kernel
        print(f"{op:<26} {shape:<11} {dtype:<9} {layout:<14} {backend:<8} {name:<24} "
              f"{_fmt(a, '10.1f')} {_fmt(b, '10.1f')} {_fmt(r, '12.3f')}")
    print("\ngeometric mean of after/before over the shapes:")
    for (op, kernel, dtype, backend), mean, cases in means:
        name = "(whole op)" if kernel == "op" else kernel
        print(f"  {op:<26} {name:<24} {dtype:<9} {backend:<8} {mean:6.3f}  ({cases} shapes)")
    for key, missing in unmatched:
        print(f"not compared: {'/'.join(str(v) for v in key)} (no time in the {missing} run)")
    if not lines:
        print("kernel_diff: the two runs have no timed row in common", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
