"""The benchmark plan and the runner: one task per workload, shape, mode and provider.

Tasks run in priority order (:func:`priority`) under a time budget. A task whose
estimated time (the last task of its kind, else :data:`PRIOR_S`) exceeds what is left is
skipped and reported, so a budget always yields the most important numbers first.
Repetitions scale with the budget (:func:`repetition_ms`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import sys
import time
import traceback
from typing import Callable, Optional

import torch

from . import common, metrics, providers
from .workloads import LAYOUTS, Case, Inputs, Precision, make_forward, make_inputs, make_step

# Relative error of a provider's output (and input gradient) against eager's above
# which the progress line warns: bf16 rounds at 2^-8 and a block chains three convs and
# BatchNorms whose rounding order differs between providers; fp32 allows for TF32 convs.
# In bf16 the bar is also at least EAGER_ERR_FACTOR times eager's own error against
# float32 (a whole ResNet-50 compounds rounding over 53 layers): two providers that each
# round like eager differ from each other by about sqrt(2) times that.
WARN_REL_ERR = {"bf16": 5e-2, "fp32": 1e-2}
EAGER_ERR_FACTOR = 2.0

# Seconds a task of each kind takes before one has run: (kind, family) -> (GPU, CPU).
PRIOR_S = {
    ("block", "eager"): (2, 3), ("block", "fused"): (2, 3), ("block", "compile"): (40, 30),
    ("model", "eager"): (6, 15), ("model", "fused"): (6, 15), ("model", "compile"): (90, 300),
}
KERNELS_BUDGET_SHARE = 0.15  # of the whole budget, for benchmarks.kernels.run
KERNELS_MIN_S = 10  # below this, the kernels task is skipped


@dataclasses.dataclass(frozen=True)
class Config:
    precision: Precision
    layout: str


@dataclasses.dataclass(frozen=True)
class Task:
    config: Config
    case: Optional[Case]  # None for the L1 kernels task
    mode: str
    provider: str

    @property
    def kind(self) -> str:
        if self.case is None:
            return "kernels"
        return "model" if self.case.is_model else "block"

    def label(self) -> str:
        if self.case is None:
            return f"kernels (benchmarks.kernels) {self.config.precision.name} {self.config.layout}"
        return f"{self.case.workload} {self.case.shape} {self.mode} {self.provider}"

    def row(self) -> dict:
        c = self.case
        row = {
            "workload": c.workload if c else "kernels",
            "shape": c.shape if c else None,
            "batch": c.batch if c else None,
            "mode": self.mode,
            "provider": self.provider,
            "dtype": self.config.precision.name,
            "layout": self.config.layout,
        }
        if c and not c.is_model:
            row.update(channels=c.channels, width=c.width, hw=c.hw)
        return row


def priority(task: Task) -> int:
    """1: what the design targets are stated in; 2: ResNet-50 against torch.compile, training
    and inference (the comparison the issue asks for, and the longest to compile); 3: the
    rest of the picture; 4: extras."""
    if task.provider in ("fused-reference", "compile-max-autotune"):
        return 4
    if task.case is None:
        return 1
    if task.case.is_model:
        if providers.family(task.provider) != "compile":
            return 1
        return 2 if task.provider == "compile" and task.mode in ("train", "infer") else 3
    if task.provider == "compile-fused-cuda":
        return 4
    if task.case.workload == "bottleneck":
        return 1 if task.mode != "fwd_train" else 3
    return 3 if task.mode != "fwd_train" else 4


def plan(configs: list[Config], cases: list[Case], modes: list[str], provider_names: list[str],
         kernels: bool) -> list[Task]:
    """Every task, highest priority first; within a priority by case, mode, provider order."""
    tasks = []
    for config in configs:
        if kernels:
            tasks.append(Task(config, None, "-", "kernels"))
        tasks += [Task(config, case, mode, p) for case in cases for mode in modes for p in provider_names]
    return sorted(tasks, key=priority)  # stable: keeps the order above within a priority


def repetition_ms(budget_s: Optional[float], n_tasks: int) -> float:
    """Time each measurement repeats for: a fifth of the budget spread over the tasks."""
    if not budget_s:
        return 100.0
    return min(100.0, max(10.0, 0.2 * budget_s * 1e3 / max(n_tasks, 1)))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


@dataclasses.dataclass
class Step:
    """One step of a task, and what the metrics around it need."""

    inner: Callable[[], torch.Tensor]  # one step of the mode (returns the forward output)
    forward: Callable[[], torch.Tensor]  # the forward half of a training step
    model: torch.nn.Module  # owns the parameters
    context: Callable  # the provider's context, entered around every call

    def __call__(self) -> torch.Tensor:
        with self.context():
            return self.inner()


@dataclasses.dataclass
class _Reference:
    output: torch.Tensor
    input_grad: Optional[torch.Tensor]
    flops: int

    def error(self, output: torch.Tensor, input_grad: Optional[torch.Tensor]) -> float:
        """The larger relative error of ``output`` and, where eager's is kept, ``input_grad``."""
        errors = [_rel_err(output, self.output)]
        if self.input_grad is not None:
            errors.append(_rel_err(input_grad, self.input_grad))
        return max(errors)


class Runner:
    """Runs tasks on one device, sharing models, inputs and eager references between them."""

    def __init__(self, device: torch.device, env: dict, *, budget_s: Optional[float] = None,
                 rep_ms: float = 100.0, profile: bool = True, start: Optional[float] = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)):
        self.device = device
        self.env = env
        self.budget_s = budget_s
        self.rep_ms = rep_ms
        self.profile = profile
        self.start = time.perf_counter() if start is None else start
        self.log = log
        self._models: dict = {}
        self._inputs: dict = {}
        self._references: dict = {}
        self._eager_errors: dict = {}
        self._seen_s: dict = {}

    # ------------------------------------------------------------------ shared state

    def model(self, case: Case, layout: str) -> torch.nn.Module:
        key = (case, layout)
        if key not in self._models:
            self._models[key] = case.build().to(self.device, memory_format=LAYOUTS[layout])
        return self._models[key]

    def inputs(self, task: Task) -> Inputs:
        key = (task.case, task.config)
        if key not in self._inputs:
            self._inputs[key] = make_inputs(task.case, task.config.precision, task.config.layout, self.device)
        return self._inputs[key]

    def step(self, task: Task) -> Step:
        """A fresh copy of the task's module, prepared by its provider: one step of its mode."""
        model = copy.deepcopy(self.model(task.case, task.config.layout))
        prepared = providers.prepare(task.provider, model)
        inputs, precision = self.inputs(task), task.config.precision
        return Step(
            make_step(task.case, task.mode, prepared.module, prepared.run, inputs, precision, self.device),
            make_forward(prepared.run, inputs, precision, self.device),
            prepared.module,
            prepared.context,
        )

    def eager_error(self, task: Task) -> Optional[float]:
        """Eager's own relative error at the task's precision against eager in float32 (same
        model and inputs; None for float32 tasks): the scale a provider's error is judged on."""
        if task.config.precision.name == "fp32":
            return None
        key = (task.case, task.mode, task.config)
        if key not in self._eager_errors:
            fp32 = dataclasses.replace(task, provider="eager", config=dataclasses.replace(task.config, precision=Precision("fp32")))
            output = self.step(fp32)()
            grad = self.inputs(fp32).x.grad if task.mode == "train" and not task.case.is_model else None
            self._eager_errors[key] = self.reference(task).error(output, grad)
        return self._eager_errors[key]

    def reference(self, task: Task) -> _Reference:
        """Eager's first output, input gradient and FLOPs for the task's case and mode."""
        key = (task.case, task.mode, task.config)
        if key not in self._references:
            step = self.step(dataclasses.replace(task, provider="eager"))
            flops, output = metrics.counted_flops(step)
            grad = self.inputs(task).x.grad if task.mode == "train" and not task.case.is_model else None
            self._references[key] = _Reference(output, None if grad is None else grad.clone(), flops)
        return self._references[key]

    # ------------------------------------------------------------------ budget

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def left_s(self) -> float:
        return math.inf if not self.budget_s else self.budget_s - self.elapsed_s()

    def estimate_s(self, task: Task) -> float:
        """How long the last task of this kind, mode and provider took; else the prior."""
        key = (task.kind, task.mode, task.provider)
        if key in self._seen_s:
            return self._seen_s[key]
        gpu, cpu = PRIOR_S[(task.kind, providers.family(task.provider))]
        return gpu if self.device.type == "cuda" else cpu

    # ------------------------------------------------------------------ running

    def run(self, tasks: list[Task], on_progress: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
        """Rows of every task, in order; ``on_progress`` gets the rows so far after each."""
        rows = []
        for i, task in enumerate(tasks, 1):
            progress = f"[{i:>3}/{len(tasks)} {self.elapsed_s():5.0f}s]"
            if task.case is None:
                new = self._run_kernels(task, progress)
            else:
                new = [self._run_one(task, progress)]
            rows += [{**row, **self.env} for row in new]
            if on_progress is not None:
                on_progress(rows)
        return rows

    def _run_one(self, task: Task, progress: str) -> dict:
        row = task.row()
        reason = providers.unavailable(task.provider, self.device, task.config.precision.activation_dtype)
        if reason:
            row["status"] = f"unavailable: {reason}"
            return row
        estimate = self.estimate_s(task)
        if estimate > self.left_s():
            row["status"] = f"skipped: budget (needs ~{estimate:.0f} s, {max(self.left_s(), 0):.0f} s left)"
            self.log(f"{progress} {task.label()}: {row['status']}")
            return row
        started = time.perf_counter()
        try:
            row.update(self._measure(task))
            row["status"] = "ok"
            self.log(f"{progress} {task.label()}: {_summary(row)}")
        except Exception as error:  # one failing task must not end a long run
            row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            self.log(f"{progress} {task.label()}: {row['status']}\n{traceback.format_exc()}")
        self._seen_s[(task.kind, task.mode, task.provider)] = time.perf_counter() - started
        return row

    def _measure(self, task: Task) -> dict:
        device, inputs = self.device, self.inputs(task)
        reference = self.reference(task)
        step = self.step(task)
        out: dict = {}

        first = time.perf_counter()
        output = step()
        common.sync(device)
        if providers.family(task.provider) == "compile":
            out["compile_s"] = time.perf_counter() - first
        if task.provider != "eager":
            out["rel_err_vs_eager"] = reference.error(output, inputs.x.grad)
            bar = WARN_REL_ERR[task.config.precision.name]
            eager_error = self.eager_error(task)
            if eager_error is not None:
                out["eager_rel_err_vs_fp32"] = eager_error
                bar = max(bar, EAGER_ERR_FACTOR * eager_error)
            if out["rel_err_vs_eager"] > bar:
                self.log(f"WARNING: {task.label()} differs from eager: relative error {out['rel_err_vs_eager']:.2e}"
                         + ("" if eager_error is None else f" (eager's own against fp32: {eager_error:.2e})"))

        out.update(common.measure(step, device, budget_ms=self.rep_ms))
        seconds = out["median_ms"] / 1e3
        out["spread_pct"] = 100 * (out["p80_ms"] - out["p20_ms"]) / out["median_ms"]
        out["images_per_s"] = task.case.batch / seconds
        out["gflop"] = reference.flops / 1e9
        out["tflops"] = reference.flops / seconds / 1e12
        ceiling = self.env.get("bf16_matmul_tflops")
        if ceiling and task.config.precision.name == "bf16":
            out["pct_of_matmul_peak"] = 100 * out["tflops"] / ceiling

        step.model.zero_grad(set_to_none=True)
        inputs.x.grad = None
        out["peak_mem_mb"] = _mb(metrics.peak_memory_bytes(step, device))
        if task.mode == "train":
            exclude = [*step.model.parameters(), *step.model.buffers()]
            with step.context():
                saved = metrics.saved_for_backward_bytes(step.forward, exclude)
            out["saved_for_backward_mb"] = _mb(saved)
        if self.profile:
            out.update(metrics.breakdown(step, device, iters=3 if device.type == "cuda" else 2))
        return out

    def _run_kernels(self, task: Task, progress: str) -> list[dict]:
        """The L1 kernel micro-benchmark, owned by benchmarks/kernels.py, rows as it returns them."""
        row = task.row()
        try:
            kernels = importlib.import_module(f"{__package__}.kernels")
        except ModuleNotFoundError as error:
            if error.name != f"{__package__}.kernels":
                raise
            row["status"] = "unavailable: benchmarks.kernels not present"
            self.log(f"{progress} {task.label()}: {row['status']}")
            return [row]
        budget = min(self.left_s(), KERNELS_BUDGET_SHARE * self.budget_s) if self.budget_s else None
        if budget is not None and budget < KERNELS_MIN_S:
            row["status"] = f"skipped: budget ({max(self.left_s(), 0):.0f} s left)"
            self.log(f"{progress} {task.label()}: {row['status']}")
            return [row]
        self.log(f"{progress} {task.label()}: running (budget {budget or 0:.0f} s)")
        try:
            results = kernels.run(device=str(self.device), dtypes=(task.config.precision.name,),
                                  layout=task.config.layout, budget_s=budget)
        except Exception as error:
            row["status"] = f"error: {type(error).__name__}: {error}"
            self.log(f"{progress} {task.label()}: {row['status']}\n{traceback.format_exc()}")
            return [row]
        return [{**row, "status": "ok", **r} for r in results]


def _mb(nbytes: Optional[int]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2**20


def _summary(row: dict) -> str:
    text = f"{row['median_ms']:.3f} ms (±{row['spread_pct'] / 2:.0f}%), {row['images_per_s']:.0f} img/s"
    if "compile_s" in row:
        text += f", compiled in {row['compile_s']:.1f} s"
    return text
