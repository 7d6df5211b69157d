"""The README's set-up: the environment ``make`` creates (scripts/make_venv.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import child_env

ROOT = Path(__file__).resolve().parents[1]


def _make_venv(creator: str, directory: Path) -> str:
    subprocess.run([creator, str(ROOT / "scripts" / "make_venv.py"), str(directory), "--without-pip"], check=True)
    return str(directory / "bin" / "python")


def _torch_seen_by(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import torch; print(torch.__file__)"], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_make_venv_sees_the_creating_environments_torch(tmp_path):
    """Made by a Python that has torch, in a virtual environment (as the tests run under
    make's .venv or any venv) or not, .venv imports that very torch, also two levels down
    (.venv made from a .venv), and packages installed into .venv come before it."""
    first = _make_venv(sys.executable, tmp_path / "first")
    second = _make_venv(first, tmp_path / "second")
    assert _torch_seen_by(first) == _torch_seen_by(second) == torch.__file__

    purelib = subprocess.run(
        [second, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    (Path(purelib) / "torch.py").write_text("")  # a package of .venv's own, named like the inherited one
    assert _torch_seen_by(second) == str(Path(purelib) / "torch.py")


def test_an_unbuilt_or_broken_extension_says_which(tmp_path):
    """Without resnet_fused._C the package imports, runs the reference path and says the
    extension is not built (not "partially initialized module ... circular import", what
    the failed import itself reads); with a _C that cannot load, the loader's reason."""
    package = tmp_path / "resnet_fused"
    subprocess.run(["cp", "-r", str(ROOT / "resnet_fused"), str(package)], check=True)
    for built in package.glob("_C*"):
        built.unlink()
    probe = ("import resnet_fused\n"
             "print(resnet_fused.__file__)\n"
             "print(resnet_fused.available_backends('cpu'))\n"
             "print(resnet_fused.backends.get('cpu').unavailable)\n")

    # -S: no .pth files run, so no editable install's finder maps resnet_fused._C to this
    # checkout's; this process's resolved path (torch's directories) stands in for them.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *filter(None, sys.path)])}

    def run() -> str:
        result = subprocess.run([sys.executable, "-S", "-W", "always", "-c", probe], cwd=tmp_path, env=env,
                                capture_output=True, text=True, check=True)
        return result.stdout + result.stderr

    output = run()
    assert str(package / "__init__.py") in output, output  # the copy, not this checkout
    assert "resnet_fused._C is not built; every op runs the plain-PyTorch reference path" in output, output
    assert "['reference']" in output and "circular import" not in output, output
    assert output.count("pip install --no-build-isolation .") == 2, output  # the warning and the backend
    probe = "import sys; sys.modules['resnet_fused._C'] = None\n" + probe  # blocked, not missing
    output = run()
    assert "resnet_fused._C could not be loaded (import of resnet_fused._C halted" in output, output
    (package / "_C.abi3.so").write_bytes(b"not a shared object")
    probe = probe.split("\n", 1)[1]
    output = run()
    assert "resnet_fused._C could not be loaded (" in output and "['reference']" in output, output


def test_without_torchvision_the_ops_run_and_the_blocks_say_what_they_need():
    """torchvision is optional (the `vision` extra): without it the functional ops run, and
    the blocks and fuse() raise a ModuleNotFoundError that names it and the extra."""
    probe = (
        "import sys; sys.modules['torchvision'] = None\n"  # not installed
        "import torch, resnet_fused, resnet_fused.functional as RF\n"
        "print(RF.bn_relu(torch.randn(2, 3, 4, 4), None, None, training=True).shape)\n"
        "for name in ('fuse', 'FusedBottleneck'):\n"
        "    try:\n"
        "        getattr(resnet_fused, name)\n"
        "    except ModuleNotFoundError as error:\n"
        "        print(error.name, '|', error)\n"
    )
    output = subprocess.run([sys.executable, "-c", probe], env=child_env(), capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert output[0] == "torch.Size([2, 3, 4, 4])", output
    for line, name in zip(output[1:], ("fuse", "FusedBottleneck"), strict=True):
        assert line.startswith(f"torchvision | resnet_fused.{name} builds on torchvision's ResNet blocks: "
                               "pip install torchvision (or resnet_fused[vision])"), line


def test_the_readme_use_example_runs():
    """The README's `## Use` code block, as written."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    run = subprocess.run([sys.executable, "-c", block + "assert y.shape == x.shape and (y >= 0).all()\n"],
                         env=child_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "residual blocks fused" in run.stdout, run.stdout


def test_setup_refuses_a_torch_older_than_the_minimum(tmp_path):
    """pyproject's torch>=2.11: a build against an older torch stops at once and says so
    (pip would otherwise upgrade torch after the build, leaving a module that cannot load)."""
    stub = tmp_path / "torch"
    (stub / "utils").mkdir(parents=True)
    (stub / "__init__.py").write_text("__version__ = '2.6.0+cu124'\n")
    (stub / "utils" / "__init__.py").write_text("")
    (stub / "utils" / "cpp_extension.py").write_text("CUDA_HOME = BuildExtension = CppExtension = CUDAExtension = None\n")
    run = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=child_env(str(tmp_path)),
                         capture_output=True, text=True)
    assert run.returncode != 0, run.stdout
    assert "resnet_fused needs torch >= 2.11, found 2.6.0+cu124: upgrade torch first" in run.stderr, run.stderr
