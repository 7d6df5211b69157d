"""The digits training example, reduced to two epochs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"


@pytest.fixture(scope="module")
def train_digits():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_fused_and_unfused_training_agree(train_digits, tmp_path):
    plot = tmp_path / "digits.png"
    result = train_digits.main(["--epochs", "2", "--plot", str(plot)])

    assert "5 of 5 residual blocks fused" in result.fuse_report
    steps = len(result.unfused.losses)
    assert steps == len(result.fused.losses) == 2 * (1438 // 64)
    # Same weights, same first batch: only the forward's rounding differs.
    assert abs(result.fused.losses[0] - result.unfused.losses[0]) < 1e-5
    # Afterwards SGD amplifies rounding; the curves stay together (mean gap a few percent of
    # the loss). A check of the whole loop, not of the gradients: one 0.3% off, or a biased
    # running variance, keeps the gap as small (test_ops and test_modules see those).
    mean_gap = sum(abs(a - b) for a, b in zip(result.fused.losses, result.unfused.losses)) / steps
    assert mean_gap < 0.05 * sum(result.unfused.losses) / steps
    for history in (result.unfused, result.fused):
        assert history.losses[-1] < 0.3 * history.losses[0]
        assert history.accuracies[-1] > 0.9
    assert abs(result.fused.accuracies[-1] - result.unfused.accuracies[-1]) < 0.03
    assert plot.stat().st_size > 10_000
