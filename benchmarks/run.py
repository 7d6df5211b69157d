"""The benchmark suite: fused ResNet blocks against eager PyTorch and torch.compile.

    python -m benchmarks.run                         # GPU if present, else CPU sizes; 300 s
    python -m benchmarks.run --budget 120 --workloads bottleneck --providers eager,fused
    python -m benchmarks.run --device cuda --publish # results/<card>-<date>/ + results/LATEST.md

Writes results.json, results.csv (one row per measurement, each with the card, driver,
versions, git commit and timestamp), table.md and one speedup chart per dtype and layout
to --out (default results/local, or $RESNET_FUSED_RESULTS). docs/performance.md explains
every metric.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import common, providers, report, suite
from .workloads import (BLOCK_WORKLOADS, LAYOUTS, MODEL_WORKLOADS, MODES, PRECISIONS, SIZES, Precision, cases,
                        default_precision, default_size)

WORKLOADS = (*BLOCK_WORKLOADS, *MODEL_WORKLOADS, "kernels")


def _choices(allowed):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; expected a comma-separated list of "
                                             f"{', '.join(allowed)}")
        return values
    return parse


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: the GPU if there is one, else the CPU")
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds for the whole run (default 300; 0: no limit); low-priority tasks are skipped to fit")
    p.add_argument("--size", choices=("auto", *SIZES), default="auto",
                   help="gpu: N=128 blocks and ResNet-50; cpu: N=8 blocks, N=4 ResNet-50; tiny: smoke tests. "
                        "auto: by device")
    p.add_argument("--batch", type=int, help="block batch size (overrides --size)")
    p.add_argument("--dtype", type=_choices(PRECISIONS), help="bf16 (autocast) and/or fp32; "
                   "default bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--layout", type=_choices(tuple(LAYOUTS)), default=["channels_last"],
                   help="channels_last (default) and/or nchw")
    p.add_argument("--workloads", type=_choices(WORKLOADS), default=list(WORKLOADS),
                   help=f"comma-separated, of {','.join(WORKLOADS)} (default all)")
    p.add_argument("--shapes", type=_choices(("layer1", "layer2", "layer3", "layer4")),
                   help="block stages to run (default all)")
    p.add_argument("--modes", type=_choices(MODES), default=list(MODES),
                   help=f"comma-separated, of {','.join(MODES)} (default all)")
    p.add_argument("--providers", type=_choices((*providers.NAMES, "fused")), default=list(providers.DEFAULT),
                   help=f"comma-separated, of {','.join(providers.NAMES)}; 'fused' means every backend "
                        f"(default all but compile-max-autotune)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the profiler breakdown of time into conv/bn/eltwise/other")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help=f"results directory (default ${common.RESULTS_ENV} or results/local)")
    where.add_argument("--publish", nargs="?", const="results", metavar="ROOT",
                       help="GPU runs: write to ROOT/<card>-<date>/ and regenerate ROOT/LATEST.md (ROOT: results)")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible to torch")
    return torch.device(name)


def main(argv: Optional[list[str]] = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.publish and device.type != "cuda":
        sys.exit("--publish records the GPU run (results/LATEST.md); this run is on the CPU: use --out")
    size = default_size(device) if args.size == "auto" else SIZES[args.size]
    if args.batch:
        size = dataclasses.replace(size, batch=args.batch)
    dtypes = args.dtype or [default_precision(device)]

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"Benchmarking on the GPU: {torch.cuda.get_device_name(device)}", flush=True)
    else:
        print(f"No GPU{' requested' if args.device == 'cpu' else ' found'}: benchmarking on the CPU "
              f"({torch.get_num_threads()} threads) at {size.name} sizes", flush=True)
    print(f"Sizes: blocks N={size.batch} at their stage shapes"
          + (f" (channels / {size.channel_div}, H and W / {size.spatial_div})" if size.channel_div > 1 else "")
          + f"; ResNet-50 N={size.model_batch} at {size.image}x{size.image}", flush=True)

    env = common.environment(device)
    env.update(
        copy_gbs=common.copy_bandwidth_gbs(device),
        bf16_matmul_tflops=common.bf16_matmul_tflops(device),
        command="python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        size=size.name,
    )
    print(report.heading(env), flush=True)

    all_cases = [
        case
        for workload in args.workloads if workload != "kernels"
        for case in cases(workload, size)
        if case.is_model or not args.shapes or case.shape in args.shapes
    ]
    configs = [suite.Config(Precision(d), layout) for d in dtypes for layout in args.layout]
    provider_names = providers.expand(args.providers)
    tasks = suite.plan(configs, all_cases, args.modes, provider_names, kernels="kernels" in args.workloads)
    budget = args.budget or None
    unavailable = {(name, c): providers.unavailable(name, device, c.precision.activation_dtype)
                   for name in provider_names for c in configs}
    runnable = [t for t in tasks if not unavailable.get((t.provider, t.config))]
    rep_ms = suite.repetition_ms(budget, len(runnable))
    print(f"{len(tasks)} tasks, {len(runnable)} runnable here; budget {f'{budget:.0f} s' if budget else 'none'}; "
          f"each measurement repeats for {rep_ms:.0f} ms", flush=True)
    for (name, config), reason in unavailable.items():
        if reason:
            print(f"  {name} ({config.precision.name}): unavailable: {reason}", flush=True)

    out_dir = common.results_dir(args.out) if not args.publish else Path(args.publish) / report.run_directory_name(env)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = suite.Runner(device, env, budget_s=budget, rep_ms=rep_ms, profile=args.profile, start=start)
    # results.json after every task: a run stopped from outside keeps what it measured
    rows = runner.run(tasks, on_progress=lambda rows: common.write_json(out_dir / "results.json", env, rows))
    rendered, chart_paths = report.write_run(out_dir, env, rows)

    print()
    print(report.heading(env))
    for table in rendered:
        print()
        print(table.text())
    skipped = [r for r in rows if r["status"].startswith("skipped")]
    if skipped:
        print(f"\nSkipped to fit the {budget:.0f} s budget ({len(skipped)}): "
              + ", ".join(f"{r['workload']} {r['shape'] or ''} {r['mode']} {r['provider']}".replace("  ", " ")
                          for r in skipped))
    print(f"\nWrote {out_dir}/: results.json, results.csv, table.md, "
          + ", ".join(p.name for p in chart_paths) + f" ({time.perf_counter() - start:.0f} s in all)")
    if args.publish:
        latest = report.write_latest(Path(args.publish), out_dir, env, rendered, chart_paths)
        print(f"Published: {latest}")
    errors = [r for r in rows if r["status"].startswith("error")]
    if errors:
        print(f"{len(errors)} task(s) failed; see the log above", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
