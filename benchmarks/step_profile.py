"""Where one training step's time goes, on the host and on the device, per provider.

    python benchmarks/step_profile.py --device cuda                       # ResNet-50, N=128
    python benchmarks/step_profile.py --device cuda --workload bottleneck --shape layer1
    python benchmarks/step_profile.py --device cpu --size tiny             # a smoke test

The suite says how long a step takes and how much of it the kernels take; when the two
differ (a step the host bounds, or a device left idle) this says why. For each provider it
times the step (wall, CUDA events or the host clock), then records a few steps with
torch.profiler and prints, per step:

- wall time, the kernels' total time, and the host time of the forward (with autograd),
  the backward and the optimizer, from the suite's own step (``workloads.make_step``) with
  its phases named by ``record_function`` ranges on the calling thread
  (the backward range waits for the autograd engine, whose nodes run on its own threads);
- the backward nodes (``autograd::engine::evaluate_function: ...``) by total host time;
- the ops by their own (self) host time, over the step and within the forward.

The profiler adds about a microsecond per op, so host times here run a few percent high.
``--graph`` (CUDA) also times the step captured whole in one CUDA graph and replayed
(docs/modules.md, "CUDA graphs"): the wall time with the host out of the loop. A capture
that fails is reported, the other providers still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, metrics, providers  # noqa: E402
from benchmarks.workloads import (LAYOUTS, SIZES, Precision, cases, default_precision,  # noqa: E402
                                  default_size, make_inputs, make_step)


def _wall_ms(step, device: torch.device, steps: int) -> float:
    common.sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    common.sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def _graph_wall_ms(step, device: torch.device, steps: int) -> float:
    """Wall time per replay of ``step`` captured in one CUDA graph (``step`` reads only its
    static inputs)."""
    graph = common.cuda_graph(step)
    graph.replay()  # the first replay uploads the graph
    return _wall_ms(graph.replay, device, steps)


def _summary(prof, steps: int, top: int) -> str:
    events = prof.key_averages()
    per_step = lambda us: us / steps / 1e3  # noqa: E731  (us over all steps -> ms per step)
    # With CUDA profiled, each range is also a GPU annotation under the same name (key_averages
    # keeps the device type apart) spanning the range's kernels, with no host time: the
    # kernels are the device events that are not annotations, the host phases the CPU ones.
    device_us = sum(metrics.own_device_us(metrics.device_events(prof), lambda name: "kernels").values())
    phases = {e.key: per_step(e.cpu_time_total) for e in events
              if e.key.startswith("step: ") and e.device_type == torch.autograd.DeviceType.CPU}
    lines = [f"  kernels {per_step(device_us):.2f} ms; host: "
             + ", ".join(f"{k.removeprefix('step: ')} {v:.2f} ms" for k, v in sorted(phases.items()))]
    nodes = sorted((e for e in events if e.key.startswith("autograd::engine::evaluate_function: ")),
                   key=lambda e: e.cpu_time_total, reverse=True)
    lines.append("  backward nodes by host time (ms per step, calls per step):")
    for e in nodes[:top]:
        name = e.key.removeprefix("autograd::engine::evaluate_function: ")
        lines.append(f"    {per_step(e.cpu_time_total):8.3f}  {e.count // steps:4d}  {name}")
    own = defaultdict(lambda: [0.0, 0])
    for e in events:
        if not e.key.startswith(("step: ", "ProfilerStep")):
            own[e.key][0] += e.self_cpu_time_total
            own[e.key][1] += e.count
    lines.append("  ops by own host time (ms per step, calls per step):")
    lines += _own_time_rows(own, steps, top)
    # The forward runs on the calling thread, inside its range (the backward's nodes run on
    # the autograd engine's threads, listed above).
    forward = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and _phase(e) == "forward":
            forward[e.name][0] += e.self_cpu_time_total
            forward[e.name][1] += 1
    in_ops = per_step(sum(us for us, _ in forward.values()))
    lines.append(f"  forward ops by own host time (ms per step, calls per step; all ops {in_ops:.2f} ms, "
                 f"the rest of the forward's host time is Python between them):")
    lines += _own_time_rows(forward, steps, top)
    return "\n".join(lines)


def _phase(event) -> str | None:
    """The step phase an event ran in: its innermost enclosing ``step: <phase>`` range, on
    its thread (None for the range itself and for events outside every range)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("step: "):
            return parent.name.removeprefix("step: ")
        parent = parent.cpu_parent
    return None


def _own_time_rows(own: dict, steps: int, top: int) -> list[str]:
    rows = sorted(own.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
    return [f"    {us / steps / 1e3:8.3f}  {count // steps:4d}  {key[:90]}" for key, (us, count) in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--workload", default="resnet50", choices=("resnet50", "bottleneck", "basicblock"))
    p.add_argument("--shape", default="layer1", help="block stage (blocks only; default layer1)")
    p.add_argument("--size", choices=tuple(SIZES), help="default: gpu on a GPU, cpu on the CPU")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--layout", default="channels_last", choices=tuple(LAYOUTS))
    p.add_argument("--providers", default="eager,fused-cuda", help="comma-separated (default eager,fused-cuda)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    p.add_argument("--top", type=int, default=15, help="rows per table (default 15)")
    p.add_argument("--graph", action="store_true", help="also time the step replayed from one CUDA graph")
    args = p.parse_args(argv)
    if args.graph and args.device != "cuda":
        p.error("--graph needs --device cuda")

    device = torch.device(args.device)
    size = SIZES[args.size] if args.size else default_size(device)
    precision = Precision(args.dtype or default_precision(device))
    candidates = cases(args.workload, size)
    case = candidates[0] if args.workload == "resnet50" else next(
        (c for c in candidates if c.shape == args.shape), None)
    if case is None:
        p.error(f"--shape {args.shape}: no such {args.workload} stage")
    model = case.build().to(device, memory_format=LAYOUTS[args.layout])
    inputs = make_inputs(case, precision, args.layout, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cpu":
        common.quiet_cpu_profiler()
    print(f"{args.workload} {case.shape}, training step, {precision.name}, {args.layout}, N={case.batch}, "
          f"{common.environment(device)['card'] if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    capture_failed = False
    for name in args.providers.split(","):
        reason = providers.unavailable(name, device, precision.activation_dtype)
        if reason:
            print(f"\n{name}: unavailable: {reason}")
            continue
        prepared = providers.prepare(name, copy.deepcopy(model))
        step = make_step(case, "train", prepared.module, prepared.run, inputs, precision, device, named_phases=True)
        with prepared.context():
            for _ in range(3):  # warm-up: cuDNN plans, autotuning, allocator
                step()
            wall = _wall_ms(step, device, max(args.steps, 5))
            with profile(activities=activities) as prof:
                for _ in range(args.steps):
                    step()
                common.sync(device)
        print(f"\n{name}: wall {wall:.2f} ms per step")
        print(_summary(prof, args.steps, args.top))
        if args.graph:
            try:
                with prepared.context():
                    graphed = _graph_wall_ms(step, device, max(args.steps, 5))
                print(f"  in one CUDA graph: wall {graphed:.2f} ms per step")
            except RuntimeError as error:  # the other providers still run; the exit status tells
                print(f"  in one CUDA graph: capture failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
                capture_failed = True
    return 1 if capture_failed else 0


if __name__ == "__main__":
    sys.exit(main())
