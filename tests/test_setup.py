"""The README's set-up: the environment ``make`` creates (scripts/make_venv.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

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
