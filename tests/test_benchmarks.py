"""The benchmark suite (benchmarks/): a tiny CPU run end to end, and its measuring parts."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resnet_fused
from benchmarks import kernels, metrics, providers, report, run, suite, workloads
from helpers import child_env

ROOT = Path(__file__).resolve().parents[1]
METADATA = ("card", "driver", "torch", "triton", "cudnn", "git_commit", "timestamp", "copy_gbs")


def _run(tmp_path, *args):
    out = tmp_path / "out"
    rc = run.main(["--device", "cpu", "--size", "tiny", "--workloads", "bottleneck,kernels", "--shapes", "layer1",
                   "--budget", "120", "--out", str(out), *args])
    rows = json.loads((out / "results.json").read_text())["rows"]
    return rc, out, rows


def test_cpu_run_writes_rows_table_and_chart(tmp_path, capsys):
    rc, out, rows = _run(tmp_path, "--modes", "infer", "--providers", "eager,compile,fused")
    assert rc == 0
    blocks = [r for r in rows if r["workload"] == "bottleneck"]
    assert {r["provider"] for r in blocks} == {"eager", "compile", "fused-cuda", "fused-triton", "fused-cpu",
                                              "fused-reference"}
    for row in rows:
        assert all(key in row for key in METADATA), row
        assert row["card"].startswith("CPU") and row["torch"] == torch.__version__
    for row in blocks:
        if row["provider"] in ("eager", "compile"):
            assert row["status"] == "ok", row
        assert row["status"] == "ok" or row["status"].startswith("unavailable: "), row
    ok = {r["provider"]: r for r in blocks if r["status"] == "ok"}
    assert ok["eager"]["median_ms"] > 0 and ok["eager"]["speedup_vs_eager"] == 1.0
    assert ok["compile"]["compile_s"] > 0 and ok["compile"]["rel_err_vs_eager"] < 1e-4
    assert ok["compile"]["speedup_vs_eager"] == pytest.approx(ok["eager"]["median_ms"] / ok["compile"]["median_ms"])
    assert abs(sum(ok["eager"][f"{c}_pct"] for c in metrics.CATEGORIES) - 100) < 1e-6
    kernels = [r for r in rows if r["workload"] == "kernels"]
    assert kernels and all(r["status"] == "ok" or r["status"].startswith("unavailable") for r in kernels)

    assert (out / "speedup-fp32-channels_last.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"median_ms", "speedup_vs_eager", *METADATA} <= set(header)
    assert "| layer1 | compile |" in (out / "table.md").read_text()
    printed = capsys.readouterr().out
    assert "No GPU requested: benchmarking on the CPU" in printed and "bottleneck, inference" in printed


def test_cpu_training_rows_carry_memory_and_flops(tmp_path):
    rc, _, rows = _run(tmp_path, "--workloads", "bottleneck", "--modes", "train", "--providers", "eager,fused")
    assert rc == 0
    (eager,) = [r for r in rows if r["provider"] == "eager"]
    assert eager["saved_for_backward_mb"] > 0
    # Bottleneck conv FLOPs, forward (2 per multiply-add) and backward (input and weight grads: twice that)
    n, c, w, hw = eager["batch"], eager["channels"], eager["width"], eager["hw"]
    forward = 2 * n * hw * hw * (c * w + 9 * w * w + w * c)
    assert eager["gflop"] * 1e9 == pytest.approx(3 * forward)


def test_budget_skips_tasks_and_says_so(tmp_path, capsys):
    rc, _, rows = _run(tmp_path, "--budget", "0.001", "--providers", "eager", "--no-profile")
    assert rc == 0
    blocks = [r for r in rows if r["workload"] == "bottleneck"]
    assert blocks and all(r["status"].startswith("skipped: budget") for r in blocks)
    assert "Skipped to fit the 0 s budget" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, category",
    [  # kernel names from the H200 profiles of /work/shared/anchors, and CPU operators
        ("void at::native::batch_norm_collect_statistics_channels_last_kernel<at::native::Var, c10::BFloat16>", "bn"),
        ("void at::native::batch_norm_backward_elemt_channels_last_kernel<4, c10::BFloat16, float, float>", "bn"),
        ("cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 512, true, 1, true>", "bn"),
        ("triton_red_fused__native_batch_norm_legit_functional_relu_0", "bn"),
        ("resnet_fused::dual_bn_add_relu", "bn"),
        ("resnet_fused::batch_stats", "bn"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize256x64x32_warpgroup", "conv"),
        ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float>", "conv"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "conv"),
        ("aten::mkldnn_convolution", "conv"),
        ("aten::convolution_backward", "conv"),
        ("triton_poi_fused_convolution_threshold_backward_1", "eltwise"),
        ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>", "eltwise"),
        ("aten::threshold_backward", "eltwise"),
        ("aten::add_", "eltwise"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<3>>", "other"),
        ("aten::max_pool2d_with_indices", "other"),
        ("Memcpy DtoD (Device -> Device)", "other"),
        ("cudnn_padding_kernel", "conv"),
    ],
)
def test_classify_kernel_names(name, category):
    assert metrics.classify(name) == category


REPOSITORY = Path(__file__).resolve().parents[1]


def _kernel_names() -> dict[str, list[str]]:
    """Every kernel resnet_fused launches, by backend, as its source defines it."""
    cuda = (REPOSITORY / "csrc" / "cuda" / "bn_act_kernels.cu").read_text()
    triton = "".join(p.read_text() for p in (REPOSITORY / "resnet_fused" / "triton").glob("*.py"))
    return {
        "cuda": re.findall(r"__global__ void\b[^;{]*?\b(\w+_kernel)\(", cuda),
        "triton": re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", triton),
    }


def test_every_resnet_fused_kernel_counts_as_batchnorm_and_has_a_role():
    # The blocks' breakdown files resnet_fused's kernels under bn by their names, and the
    # kernel benchmark times them by role: a renamed or new kernel must keep both.
    names = _kernel_names()
    assert len(names["cuda"]) == 6 and len(names["triton"]) == 6, names
    for backend, found in names.items():
        for name in found:
            profiled = f"void resnet_fused::cuda::(anonymous namespace)::{name}<__nv_bfloat16, 8>" if (
                backend == "cuda") else name
            assert metrics.classify(profiled) == "bn", profiled
            assert kernels.kernel_role(backend, profiled) is not None, profiled
        assert sorted(found) == sorted(kernels.KERNEL_ROLES[backend])


def test_report_classifies_a_run_again_from_its_kernels(tmp_path):
    rc, out, _ = _run(tmp_path)
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    profiled = [r for r in data["rows"] if r.get("profiled_kernels")]
    assert profiled and all(len(r["profiled_kernels"]) > 1 for r in profiled)
    measured = [{c: r[f"{c}_pct"] for c in metrics.CATEGORIES} for r in profiled]
    for r in profiled:  # as a run classified by other rules would have them
        r.update(conv_pct=0.0, bn_pct=0.0, eltwise_pct=0.0, other_pct=100.0)
    l1_rows = [r for r in data["rows"] if r["workload"] == "kernels"]
    assert l1_rows
    l1_rows[-1]["kernels"] = {"statistics": {"us": 8.2, "pct_copy": 37.0}}  # a CUDA run's per-role breakdown
    (out / "results.json").write_text(json.dumps(data))
    assert report.main([str(out)]) == 0
    rendered = [r for r in json.loads((out / "results.json").read_text())["rows"] if r.get("profiled_kernels")]
    assert [{c: r[f"{c}_pct"] for c in metrics.CATEGORIES} for r in rendered] == measured


@pytest.mark.parametrize("code", [
    "import torch; from benchmarks import metrics; "
    "shares = metrics.breakdown(lambda: torch.ones(64, 64).relu_().sum(), torch.device('cpu'), 2); "
    "assert shares['eltwise_pct'] > 0, shares",
    "from benchmarks import step_profile; step_profile.main(['--device', 'cpu', '--size', 'tiny', "
    "'--workload', 'bottleneck', '--shape', 'layer1', '--providers', 'eager', '--steps', '1'])",
], ids=["breakdown", "step_profile"])
def test_cpu_profiling_keeps_the_profiler_library_quiet(code):
    """A CPU breakdown or step profile (a fresh process: the profiler library reads its log
    level once) prints nothing of the profiler's own between the benchmark's lines."""
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kineto_lines = re.findall(r"^[A-Z]+:\d{4}-\d\d-\d\d .*\.cpp:\d+\].*$", done.stdout + done.stderr, re.M)
    assert kineto_lines == []


def test_saved_for_backward_counts_each_storage_once_without_parameters():
    x = torch.randn(1000, requires_grad=True)
    p = torch.randn(500, requires_grad=True)

    def forward():
        y = torch.sigmoid(x)  # saves y (4000 bytes)
        z = y[:500] * y[500:]  # saves two views of y: no new storage
        return z * p  # saves z (2000 bytes) and p (excluded)

    assert metrics.saved_for_backward_bytes(forward, exclude=[p]) == 6000


def test_speedups_compare_same_shape_mode_dtype_and_layout():
    def row(provider, ms, shape="layer1", dtype="bf16", kernels_ms=None):
        return dict(workload="bottleneck", shape=shape, mode="train", dtype=dtype, layout="channels_last",
                    provider=provider, status="ok", median_ms=ms, profiled_ms=kernels_ms)

    rows = [row("eager", 3.0, kernels_ms=2.4), row("compile", 2.0), row("fused-cuda", 1.0, kernels_ms=0.8),
            row("fused-cuda", 5.0, shape="layer2"), row("eager", 10.0, dtype="fp32"), row("fused-cuda", 4.0, dtype="fp32")]
    report.add_speedups(rows)
    assert rows[2]["speedup_vs_eager"] == 3.0 and rows[2]["speedup_vs_compile"] == 2.0
    assert rows[2]["kernel_speedup_vs_eager"] == pytest.approx(3.0)  # 2.4 / 0.8 ms of kernels
    assert "speedup_vs_eager" not in rows[3]  # no eager layer2 row
    assert rows[5]["speedup_vs_eager"] == 2.5 and "speedup_vs_compile" not in rows[5]
    assert "kernel_speedup_vs_eager" not in rows[5]  # nothing profiled


def test_publish_lays_out_the_run_and_latest_md(tmp_path):
    env = dict(card="NVIDIA H200", torch="2.11.0+cu130", triton="3.6.0", cudnn=91900, cuda="13.0", driver="580.1",
               git_commit="abc1234", timestamp="2026-11-27T10:00:00+00:00", copy_gbs=4250.0,
               bf16_matmul_tflops=694.0, command="python -m benchmarks.run --publish")
    rows = [dict(workload="bottleneck", shape=f"layer{i}", batch=128, mode="train", provider=p, dtype="bf16",
                 layout="channels_last", status="ok", median_ms=ms * i, **env)
            for i in (1, 2) for p, ms in (("eager", 2.0), ("fused-cuda", 1.0))]
    report.add_speedups(rows)
    run_dir = tmp_path / report.run_directory_name(env)
    run_dir.mkdir()
    assert run_dir.name == "nvidia-h200-2026-11-27"
    charts = report.charts(run_dir, rows, env)
    latest = report.write_latest(tmp_path, run_dir, env, report.tables(rows, env), charts).read_text()
    assert "NVIDIA H200, 2026-11-27" in latest and "commit abc1234" in latest
    assert "![speedup chart](nvidia-h200-2026-11-27/speedup-bf16-channels_last.png)" in latest
    assert "| layer1 | fused-cuda | 1.000 | 2.00 |" in latest and (run_dir / "speedup-bf16-channels_last.png").exists()


def test_report_renders_a_run_again_from_its_measurements(tmp_path, capsys):
    rc, out, rows = _run(tmp_path)
    assert rc == 0
    measured = (out / "results.json").read_text()
    (out / "table.md").unlink()
    assert report.main([str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "kernel ms" in table and "×eager kernels" in table
    assert (out / "results.json").read_text() == measured  # the measurements are not touched


def test_publish_refuses_a_cpu_run():
    with pytest.raises(SystemExit, match="--publish records the GPU run"):
        run.main(["--device", "cpu", "--publish", "unused"])


def test_host_overhead_times_blocks_and_the_cpp_autograd(capsys):
    from benchmarks import host_overhead

    assert host_overhead.main(["--calls", "4"]) == 0
    out = capsys.readouterr().out
    assert "train step, torchvision" in out
    if "cpu" in resnet_fused.available_backends("cpu"):
        assert "train step, fused cpu " in out and "train step, fused cpu, Python autograd" in out
        assert "batch_stats op, cpu " in out and "bn_relu train forward + backward, cpu " in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in driver is for machines without a GPU")
def test_host_overhead_times_the_triton_backend_without_a_gpu(capsys):
    pytest.importorskip("triton")
    from benchmarks import host_overhead, triton_stand_in

    assert host_overhead.main(["--triton-stand-in", "--calls", "4"]) == 0
    out = capsys.readouterr().out
    assert "launches recorded, not run" in out
    assert "train step, fused triton " in out and "train step, fused triton, every launch through Triton" in out
    assert "batch_stats op, triton " in out and "bn_relu train forward + backward, triton " in out
    assert len(triton_stand_in.LAUNCHES) == 0, "the stand-in left launches behind"
    assert not resnet_fused.backends.get("triton").supports(torch.device("cpu"), torch.float32), "not restored"
    with pytest.raises(SystemExit):
        host_overhead.main(["--triton-stand-in", "--backends", "cpu"])
    assert "--triton-stand-in times the triton backend on the cpu device" in capsys.readouterr().err


def test_plan_puts_resnet50_against_torch_compile_right_after_the_design_targets():
    size = workloads.SIZES["gpu"]
    cases = [c for w in ("bottleneck", "basicblock", "resnet50") for c in workloads.cases(w, size)]
    config = suite.Config(workloads.Precision("bf16"), "channels_last")
    tasks = suite.plan([config], cases, ["train", "fwd_train", "infer"], list(providers.NAMES), kernels=True)
    priorities = [suite.priority(t) for t in tasks]
    assert priorities == sorted(priorities) and set(priorities) == {1, 2, 3, 4}
    second = [(t.case.workload, t.mode, t.provider) for t in tasks if suite.priority(t) == 2]
    assert second == [("resnet50", "train", "compile"), ("resnet50", "infer", "compile")]
    first = {(t.case.workload if t.case else "kernels", t.provider) for t in tasks if suite.priority(t) == 1}
    assert ("resnet50", "fused-cuda") in first and ("bottleneck", "eager") in first and ("kernels", "kernels") in first
    assert not any(provider.startswith("compile") for workload, provider in first if workload == "resnet50")


def test_kernel_benchmark_writes_rows_without_the_reference_and_within_budget(tmp_path, capsys):
    out = tmp_path / "kernels"
    rc = kernels.main(["--device", "cpu", "--batch", "2", "--shapes", "layer2.128", "--dtype", "fp32",
                       "--ops", "bn_add_relu,bn_add_relu_backward", "--budget-s", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "kernels_cpu_nhwc.json").read_text())
    copies = [r for r in data["rows"] if r["op"] == "copy"]
    rows = [r for r in data["rows"] if r["op"] != "copy"]
    assert {r["backend"] for r in rows} == {"eager", "cpu"}  # the reference is left out by default
    assert {r["op"] for r in rows} == {"bn_add_relu", "bn_add_relu_backward"}
    # One copy of the activation per (shape, dtype): the yardstick of pct_size_copy.
    assert len(copies) == 1 and copies[0]["backend"] == "torch" and copies[0]["pct_size_copy"] == pytest.approx(100)
    size_copy_gbs = copies[0]["gbs"]
    for r in rows:
        assert r["median_ms"] > 0
        if r["backend"] == "eager":  # the fused kernels' traffic is not eager's
            assert r["kernel_bytes"] is r["kernel_pct_copy"] is r["pct_size_copy"] is None
            continue
        assert r["pct_size_copy"] == pytest.approx(100 * r["kernel_bytes"] / r["median_ms"] / 1e6 / size_copy_gbs)
        assert r["rel_err"] < 1e-5 and r["speedup_vs_eager"] > 0
    assert "summary (" in capsys.readouterr().out
    # The table's summary keeps its legend, and says how many target shapes it covers (1 of 4).
    text = (out / "kernels_cpu_nhwc.txt").read_text()
    assert "summary (" in text and "'kernel target': every streaming kernel" in text
    summary = text[text.index("summary ("):].splitlines()
    (summary_row,) = [line for line in summary if line.startswith("bn_add_relu ") and " cpu " in line]
    assert " 1/4 " in summary_row, summary_row


def test_the_summary_of_a_whole_gpu_run_fits_a_remote_runs_output_tail():
    """gpu_check prints the kernel summary last for a remote GPU run, which returns only its
    output's last 12,000 characters: the summary of run 3's 62 (op, dtype, backend) groups
    (results/) with its legend stays under 11,000, leaving room for the lines around it."""
    path = Path(__file__).parents[1] / "results/nvidia-h200-2026-11-27-run3/kernels/kernels_cuda_nhwc.json"
    rows = json.loads(path.read_text())["rows"]
    table = kernels.summary_table(rows)
    assert len(table.splitlines()) == 3 + 62
    assert len(kernels.summary_legend("NVIDIA H200", 4000)) + len(table) < 11_000
    top, bottom, rule, first = table.splitlines()[:4]
    assert len(rule) >= max(map(len, table.splitlines())), "the rule spans the widest row"
    assert top.split()[:4] == ["op", "dtype", "backend", "largest"] and first.split()[:3] == ["copy", "bf16", "torch"]


def test_the_target_verdict_needs_every_kernel_at_every_target_shape():
    assert kernels.TARGET_SHAPES == ("layer1.256", "layer1.64", "layer2.512", "layer2.128")
    assert kernels.target_verdict([], 4) == "-"  # no kernel breakdown (eager, the CPU)
    assert kernels.target_verdict([92.0, 84.9], 4) == "MISS"
    assert kernels.target_verdict([92.0, 85.0], 4) == "met"
    assert kernels.target_verdict([92.0, 85.0], 3) == "incomplete"
    assert kernels.target_verdict([84.0], 3) == "MISS"


def _backward_rows(reduce_pct=90.0, elementwise=None, **case):
    """bn_relu_backward rows at the four target shapes, each kernel at 90% of copy unless told."""
    rows = []
    for shape in kernels.TARGET_SHAPES:
        streaming = {"backward reduce": {"us": 50.0, "pct_copy": reduce_pct},
                     "backward finalize": {"us": 3.0},
                     "backward elementwise": dict(elementwise or {"us": 60.0, "pct_copy": 90.0})}
        rows.append({"op": "bn_relu_backward", "shape": shape, "n": 128, "layout": "channels_last",
                     "backend": "cuda", "pct_copy": 88.0, "kernels": streaming, **case})
    return rows


def test_the_verdicts_judge_the_op_by_its_bytes_and_each_kernel_cold():
    """'op target': the op's median by DESIGN.md's bytes; 'kernel target': each streaming
    kernel by its own traffic, a kernel warm in L2 (re-reading its predecessor's input at an
    activation L2 holds) or missing from the profile leaving its shape unjudged; both only at
    N=128 in channels_last."""
    rows = _backward_rows()
    assert kernels.op_target(rows) == kernels.kernel_target(rows) == "met"
    rows[3]["pct_copy"] = 60.0
    assert kernels.op_target(rows) == "MISS" and kernels.kernel_target(rows) == "met"

    warm = _backward_rows(elementwise={"us": 40.0, "pct_copy": 99.0, "warm": True})
    assert kernels.kernel_target(warm) == "incomplete"
    warm[0]["kernels"]["backward elementwise"].pop("warm")
    warm[0]["kernels"]["backward elementwise"]["pct_copy"] = 80.0
    assert kernels.kernel_target(warm) == "MISS"  # a cold kernel below the target is a miss

    partial = _backward_rows()
    del partial[2]["kernels"]["backward elementwise"]  # absent from the profile
    assert kernels.kernel_target(partial) == "incomplete"
    partial[2]["kernels"] = {"error": "RuntimeError: the profiler failed"}
    assert kernels.kernel_target(partial) == "incomplete"
    assert kernels.kernel_target([dict(r, kernels={"error": "x"}) for r in partial]) == "incomplete"

    for other in ({"n": 8}, {"layout": "nchw"}):
        assert kernels.op_target(_backward_rows(**other)) == kernels.kernel_target(_backward_rows(**other)) == "-"
    assert kernels.kernel_target(_backward_rows(layout="nhwc")) == "met"  # --layout's alias
    eager = [dict(r, backend="eager", kernels=None) for r in _backward_rows()]
    assert kernels.kernel_target(eager) == "-"


def test_a_dependent_kernel_is_warm_in_l2_at_activations_l2_holds(monkeypatch):
    """The op's first streaming kernel runs after the flush; the next re-reads its input,
    from L2 where the activation fits in it."""
    assert not kernels.warm_in_l2("bn_relu_backward", "backward reduce", 26 << 20, 60 << 20)
    assert kernels.warm_in_l2("bn_relu_backward", "backward elementwise", 26 << 20, 60 << 20)
    assert not kernels.warm_in_l2("bn_relu_backward", "backward elementwise", 200 << 20, 60 << 20)
    assert kernels.warm_in_l2("train_bn_relu", "forward", 26 << 20, 60 << 20)
    assert not kernels.warm_in_l2("bn_relu", "forward", 26 << 20, 60 << 20)
    assert not kernels.warm_in_l2("train_bn_relu", "forward", 26 << 20, None)  # the CPU: no L2 known

    monkeypatch.setattr(kernels, "_profiled_us", lambda backend, fn, flush, iterations: {
        "backward reduce": 50.0, "backward finalize": 3.0, "backward elementwise": 40.0})
    k = kernels.kernel_breakdown("bn_relu_backward", "cuda", lambda: None, 26 << 20, 4000.0, l2_bytes=60 << 20)
    assert "warm" not in k["backward reduce"] and k["backward elementwise"]["warm"] is True
    assert kernels._kernel_text(k["backward elementwise"]).endswith(", warm in L2")


def test_a_role_is_timed_by_its_median_call():
    """Each call's kernels of a role summed, then the median over the calls; a slow first
    call does not move it."""
    assert kernels.per_call_median([100.0, 10.0, 11.0, 12.0], 4) == 11.5
    assert kernels.per_call_median([50.0, 50.0, 5.0, 5.0, 6.0, 6.0], 3) == 12.0  # two kernels a call
    assert kernels.per_call_median([3.0, 4.0, 5.0], 2) == 6.0  # not whole calls: the mean per call
    assert kernels.per_call_median([], 5) == 0.0


def test_kernel_benchmark_fails_a_wrong_result(tmp_path, monkeypatch, capsys):
    """Every output is held to eager's: a backward op whose weight gradient (its third output,
    eager's second) is off by 1% fails its row, untimed, and the run."""
    fused_callable = kernels.fused_callable

    def off_by_one_percent(op, ns, t):
        fn = fused_callable(op, ns, t)
        return lambda: tuple(g * 1.01 if i == 2 else g for i, g in enumerate(fn()))

    monkeypatch.setattr(kernels, "fused_callable", off_by_one_percent)
    rc = kernels.main(["--device", "cpu", "--batch", "2", "--shapes", "layer2.128", "--dtype", "fp32",
                       "--ops", "bn_add_relu_backward", "--budget-s", "2", "--out", str(tmp_path)])
    assert rc == 1
    (row,) = [r for r in json.loads((tmp_path / "kernels_cpu_nhwc.json").read_text())["rows"] if r["backend"] == "cpu"]
    assert "relative error 1.0e-02 against eager, above 4e-03" in row["error"] and "median_ms" not in row
    assert "FAILED" in capsys.readouterr().out


def test_l2_flushes_write_or_only_read_their_buffer(capsys):
    """'zero' leaves L2 dirty by writing the buffer, 'read' leaves it clean by reading only."""
    buffer = torch.arange(64, dtype=torch.int8)
    with torch.profiler.profile(profile_memory=True) as profiled:
        kernels.L2_FLUSHES["read"](buffer)
    assert torch.equal(buffer, torch.arange(64, dtype=torch.int8))
    allocated = [(e.name, e.cpu_memory_usage) for e in profiled.events() if e.cpu_memory_usage > 0]
    assert all(size < buffer.numel() for _, size in allocated), allocated  # no converted copy to write
    kernels.L2_FLUSHES["zero"](buffer)
    assert not buffer.any()
    with pytest.raises(SystemExit):
        kernels.main(["--device", "cpu", "--l2-flush", "clean"])
    assert "argument --l2-flush: invalid choice: 'clean'" in capsys.readouterr().err


def test_own_l2_flush_times_read_only_kernels_after_a_read(monkeypatch):
    """--l2-flush own: a read before the kernels that write no activation (and the finalize of
    an op that only reads), a write before the rest; each kernel keeps its launch order."""
    read = {  # (op, role) timed after a read; every other pair after a write
        ("batch_stats", "statistics"), ("batch_stats", "statistics finalize"),
        ("train_bn_relu", "statistics"), ("train_bn_add_relu", "statistics"),
        ("train_dual_bn_add_relu", "statistics"), ("bn_relu_backward", "backward reduce"),
        ("dual_bn_add_relu_backward", "backward reduce"),
    }
    for op, roles in kernels.ROLE_PASSES.items():
        finalize = "statistics finalize" if "statistics" in roles else "backward finalize"
        for role in (*roles, finalize):
            expected = "read" if (op, role) in read else "zero"
            assert kernels.l2_flush_for(op, role, "own") == expected, (op, role)
            assert kernels.l2_flush_for(op, role, "zero") == "zero" and kernels.l2_flush_for(op, role, "read") == "read"

    flushes = []

    def profiled_us(backend, fn, flush, iterations):  # the read takes 8 us off every kernel
        flushes.append(flush)
        return {role: us - 8.0 * (flush == "read") for role, us in launched.items()}

    monkeypatch.setattr(kernels, "_profiled_us", profiled_us)
    launched = {"backward reduce": 60.0, "backward finalize": 10.5, "backward elementwise": 75.0}
    k = kernels.kernel_breakdown("bn_relu_backward", "cuda", lambda: None, activation_bytes=10**8, copy_gbs=4000.0)
    assert sorted(flushes) == ["read", "zero"] and list(k) == list(launched)
    assert k["backward reduce"] == {"us": 52.0, "l2_flush": "read", "pct_copy": pytest.approx(2e10 / 52e3 / 4000)}
    assert (k["backward finalize"]["us"], k["backward finalize"]["l2_flush"]) == (10.5, "zero")
    assert (k["backward elementwise"]["us"], k["backward elementwise"]["l2_flush"]) == (75.0, "zero")

    flushes.clear()
    launched = {"statistics": 57.0, "statistics finalize": 12.0}
    k = kernels.kernel_breakdown("batch_stats", "cuda", lambda: None, activation_bytes=10**8, copy_gbs=4000.0)
    assert flushes == ["read"] and k["statistics"]["us"] == 49.0 and k["statistics finalize"]["us"] == 4.0

    flushes.clear()
    launched = {"backward reduce": 100.0, "backward finalize": 10.0, "backward elementwise": 75.0}
    kernels.kernel_breakdown("bn_add_relu_backward", "cuda", lambda: None, activation_bytes=10**8, copy_gbs=4000.0)
    kernels.kernel_breakdown("bn_relu_backward", "cuda", lambda: None, 10**8, 4000.0, l2_flush="zero")
    assert flushes == ["zero", "zero"]  # grad_residual is written; a named mode applies to every kernel

    # Against a yardstick of the kernel's own traffic: a read for a read-only kernel, a copy
    # for the others, each after the kernel's flush; finalize kernels (no passes) get none.
    asked = []

    def yardstick(kind, passes, flush):
        asked.append((kind, passes, flush))
        return {"read": 40.0, "copy": 50.0}[kind]

    launched = {"backward reduce": 60.0, "backward finalize": 10.5, "backward elementwise": 75.0}
    k = kernels.kernel_breakdown("bn_relu_backward", "cuda", lambda: None, 10**8, 4000.0, yardstick=yardstick)
    assert sorted(asked) == [("copy", 3, "zero"), ("read", 2, "read")]
    assert (k["backward reduce"]["yardstick"], k["backward reduce"]["pct_yardstick"]) == ("read", 100 * 40 / 52)
    elementwise = k["backward elementwise"]
    assert (elementwise["yardstick"], elementwise["pct_yardstick"]) == ("copy", 100 * 50 / 75)
    assert "yardstick" not in k["backward finalize"]
    assert kernels._kernel_text(k["backward reduce"]) == "52.0 us (96% copy, 77% of a same-size read) after a read"

    def failing(kind, passes, flush):
        raise RuntimeError("no yardstick")

    k = kernels.kernel_breakdown("bn_relu_backward", "cuda", lambda: None, 10**8, 4000.0, yardstick=failing)
    reduce = k["backward reduce"]
    assert reduce["us"] == 52.0 and reduce["yardstick_error"] == "RuntimeError: no yardstick"


def test_an_early_launched_kernel_is_charged_from_its_predecessors_end():
    """Programmatic dependents start while the kernel before them on their stream runs and
    wait for it: each kernel's own time starts where the one before it (ours or the flush's)
    ends. Kernels launched in order, gaps included, keep their own durations, and so do
    kernels that overlap on another stream."""
    role_of = {"flush": None, "stats": "statistics", "finalize": "statistics finalize",
               "forward": "forward", "other": "other stream"}.get
    early = [(7, "flush", 0.0, 10.0), (7, "stats", 9.0, 60.0), (7, "finalize", 11.0, 64.0),
             (7, "forward", 62.0, 160.0), (8, "other", 20.0, 30.0)]
    assert metrics.own_device_us(early, role_of) == {"statistics": 50.0, "statistics finalize": 4.0,
                                                     "forward": 96.0, "other stream": 10.0}
    in_order = [(7, "flush", 0.0, 10.0), (7, "stats", 12.0, 60.0), (7, "finalize", 65.0, 69.0),
                (7, "forward", 70.0, 170.0)]
    assert metrics.own_device_us(in_order, role_of) == {"statistics": 48.0, "statistics finalize": 4.0,
                                                        "forward": 100.0}
    # Two calls, as kernels._device_us profiles them: summed per role, in any event order.
    twice = early + [(s, n, a + 200, b + 200) for s, n, a, b in early]
    assert metrics.own_device_us(list(reversed(twice)), role_of)["statistics finalize"] == 8.0


def test_yardstick_times_its_own_kernels_not_the_flush(monkeypatch):
    """A read yardstick sums into float32 what the kernel reads, a copy moves half in and half
    out; the flush's kernels and a sum's zeroed semaphore (a memset) are not counted."""
    calls = []

    def device_us(role_of, fn, flush, iterations):
        result = fn()
        calls.append((flush, result))
        launched = {"fill_kernel": 30.0} if result is None else {"fill_kernel": 30.0, "Memset (Device)": 1.0,
                                                                 "reduce_kernel": 9.0, "Memcpy DtoD": 20.0}
        times = {}
        for name, us in launched.items():
            role = role_of(name)
            if role:
                times[role] = times.get(role, 0.0) + us
        return times

    flush_kernel_names = kernels._flush_kernel_names  # cached: cleared before and after
    flush_kernel_names.cache_clear()
    monkeypatch.setattr(kernels, "_device_us", device_us)
    try:
        x = torch.randn(2, 3, 4, 4, dtype=torch.float16)
        assert kernels.yardstick_us(x, "read", 2, "zero") == 29.0
        flush, total = calls[-1]
        assert flush == "zero" and total.dtype == torch.float32
        kernels.yardstick_us(x, "copy", 3, "read")
        flush, copied = calls[-1]
        assert flush == "read" and copied.dtype == torch.float16 and copied.numel() == 3 * x.numel() // 2
        with pytest.raises(ValueError, match="yardstick kind 'write'"):
            kernels.yardstick_us(x, "write", 1, "zero")
        monkeypatch.setattr(kernels, "_flush_kernel_names", lambda flush: frozenset(
            {"fill_kernel", "reduce_kernel", "Memcpy DtoD"}))
        with pytest.raises(RuntimeError, match="the read yardstick launches only kernels the zero flush"):
            kernels.yardstick_us(x, "read", 1, "zero")
    finally:
        flush_kernel_names.cache_clear()

    measured = []
    monkeypatch.setattr(kernels, "yardstick_us", lambda x, *key: measured.append(key) or 7.0)
    yardsticks = kernels.Yardsticks(torch.zeros(4))
    assert [yardsticks("read", 2, "read"), yardsticks("copy", 3, "zero"), yardsticks("read", 2, "read")] == [7.0] * 3
    assert measured == [("read", 2, "read"), ("copy", 3, "zero")]  # each once per activation


def test_kernel_benchmark_budget_is_a_deadline(capsys):
    rows = kernels.run(device="cpu", dtypes=("fp32",), shapes="layer2.128", ops=["bn_relu"], batch=2,
                       copy_gbs=1.0, budget_s=1e-9)
    assert rows == []
    assert "budget of 0 s reached: 1 of 1 (shape, dtype, op) cases not measured" in capsys.readouterr().out


@pytest.mark.parametrize(
    "backend, name, role",
    [
        ("cuda", "void resnet_fused::cuda::(anonymous namespace)::batch_stats_finalize_kernel<float>(...)",
         "statistics finalize"),
        ("cuda", "void resnet_fused::cuda::(anonymous namespace)::batch_stats_kernel<(Layout)0, 8, __nv_bfloat16>",
         "statistics"),
        ("cuda", "void resnet_fused::cuda::(anonymous namespace)::bn_act_backward_elementwise_kernel<(Epilogue)1>",
         "backward elementwise"),
        ("cuda", "void at::native::batch_norm_collect_statistics_kernel<float>", None),
        ("triton", "_bn_act_backward_reduce_kernel", "backward reduce"),
        ("triton", "_batch_stats_finalize_kernel", "statistics finalize"),
        ("triton", "triton_poi_fused_relu_0", None),
    ],
)
def test_kernel_roles_from_profiler_names(backend, name, role):
    assert kernels.kernel_role(backend, name) == role


def test_step_profile_names_phases_and_backward_nodes(capsys):
    """The step timeline (benchmarks/step_profile.py) splits a step into forward, backward and
    optimizer host time and lists the backward nodes: the fused blocks' own nodes among them."""
    from benchmarks import step_profile

    step_profile.main(["--device", "cpu", "--size", "tiny", "--workload", "resnet50",
                       "--providers", "eager,fused-cpu", "--steps", "1", "--top", "40"])
    out = capsys.readouterr().out
    eager, fused = out.split("\nfused-cpu: ")
    for text in (eager, fused):
        assert "wall " in text and "forward " in text and "backward " in text and "optimizer " in text
        assert "ConvolutionBackward0" in text
    assert "NativeBatchNormBackward0" in eager and "resnet_fused" not in eager
    # The C++ backend's nodes are its C++ autograd Functions (csrc/autograd.cpp).
    assert "CppNode<resnet_fused::eager::BnRelu>" in fused and "CppNode<resnet_fused::eager::DualBnA" in fused


def test_step_profile_graph_needs_cuda(capsys):
    from benchmarks import step_profile

    with pytest.raises(SystemExit):
        step_profile.main(["--device", "cpu", "--graph"])
    assert "--graph needs --device cuda" in capsys.readouterr().err


@pytest.mark.cuda
def test_step_profile_times_the_step_in_one_cuda_graph():
    """--graph captures the suite's own training step (forward, backward, optimizer) whole and
    times its replays (the GPU check's profile phase runs it with fused-triton too). In a
    process of its own, as that phase runs it: the profiler and graph capture in one
    process have had bugs of their own (pytorch/pytorch#75504), which a test worker that
    profiled and captured before would add."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_profile", "--device", "cuda", "--size", "tiny", "--workload",
         "resnet50", "--providers", "eager,fused-cuda", "--steps", "1", "--top", "1", "--graph"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=110,
    )
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert out.count("in one CUDA graph: wall ") == 2 and "capture failed" not in out, out


def test_step_profile_host_phases_ignore_gpu_annotations():
    """Profiled with CUDA, each ``step: <phase>`` range comes back twice from key_averages:
    the host range and a GPU annotation of the same name, with no host time and the span of
    the range's kernels as device time. The phases' host times are the host ranges', and the
    kernels' time leaves the annotations out (the H200 run of 0794d15 printed 0.00 ms for
    the phases and counted the kernels of a ResNet-50 step twice, 43 ms for 20)."""
    from types import SimpleNamespace

    from benchmarks import step_profile

    CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(key, device_type, cpu_us, device_us=0.0, annotation=True):
        return SimpleNamespace(key=key, device_type=device_type, is_user_annotation=annotation, count=2,
                               cpu_time_total=cpu_us, self_cpu_time_total=cpu_us, self_device_time_total=device_us)

    events = [event("step: forward", CPU, 9000.0), event("step: forward", CUDA, 0.0, 7000.0),
              event("step: backward", CPU, 30000.0), event("step: backward", CUDA, 0.0, 12000.0),
              event("sm90_xmma_fprop", CUDA, 0.0, 3000.0, annotation=False),
              event("bn_act_forward_kernel", CUDA, 0.0, 2000.0, annotation=False)]
    def raw(name, start, end, annotation=False):  # prof.events(): the kernels' own spans
        return SimpleNamespace(name=name, device_type=CUDA, is_user_annotation=annotation, device_resource_id=7,
                               time_range=SimpleNamespace(start=start, end=end))

    spans = [raw("step: forward", 0.0, 7000.0, annotation=True), raw("sm90_xmma_fprop", 0.0, 3000.0),
             raw("bn_act_forward_kernel", 3000.0, 5000.0)]
    summary = step_profile._summary(SimpleNamespace(key_averages=lambda: events, events=lambda: spans), steps=2, top=5)
    assert summary.splitlines()[0] == "  kernels 2.50 ms; host: backward 15.00 ms, forward 4.50 ms"


def test_step_profile_lists_the_forward_ops_by_their_range():
    """The forward's own table counts the host events inside a ``step: forward`` range, at
    any depth, and nothing outside it."""
    from types import SimpleNamespace

    from benchmarks import step_profile

    CPU = torch.autograd.DeviceType.CPU

    def event(name, own_us, parent=None):
        return SimpleNamespace(name=name, device_type=CPU, self_cpu_time_total=own_us, cpu_parent=parent)

    forward = event("step: forward", 5.0)
    conv = event("aten::convolution", 300.0, forward)
    launch = event("cudaLaunchKernel", 40.0, event("aten::cudnn_convolution", 200.0, conv))
    outside = event("aten::add_", 70.0, event("step: optimizer", 1.0))
    prof = SimpleNamespace(key_averages=lambda: [], events=lambda: [forward, conv, launch, launch.cpu_parent, outside])
    table = step_profile._summary(prof, steps=1, top=10).split("forward ops by own host time")[1].splitlines()[1:]
    assert [row.split()[-1] for row in table] == ["aten::convolution", "aten::cudnn_convolution", "cudaLaunchKernel"]
    assert table[0].split()[:2] == ["0.300", "1"]


def test_compile_fused_provider_fuses_then_compiles(monkeypatch):
    """compile-fused-cuda: the blocks fused first, torch.compile over the fused model, the
    cuda backend selected around every call; on a machine without it, unavailable."""
    import torchvision

    import resnet_fused
    from benchmarks import providers

    assert providers.fused_backend("compile-fused-cuda") == "cuda" and providers.fused_backend("compile") is None
    assert "cuda" in providers.unavailable("compile-fused-cuda", torch.device("cpu"), torch.float32)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compiled.append((model, kwargs)) or model)
    monkeypatch.setattr(providers, "fused_backend", lambda name: "cpu")  # the same path, runnable here
    prepared = providers.prepare("compile-fused-cuda", torchvision.models.resnet18())
    (model, kwargs), = compiled
    assert model is prepared.module and kwargs == {"fullgraph": True}
    assert isinstance(model.layer1[0], resnet_fused.FusedBasicBlock)
    with prepared.context():
        assert resnet_fused.get_backend() == "cpu"


def test_kernel_fit_recovers_a_line_and_fits_a_committed_run(capsys):
    from benchmarks import kernel_fit

    fixed, rate = kernel_fit.fit_line([(mb, 3.0 + mb / 4.5) for mb in (100.0, 250.0, 400.0)])
    assert fixed == pytest.approx(3.0) and rate == pytest.approx(4.5)
    run_path = REPOSITORY / "results" / "nvidia-h200-2026-11-27" / "kernels" / "kernels_cuda_nhwc.json"
    run = json.loads(run_path.read_text())
    fits = {(f.op, f.dtype, f.backend, f.kernel): f for f in kernel_fit.fits(run)}
    stats = fits[("batch_stats", "bfloat16", "cuda", "statistics")]
    # layer1.256 and layer2.512 only: layer1.64's and layer2.128's activations (51, 26 MB) fit in L2.
    assert stats.shapes == ("layer1.256", "layer2.512")
    assert stats.rate_tbs == pytest.approx(4.23, abs=0.01) and stats.fixed_us == pytest.approx(10.9, abs=0.1)
    assert fits[("copy", "float32", "torch", "op")].shapes == ("layer1.256", "layer1.64", "layer2.512", "layer3.1024")
    assert not any(f.op == "batch_stats" and f.kernel == "statistics finalize" for f in fits.values())
    assert kernel_fit.main([str(run_path)]) == 0
    assert "time = F + bytes / R per kernel" in capsys.readouterr().out
    assert kernel_fit.main([str(run_path), "--min-tensor-mb", "1e6"]) == 1


def test_kernel_diff_compares_rows_and_kernels_of_two_runs(tmp_path, capsys):
    from benchmarks import kernel_diff

    def row(backend, shape, ms, **kernel_us):
        return dict(op="bn_relu", shape=shape, dtype="bfloat16", layout="channels_last", backend=backend,
                    median_ms=ms, kernels={k: {"us": v} for k, v in kernel_us.items()} or None)

    before = [row("cuda", "layer1.256", 0.111, forward=107.0), row("cuda", "layer2.512", 0.060, forward=56.0),
              row("eager", "layer1.256", 0.256), row("cuda", "layer1.64", None),
              dict(row("cuda", "layer2.128", 0.020), kernels={"error": "RuntimeError: profiler"})]
    after = [row("cuda", "layer1.256", 0.102, forward=98.0), row("cuda", "layer2.512", 0.0564, forward=52.5),
             row("eager", "layer1.256", 0.256), row("cuda", "layer1.64", 0.030, forward=28.0),
             dict(row("cuda", "layer2.128", 0.019), kernels={"error": "RuntimeError: profiler"})]
    env = dict(card="NVIDIA H200", torch="2.11", triton="3.6", git_commit="abc", resnet_fused_env={})
    paths = []
    def tuned(tile_for_256):  # what kernels.py records: the autotuner's choice per kernel and key
        entry = {"key_args": ["lanes"], "key": [256, "torch.bfloat16"], "config": {"TILE": tile_for_256}}
        return {"_bn_act_forward_kernel": [entry, dict(entry, key=[64, "torch.bfloat16"], config={"TILE": 8192})]}

    for name, rows, extra, configs, early in (("a", before, {}, tuned(2048), False),
                                              ("b", after, {"RESNET_FUSED_BACKEND": "cuda"}, tuned(4096), True)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"environment": dict(env, resnet_fused_env=extra, triton_configs=configs,
                                                        early_launch=early), "rows": rows}))
        paths.append(path)

    lines, means, unmatched = kernel_diff.compare(kernel_diff.load(paths[0])[1], kernel_diff.load(paths[1])[1])
    by = {(key[1], key[4], kernel): ratio for key, kernel, _, _, ratio in lines}
    assert by[("layer1.256", "cuda", "forward")] == pytest.approx(98.0 / 107.0)
    assert by[("layer1.256", "eager", "op")] == pytest.approx(1.0)
    forward = next(m for m in means if m[0] == ("bn_relu", "forward", "bfloat16", "cuda"))
    assert forward[1] == pytest.approx(((98.0 / 107.0) * (52.5 / 56.0)) ** 0.5) and forward[2] == 2
    assert [(key[1], side) for key, side in unmatched] == [("layer1.64", "before")]
    # A failed profile: the op compared, no kernel.
    assert [kernel for key, kernel, *_ in lines if key[1] == "layer2.128"] == ["op"]

    assert kernel_diff.main([str(paths[0]), str(paths[1]), "--backends", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "RESNET_FUSED_BACKEND" in out and "eager" not in out.split("geometric mean")[0]
    assert "  early_launch: False -> True" in out
    changed = [line for line in out.splitlines() if line.startswith("  triton config")]
    assert changed == ["  triton config _bn_act_forward_kernel [256, \"torch.bfloat16\"]: "
                       "{'TILE': 2048} -> {'TILE': 4096}"]
    assert "not compared: bn_relu/layer1.64/bfloat16/channels_last/cuda (no time in the before run)" in out
    assert kernel_diff.main([str(paths[0]), str(paths[1]), "--ops", "batch_stats"]) == 1
