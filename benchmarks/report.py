"""Output of a run: speedups, console and Markdown tables, JSON + CSV rows, PNG charts.

``publish`` lays a run out for the repository: ``<root>/<card>-<date>/`` holds its
files and ``<root>/LATEST.md`` (linked from the README) shows its chart and tables.
Every file here is written by the tool; none is edited by hand. After a change to the
tables or charts, a run's files are rendered again from its measurements:

    python -m benchmarks.report results/<card>-<date> [--latest results]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Optional

from . import common, metrics
from .providers import BASELINES, NAMES
from .workloads import MODES

WORKLOAD_ORDER = ("bottleneck", "basicblock", "resnet50")
MODE_TITLES = {
    "train": "training step (forward + backward)",
    "fwd_train": "forward in training mode",
    "infer": "inference",
}
# The task fields that identify a row (then the metrics, then the environment).
KEY_FIELDS = ("workload", "shape", "batch", "channels", "width", "hw", "mode", "provider", "dtype", "layout", "status")
METRIC_FIELDS = (
    "median_ms", "p20_ms", "p80_ms", "spread_pct", "images_per_s", "speedup_vs_eager", "speedup_vs_compile",
    "kernel_speedup_vs_eager",
    "gflop", "tflops", "pct_of_matmul_peak", "saved_for_backward_mb", "peak_mem_mb", "profiled_ms",
    "conv_pct", "bn_pct", "eltwise_pct", "other_pct", "compile_s", "rel_err_vs_eager", "eager_rel_err_vs_fp32",
)


def _group_key(row: dict) -> tuple:
    return row["workload"], row["shape"], row["mode"], row["dtype"], row["layout"]


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_<baseline>`` = baseline median / row median, same workload, shape,
    mode, dtype and layout, measured in this run."""
    baselines = {
        (_group_key(r), r["provider"]): r["median_ms"]
        for r in rows
        if r.get("provider") in BASELINES and r.get("status") == "ok"
    }
    eager_kernels = {
        _group_key(r): r["profiled_ms"]
        for r in rows
        if r.get("provider") == "eager" and r.get("status") == "ok" and r.get("profiled_ms")
    }
    for row in rows:
        if row.get("status") != "ok" or row["workload"] == "kernels":
            continue
        for baseline in BASELINES:
            ms = baselines.get((_group_key(row), baseline))
            if ms is not None:
                row[f"speedup_vs_{baseline}"] = ms / row["median_ms"]
        # The same by the kernels' own time: what the step would gain where the host did not bound it.
        kernels_ms = eager_kernels.get(_group_key(row))
        if kernels_ms and row.get("profiled_ms"):
            row["kernel_speedup_vs_eager"] = kernels_ms / row["profiled_ms"]


# ---------------------------------------------------------------- tables


TEXT_COLUMNS = ("status", "conv/bn/elt/other %")


@dataclasses.dataclass
class Table:
    title: str
    header: list[str]
    body: list[list[str]]
    notes: list[str] = dataclasses.field(default_factory=list)

    def text(self) -> str:
        widths = [max(len(r[i]) for r in [self.header, *self.body]) for i in range(len(self.header))]

        def line(cells):
            return "  ".join(c.ljust(w) if left else c.rjust(w) for c, w, left in zip(cells, widths, self._left())).rstrip()

        lines = [self.title, line(self.header), "  ".join("-" * w for w in widths), *map(line, self.body)]
        return "\n".join([*lines, *self.notes])

    def _left(self) -> list[bool]:
        """Text columns align left, numbers right."""
        return [i < 2 or name in TEXT_COLUMNS for i, name in enumerate(self.header)]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" if left else "---:" for left in self._left()) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.body]
        return "\n".join([*lines, *([""] + self.notes if self.notes else [])])


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _num(value) -> str:
    """Three significant digits or more: 1234, 123, 12.3, 1.23, 0.0123."""
    if value is None:
        return ""
    return format(value, ",.0f" if abs(value) >= 100 else ".1f" if abs(value) >= 10 else ".3g")


# (header, how a row shows it); a column empty in every row of a table is left out.
COLUMNS = (
    ("shape", lambda r: r["shape"]),
    ("provider", lambda r: r["provider"]),
    ("ms", lambda r: _fmt(r.get("median_ms"), ".3f")),
    ("±%", lambda r: _fmt(r.get("spread_pct") and r["spread_pct"] / 2, ".0f")),
    ("img/s", lambda r: _fmt(r.get("images_per_s"), ",.0f")),
    ("×eager", lambda r: _fmt(r.get("speedup_vs_eager"), ".2f")),
    ("×compile", lambda r: _fmt(r.get("speedup_vs_compile"), ".2f")),
    ("kernel ms", lambda r: _fmt(r.get("profiled_ms"), ".3f")),
    ("×eager kernels", lambda r: _fmt(r.get("kernel_speedup_vs_eager"), ".2f")),
    ("TFLOP/s", lambda r: _num(r.get("tflops"))),
    ("% mm peak", lambda r: _fmt(r.get("pct_of_matmul_peak"), ".0f")),
    ("saved MB", lambda r: _num(r.get("saved_for_backward_mb"))),
    ("peak MB", lambda r: _num(r.get("peak_mem_mb"))),
    ("conv/bn/elt/other %", lambda r: "/".join(_fmt(r.get(f"{c}_pct"), ".0f") for c in ("conv", "bn", "eltwise", "other"))
     if r.get("conv_pct") is not None else ""),
    ("compile s", lambda r: _fmt(r.get("compile_s"), ".1f")),
    ("rel err", lambda r: _fmt(r.get("rel_err_vs_eager"), ".1e")),
    ("eager err", lambda r: _fmt(r.get("eager_rel_err_vs_fp32"), ".1e")),
    ("status", lambda r: "" if r["status"] == "ok" else r["status"]),
)


def _geomean(values: list[float]) -> Optional[float]:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _ordered(values, order) -> list:
    present = set(values)
    return [v for v in order if v in present] + sorted(present - set(order), key=str)


def tables(rows: list[dict], env: dict) -> list[Table]:
    """The summary (geometric-mean speedups), one table per workload and mode, and the
    L1 kernels' rows as benchmarks.kernels returned them."""
    out = []
    blocks = [r for r in rows if r["workload"] != "kernels"]
    unavailable = {r["provider"]: r["status"] for r in blocks if r["status"].startswith("unavailable")}
    shown = [r for r in blocks if not r["status"].startswith("unavailable")]
    for dtype, layout in _ordered({(r["dtype"], r["layout"]) for r in shown}, []):
        subset = [r for r in shown if (r["dtype"], r["layout"]) == (dtype, layout)]
        out.append(_summary(subset, f"Summary, {dtype}, {layout}: geometric-mean speedup over the shapes, "
                                    f"vs eager / vs torch.compile (by the kernels' time, vs eager)", unavailable))
        for workload in _ordered({r["workload"] for r in subset}, WORKLOAD_ORDER):
            for mode in _ordered({r["mode"] for r in subset if r["workload"] == workload}, MODES):
                group = [r for r in subset if (r["workload"], r["mode"]) == (workload, mode)]
                batch = group[0]["batch"]
                title = f"{workload}, {MODE_TITLES[mode]}, {dtype}, {layout}, N={batch}"
                out.append(_detail(group, title))
    kernels = [r for r in rows if r["workload"] == "kernels"]
    if kernels:
        out.append(_kernels(kernels, set(env)))
    return out


def _summary(rows: list[dict], title: str, unavailable: dict) -> Table:
    provider_names = _ordered({r["provider"] for r in rows} - {"eager"}, NAMES)
    body = []
    for workload in _ordered({r["workload"] for r in rows}, WORKLOAD_ORDER):
        for mode in _ordered({r["mode"] for r in rows if r["workload"] == workload}, MODES):
            cells = []
            for p in provider_names:
                ok = [r for r in rows if (r["workload"], r["mode"], r["provider"], r["status"]) == (workload, mode, p, "ok")]
                parts = [_geomean([r[f"speedup_vs_{b}"] for r in ok if f"speedup_vs_{b}" in r]) for b in BASELINES]
                kernels = _geomean([r["kernel_speedup_vs_eager"] for r in ok if "kernel_speedup_vs_eager" in r])
                cell = " / ".join("–" if v is None else f"{v:.2f}" for v in parts)
                cells.append((cell + ("" if kernels is None else f" ({kernels:.2f})")) if ok else "")
            if any(cells):
                body.append([workload, mode, *cells])
    notes = [f"{p}: {status}" for p, status in unavailable.items()]
    return Table(title, ["workload", "mode", *provider_names], body, notes)


def _detail(rows: list[dict], title: str) -> Table:
    order = {p: i for i, p in enumerate(NAMES)}
    shapes = _ordered({r["shape"] for r in rows}, [])
    rows = sorted(rows, key=lambda r: (shapes.index(r["shape"]) if r["shape"] in shapes else 0,
                                       order.get(r["provider"], len(order))))
    cells = [[show(r) for _, show in COLUMNS] for r in rows]
    keep = [i for i in range(len(COLUMNS)) if i < 2 or any(c[i] for c in cells)]
    return Table(title, [COLUMNS[i][0] for i in keep], [[c[i] for i in keep] for c in cells])


def _kernels(rows: list[dict], env_keys: set) -> Table:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k not in env_keys and not any(isinstance(r.get(k), (list, dict)) for r in rows)
            and any(r.get(k) not in (None, "") for r in rows)]
    show = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    body = [[show(r.get(k, "")) for k in keys] for r in rows]
    return Table("L1 kernels (benchmarks.kernels)", keys, body)


# ---------------------------------------------------------------- files


def write_csv(path: Path, rows: list[dict]) -> None:
    """One line per row; list-valued fields (top kernels) are in the JSON only."""
    seen = dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (list, dict)))
    fields = [*(k for k in (*KEY_FIELDS, *METRIC_FIELDS) if k in seen),
              *(k for k in seen if k not in KEY_FIELDS and k not in METRIC_FIELDS)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def heading(env: dict) -> str:
    """Who measured what: card, software, commit, date."""
    software = f"torch {env['torch']}, Triton {env['triton']}"
    if env.get("cudnn"):
        software += f", cuDNN {env['cudnn']}, CUDA {env['cuda']}, driver {env['driver']}"
    source = f" (source {env['source_sha1']})" if env.get("source_sha1") else ""
    return (f"{env['card']} · {software} · commit {env['git_commit']}{source} · {env['timestamp']}\n"
            f"ceilings measured in this run: copy {env['copy_gbs']:.0f} GB/s"
            + (f", bf16 matmul {env['bf16_matmul_tflops']:.0f} TFLOP/s" if env.get("bf16_matmul_tflops") else ""))


def chart_name(dtype: str, layout: str) -> str:
    return f"speedup-{dtype}-{layout}.png"


def charts(directory: Path, rows: list[dict], env: dict) -> list[Path]:
    """One PNG per dtype and layout: speedup over eager per shape and provider (bars: wall
    time; on a GPU, black ticks: the kernels' time, where the host did not bound the step)."""
    ok = [r for r in rows if r["workload"] in WORKLOAD_ORDER and r["status"] == "ok" and r.get("speedup_vs_eager")
          and r["provider"] != "eager"]
    paths = []
    for dtype, layout in _ordered({(r["dtype"], r["layout"]) for r in ok}, []):
        path = directory / chart_name(dtype, layout)
        _chart(path, [r for r in ok if (r["dtype"], r["layout"]) == (dtype, layout)], env, dtype, layout)
        paths.append(path)
    return paths


PROVIDER_COLORS = {
    "compile": "#7f7f7f", "compile-max-autotune": "#bcbcbc", "fused-cuda": "#d62728",
    "fused-triton": "#1f77b4", "fused-cpu": "#2ca02c", "fused-reference": "#ff7f0e",
    "compile-fused-cuda": "#8c1a1a",
}


def _chart(path: Path, rows: list[dict], env: dict, dtype: str, layout: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(w, m) for w in _ordered({r["workload"] for r in rows}, WORKLOAD_ORDER)
              for m in _ordered({r["mode"] for r in rows if r["workload"] == w}, MODES)]
    provider_names = _ordered({r["provider"] for r in rows}, NAMES)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows + 1.0), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (workload, mode) in zip(axes.flat, panels):
        group = [r for r in rows if (r["workload"], r["mode"]) == (workload, mode)]
        shapes = _ordered({r["shape"] for r in group}, [])
        present = [p for p in provider_names if any(r["provider"] == p for r in group)]
        width = min(0.8 / len(present), 0.3)
        for j, provider in enumerate(present):
            for i, shape in enumerate(shapes):
                match = [r for r in group if (r["shape"], r["provider"]) == (shape, provider)]
                if not match:
                    continue
                value = match[0]["speedup_vs_eager"]
                x = i + (j - (len(present) - 1) / 2) * width
                ax.bar(x, value, width, color=PROVIDER_COLORS.get(provider), label=provider if i == 0 else None)
                ax.annotate(f"{value:.2f}", (x, value), ha="center", va="bottom", fontsize=7)
                kernels = match[0].get("kernel_speedup_vs_eager")
                if kernels and env.get("device") != "cpu":  # on the CPU the "kernels" are the host
                    ax.plot([x - width / 2, x + width / 2], [kernels, kernels], color="black", linewidth=1.6,
                            label="by the kernels' time" if (i, j) == (0, 0) else None)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_xlim(-0.5, len(shapes) - 0.5)
        ax.set_title(f"{workload} · {MODE_TITLES[mode]} · N={group[0]['batch']}", fontsize=10)
        ax.set_ylabel("speedup over eager (×)")
        ax.margins(y=0.15)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(f"resnet_fused: speedup over eager PyTorch (dashed line; higher is better; bars: wall time), "
                 f"{dtype}, {layout}\n"
                 f"{env['card']} · torch {env['torch']} · commit {env['git_commit']} · {env['timestamp'][:10]}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(env: dict, rendered: list[Table], chart_paths: list[Path], relative_to: Path) -> str:
    lines = ["# resnet_fused benchmark", "", heading(env).replace("\n", "  \n"), "",
             f"Command: `{env['command']}`", ""]
    lines += [f"![speedup chart]({p.relative_to(relative_to).as_posix()})" for p in chart_paths]
    lines += ["", "Generated by `benchmarks/run.py`; do not edit. docs/performance.md says what each column means.", ""]
    lines += [t.markdown() + "\n" for t in rendered]
    return "\n".join(lines)


def run_directory_name(env: dict) -> str:
    """``<card>-<date>``: e.g. ``nvidia-h200-2026-11-27``."""
    card = re.sub(r"[^a-z0-9]+", "-", env["card"].lower()).strip("-")
    return f"{card}-{env['timestamp'][:10]}"


def write_latest(root: Path, run_dir: Path, env: dict, rendered: list[Table], chart_paths: list[Path]) -> Path:
    """``<root>/LATEST.md``: the published run's charts and tables, linked to its files."""
    path = root / "LATEST.md"
    text = markdown(env, rendered, chart_paths, root).replace(
        "# resnet_fused benchmark",
        f"# Latest GPU benchmark: {env['card']}, {env['timestamp'][:10]}\n\n"
        f"Files: [{run_dir.name}/]({run_dir.name}/) (results.json, results.csv, table.md, charts)", 1)
    path.write_text(text)
    return path


def write_run(out_dir: Path, env: dict, rows: list[dict]) -> tuple[list[Table], list[Path]]:
    """A run's files from its rows (speedups added): results.json, results.csv, the charts
    and table.md. Returns the tables and the charts' paths."""
    add_speedups(rows)
    rendered = tables(rows, env)
    common.write_json(out_dir / "results.json", env, rows)
    write_csv(out_dir / "results.csv", rows)
    chart_paths = charts(out_dir, rows, env)
    (out_dir / "table.md").write_text(markdown(env, rendered, chart_paths, out_dir))
    return rendered, chart_paths


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description="Render a run's tables, CSV and charts again from its results.json.")
    parser.add_argument("run_dir", type=Path, help="a run's directory (holds results.json)")
    parser.add_argument("--latest", type=Path, metavar="ROOT", help="also rewrite ROOT/LATEST.md (a published run)")
    args = parser.parse_args(argv)
    data = json.loads((args.run_dir / "results.json").read_text())
    for row in data["rows"]:
        if row.get("profiled_kernels"):  # the breakdown by today's classification rules
            row.update(metrics.category_shares(row["profiled_kernels"]))
    rendered, chart_paths = write_run(args.run_dir, data["environment"], data["rows"])
    written = [args.run_dir / "table.md", *chart_paths]
    if args.latest:
        written.append(write_latest(args.latest, args.run_dir, data["environment"], rendered, chart_paths))
    print("rendered from the run's measurements: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
