"""Built-in example models (random init), used by ``deepseek demo`` and the CLI.

Each factory returns ``(model.eval(), example_inputs)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MnistCNN(nn.Module):
    """The article's MNIST classifier: two conv-BN-ReLU-pool stages and an MLP head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, 10)
        return self.classifier(self.features(x))


def mnist_cnn(batch: int = 1):
    torch.manual_seed(0)
    model = MnistCNN()
    # non-trivial BN statistics, as after training, so conv-BN folding is exercised
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(batch, 1, 28, 28)
    return model.eval(), (x,)


EXAMPLES = {"mnist_cnn": mnist_cnn}
