"""Sums up a margin log of the tests (``RESNET_FUSED_MARGIN_LOG``, tests/helpers.py): per test
function, dtype and compared quantity, how many comparisons, the worst error as a fraction
of what its tolerance allows (1 fails) and the case it came from, worst first.

    python scripts/margins.py margins.tsv [--top 40]

scripts/gpu_check.sh writes the log of the CUDA-marked tests and this summary beside it: a
tolerance that only a GPU run checks is tightened or loosened from what it shows, not from
a guess.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path


_DTYPE = re.compile(r"\b(float64|float32|float16|bfloat16)\b")


def _group(test: str, what: str) -> tuple[str, str, str]:
    """(test function, dtype, quantity): the other parameters (shapes, layouts, ops)
    dropped, so the cases a tolerance covers are one row; each dtype has its own."""
    function, _, parameters = test.partition("[")
    dtype = _DTYPE.search(parameters)
    return function, dtype.group(1) if dtype else "-", what


def summarize(lines: list[str], top: int) -> str:
    worst: dict[tuple[str, str, str], tuple[float, str]] = {}
    counts: defaultdict[tuple[str, str, str], int] = defaultdict(int)
    malformed = 0
    for line in lines:
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 3:
            malformed += 1
            continue
        fraction, test, what = float(parts[0]), parts[1], parts[2]
        if fraction != fraction:  # NaN: a failed comparison
            fraction = float("inf")
        key = _group(test, what)
        counts[key] += 1
        if key not in worst or fraction > worst[key][0]:
            worst[key] = (fraction, test)
    rows = sorted(worst.items(), key=lambda item: -item[1][0])
    total = sum(counts.values())
    over_half = sum(1 for fraction, _ in worst.values() if fraction > 0.5)
    out = [f"{total} comparisons in {len(worst)} groups, {over_half} of them with a worst case above half "
           f"their tolerance" + (f"; {malformed} malformed lines" if malformed else ""),
           f"{'worst':>9}  {'n':>5}  test function :: dtype :: quantity  (worst case)"]
    for (function, dtype, what), (fraction, test) in rows[:top]:
        case = test[len(function):] or "-"
        out.append(f"{fraction:9.3g}  {counts[function, dtype, what]:5d}  {function} :: {dtype} :: {what}  {case}")
    if len(rows) > top:
        out.append(f"(+{len(rows) - top} groups, all below {rows[top - 1][1][0]:.3g})")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the file RESNET_FUSED_MARGIN_LOG named")
    parser.add_argument("--top", type=int, default=40, help="groups to list (default 40)")
    args = parser.parse_args()
    print(summarize(args.log.read_text().splitlines(), args.top))


if __name__ == "__main__":
    main()
