"""Train a small ResNet on scikit-learn's handwritten digits, fused and unfused, from one seed.

    python examples/train_digits.py                      # about a minute on a 2-core CPU
    python examples/train_digits.py --epochs 3 --plot /tmp/digits.png

The network is built from torchvision's own ``BasicBlock``; a copy is turned into fused
blocks with ``resnet_fused.fuse``. Both start from the same weights and train on the same
batches in the same order, so their loss curves lie on top of each other, apart from
float32 rounding. Rounding differences grow during training (SGD is chaotic), so a third
run shows the scale to expect: torchvision's blocks again, in channels_last, which rounds
differently from the NCHW run. Test accuracy is measured in eval mode, where the fused
blocks fold BatchNorm into the convolutions.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock, conv1x1
from tqdm import tqdm

import resnet_fused

DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "results" / "local" / "train_digits.png"  # git ignores it


def small_resnet(num_classes: int = 10) -> nn.Sequential:
    """A torchvision-style ResNet for 1x8x8 images: a stem and three stages of BasicBlocks."""

    def downsampling_block(inplanes: int, planes: int) -> BasicBlock:
        downsample = nn.Sequential(conv1x1(inplanes, planes, 2), nn.BatchNorm2d(planes))
        return BasicBlock(inplanes, planes, stride=2, downsample=downsample)

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        BasicBlock(16, 16),  # 8x8
        BasicBlock(16, 16),
        downsampling_block(16, 32),  # 4x4
        BasicBlock(32, 32),
        downsampling_block(32, 64),  # 2x2
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


@dataclasses.dataclass
class Digits:
    train_images: torch.Tensor  # [N, 1, 8, 8], standardized
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def to(self, memory_format: torch.memory_format) -> "Digits":
        return dataclasses.replace(
            self,
            train_images=self.train_images.contiguous(memory_format=memory_format),
            test_images=self.test_images.contiguous(memory_format=memory_format),
        )


def load(seed: int, test_fraction: float = 0.2) -> Digits:
    """scikit-learn's 1,797 8x8 digits, split into train and test sets by ``seed``."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[: int(test_fraction * len(order))], order[int(test_fraction * len(order)) :]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return Digits(images[train], labels[train], images[test], labels[test])


@dataclasses.dataclass
class History:
    losses: list[float] = dataclasses.field(default_factory=list)  # one per step
    accuracies: list[float] = dataclasses.field(default_factory=list)  # test set, one per epoch


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).sum().item()
    model.train()
    return correct / len(labels)


def train(
    model: nn.Module, data: Digits, epochs: int, batch_size: int, lr: float, seed: int, label: str
) -> History:
    """SGD with momentum and a cosine schedule; batches drawn from ``seed`` (same order for every model)."""
    order = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(data.train_labels) // batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    history = History()
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc=label, unit="step", leave=True) as progress:
        for _ in range(epochs):
            permutation = torch.randperm(len(data.train_labels), generator=order)
            for step in range(steps_per_epoch):
                batch = permutation[step * batch_size : (step + 1) * batch_size]
                loss = F.cross_entropy(model(data.train_images[batch]), data.train_labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                history.losses.append(loss.item())
                progress.set_postfix(loss=f"{loss.item():.4f}")
                progress.update()
            history.accuracies.append(accuracy(model, data.test_images, data.test_labels))
            progress.set_postfix(loss=f"{history.losses[-1]:.4f}", test_accuracy=f"{history.accuracies[-1]:.3f}")
    return history


@dataclasses.dataclass
class Result:
    unfused: History  # torchvision's blocks, NCHW
    fused: History  # resnet_fused's blocks, NCHW
    unfused_channels_last: History  # torchvision's blocks in channels_last: the rounding yardstick
    fuse_report: str

    @staticmethod
    def _max_difference(a: History, b: History) -> float:
        return max(abs(x - y) for x, y in zip(a.losses, b.losses))

    @property
    def fused_difference(self) -> float:
        """Largest per-step loss difference, fused vs torchvision."""
        return self._max_difference(self.fused, self.unfused)

    @property
    def rounding_difference(self) -> float:
        """Largest per-step loss difference, torchvision channels_last vs NCHW."""
        return self._max_difference(self.unfused_channels_last, self.unfused)


def plot(result: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unfused, fused, yardstick = result.unfused, result.fused, result.unfused_channels_last
    fig, (ax_loss, ax_diff, ax_acc) = plt.subplots(1, 3, figsize=(16, 4.4))
    steps = range(1, len(unfused.losses) + 1)
    ax_loss.plot(steps, unfused.losses, label="torchvision blocks", linewidth=2.5, alpha=0.6)
    ax_loss.plot(steps, fused.losses, label="resnet_fused blocks", linewidth=1, linestyle="--")
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="Training loss")
    ax_loss.legend()

    def difference(a: History) -> list[float]:
        return [max(abs(x - y), 1e-9) for x, y in zip(a.losses, unfused.losses)]

    ax_diff.plot(steps, difference(yardstick), label="torchvision: channels_last vs NCHW", color="gray", alpha=0.7)
    ax_diff.plot(steps, difference(fused), label="resnet_fused vs torchvision", linewidth=1)
    ax_diff.set(xlabel="step", ylabel="|loss difference|", yscale="log", title="Float32 rounding, amplified by training")
    ax_diff.legend()
    epochs = range(1, len(unfused.accuracies) + 1)
    ax_acc.plot(epochs, unfused.accuracies, "o-", label="torchvision blocks", linewidth=2.5, alpha=0.6)
    ax_acc.plot(epochs, fused.accuracies, "x--", label="resnet_fused blocks")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy (eval mode)")
    ax_acc.legend()
    fig.suptitle("Small ResNet on scikit-learn digits: same initial weights, same batches")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(epochs: int, batch_size: int, lr: float, seed: int, plot_path: Optional[Path]) -> Result:
    torch.manual_seed(seed)
    data = load(seed)
    unfused_model = small_resnet()
    fused_model, report = resnet_fused.fuse(copy.deepcopy(unfused_model))
    channels_last_model = copy.deepcopy(unfused_model).to(memory_format=torch.channels_last)
    print(report)
    result = Result(
        unfused=train(unfused_model, data, epochs, batch_size, lr, seed, "torchvision blocks       "),
        fused=train(fused_model, data, epochs, batch_size, lr, seed, "resnet_fused blocks      "),
        unfused_channels_last=train(
            channels_last_model, data.to(torch.channels_last), epochs, batch_size, lr, seed, "torchvision channels_last"
        ),
        fuse_report=str(report),
    )
    print(f"final training loss: torchvision {result.unfused.losses[-1]:.5f}, fused {result.fused.losses[-1]:.5f}")
    print(
        f"largest per-step loss difference: fused vs torchvision {result.fused_difference:.2e}; "
        f"torchvision channels_last vs NCHW {result.rounding_difference:.2e}"
    )
    print(f"test accuracy: torchvision {result.unfused.accuracies[-1]:.4f}, fused {result.fused.accuracies[-1]:.4f}")
    if plot_path is not None:
        plot(result, plot_path)
        print(f"plot: {plot_path}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help=f"where to save the plot (default {DEFAULT_PLOT})")
    # Tensors this small gain nothing from a second thread (and lose much on a busy machine).
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(args.epochs, args.batch_size, args.lr, args.seed, args.plot)


if __name__ == "__main__":
    main(sys.argv[1:])
