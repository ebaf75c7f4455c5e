"""The VGG family (configs 11, 13, 16, 19, with or without BatchNorm), without torchvision.

Default: the Neural-Mechanics Tiny-ImageNet variant (Kunin et al., ICLR 2021, app. J). ``features`` is
torchvision's layer list: per entry of the config a 3×3 convolution (padding 1, with bias), optionally
``BatchNorm2d``, then ``ReLU(inplace=True)``; a 2×2 max-pool ends each of the five stages. There is no
average pool: ``forward`` is ``features → torch.flatten(x, 1) → classifier`` with

    classifier = Sequential(Linear(512·(input/32)², hidden), ReLU(True), Dropout(p),
                            Linear(hidden, hidden), ReLU(True), Dropout(p), Linear(hidden, classes))

and ``hidden = 1024``. Parameter names follow torchvision's layout (``features.N.weight``,
``classifier.N.bias``, …), so a torchvision-layout ``state_dict`` of the same shapes loads strictly.

The initialisation follows torchvision's VGG: Kaiming-normal convolution weights (``mode="fan_out"``,
``nonlinearity="relu"``), all biases 0, BatchNorm weight 1 and bias 0, Linear weights normal(0, 0.01).
"""

from __future__ import annotations

import torch
from torch import nn

from symtools.errors import SymtoolsError

# Output channels of each 3×3 convolution; "M" is a 2×2 max-pool (torchvision's cfgs "A", "B", "D", "E").
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}

DOWNSAMPLING = 32  # five 2×2 max-pools


def make_features(config: tuple[int | str, ...], batch_norm: bool, in_channels: int = 3) -> nn.Sequential:
    """torchvision's ``make_layers``: conv3×3 → [BatchNorm2d] → ReLU(inplace) per number, MaxPool2d(2) per "M"."""
    layers: list[nn.Module] = []
    for entry in config:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, int(entry), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(entry)))
        layers.append(nn.ReLU(inplace=True))
        in_channels = int(entry)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG: ``features`` → ``flatten`` → ``classifier`` (see the module docstring for the layers)."""

    def __init__(self, features: nn.Sequential, flat_features: int, classes: int, hidden: int = 1024,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Sequential(
            nn.Linear(flat_features, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, classes),
        )
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _init_like_torchvision(model: nn.Module) -> None:
    """torchvision's VGG init: Kaiming-normal (fan_out, relu) convs, zero biases, BN (1, 0), Linear N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)


def vgg(depth: str | int, batch_norm: bool = False, input_size: int = 64, classes: int = 200,
        hidden: int = 1024, dropout: float = 0.5) -> VGG:
    """Build VGG-``depth`` (11, 13, 16 or 19) for square inputs of side ``input_size`` (a multiple of 32).

    The first Linear layer takes the ``512·(input_size/32)²`` values of the flattened last feature map.
    """
    key = str(depth)
    if key not in CONFIGS:
        raise SymtoolsError(f"unknown VGG depth {depth!r}; choose one of {', '.join(CONFIGS)}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0 \
            or input_size % DOWNSAMPLING:
        raise SymtoolsError(f"input size must be a positive multiple of {DOWNSAMPLING} (VGG halves it five "
                            f"times), got {input_size!r}; e.g. 32, 64 or 224")
    for name, value in (("classes", classes), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SymtoolsError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise SymtoolsError(f"dropout must be in [0, 1), got {dropout!r}")
    config = CONFIGS[key]
    channels = [c for c in config if c != "M"][-1]
    side = input_size // DOWNSAMPLING
    return VGG(make_features(config, batch_norm), int(channels) * side * side, classes, hidden, dropout)
