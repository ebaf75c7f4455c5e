"""ResNet-18, -34 (BasicBlock) and -50 (Bottleneck), without torchvision, in torchvision's ``state_dict`` layout.

The definition is torchvision's ``resnet18/34/50`` (He et al., CVPR 2016; the "v1.5" ResNet-50, whose stride
sits on the 3×3 convolution of a Bottleneck):

    conv1 (7×7, stride 2, padding 3) → bn1 → relu → maxpool (3×3, stride 2, padding 1)
    → layer1 … layer4 (stages of 64, 128, 256, 512 planes; stride 1, 2, 2, 2)
    → avgpool (AdaptiveAvgPool2d((1, 1))) → torch.flatten(x, 1) → fc (Linear(512·expansion, classes))

* ``BasicBlock`` (expansion 1): ``conv1`` (3×3, stride s) → ``bn1`` → ReLU → ``conv2`` (3×3) → ``bn2``,
  plus the shortcut, then ReLU;
* ``Bottleneck`` (expansion 4): ``conv1`` (1×1) → ``bn1`` → ReLU → ``conv2`` (3×3, stride s) → ``bn2`` → ReLU
  → ``conv3`` (1×1, to 4·planes) → ``bn3``, plus the shortcut, then ReLU;
* the shortcut is the identity, or, where the stride or the width changes (the first block of a stage),
  ``downsample = Sequential(Conv2d(1×1, stride s, no bias), BatchNorm2d)``.

Blocks per stage: 18 → (2, 2, 2, 2), 34 → (3, 4, 6, 3), 50 → (3, 4, 6, 3). No convolution has a bias. The
parameter and buffer names are torchvision's (``layer3.1.bn2.running_var``, ``layer2.0.downsample.0.weight``,
``fc.bias`` …), so a torchvision ``state_dict`` of the same shapes loads strictly; at 1000 classes the models
have torchvision's 11,689,512 / 21,797,672 / 25,557,032 parameters. Each use of a ReLU inside a block is its
own parameter-free module (``relu1``, ``relu2``[, ``relu3``]; torchvision calls one ``relu`` two or three
times), which changes no ``state_dict`` key. The residual sum is written ``out + identity`` (not in place).

Initialisation as torchvision's (``zero_init_residual=False``): Kaiming-normal convolution weights
(``mode="fan_out"``, ``nonlinearity="relu"``), BatchNorm weight 1 and bias 0, and torch's default
initialisation of the Linear layer. The global average pool makes the model run on any input side ≥ 32
(at 32×32 the last stage sees 1×1 maps).
"""

from __future__ import annotations

import torch
from torch import nn

from symtools.errors import SymtoolsError

#: blocks per stage and block type of each depth
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
PLANES = (64, 128, 256, 512)  # planes of layer1 … layer4
STRIDES = (1, 2, 2, 2)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _ResidualBlock(nn.Module):
    """What both blocks share: the shortcut (identity, or ``downsample`` where the shape changes), added to the
    residual branch before the final ReLU."""

    def _shortcut(self, stride: int, downsample: nn.Module | None) -> None:
        """Set last, after the branch's layers: torchvision's state_dict order (``downsample`` after ``bn*``)."""
        self.downsample = downsample
        self.stride = stride

    def _join(self, out: torch.Tensor, x: torch.Tensor, relu: nn.Module) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return relu(out + identity)


class BasicBlock(_ResidualBlock):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self._shortcut(stride, downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self._join(self.bn2(self.conv2(out)), x, self.relu2)


class Bottleneck(_ResidualBlock):
    """conv1×1 → BN → ReLU → conv3×3 (stride) → BN → ReLU → conv1×1 (×4) → BN, plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self._shortcut(stride, downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self._join(self.bn3(self.conv3(out)), x, self.relu3)


class ResNet(nn.Module):
    """The stem, four stages of residual blocks, global average pool and ``fc`` (see the module docstring)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], classes: int = 1000,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, PLANES[0], layers[0], STRIDES[0])
        self.layer2 = self._make_layer(block, PLANES[1], layers[1], STRIDES[1])
        self.layer3 = self._make_layer(block, PLANES[2], layers[2], STRIDES[2])
        self.layer4 = self._make_layer(block, PLANES[3], layers[3], STRIDES[3])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(PLANES[3] * block.expansion, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet(depth: int, classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-``depth`` (18, 34 or 50) with ``classes`` outputs on ``in_channels``-channel images."""
    key = int(depth) if isinstance(depth, (int, str)) and str(depth).isdigit() else None
    if key not in DEPTHS:
        raise SymtoolsError(f"unknown ResNet depth {depth!r}; choose one of {', '.join(map(str, DEPTHS))}")
    for name, value in (("classes", classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SymtoolsError(f"{name} must be a positive integer, got {value!r}")
    kind, layers = DEPTHS[key]
    return ResNet(BasicBlock if kind == "basic" else Bottleneck, layers, classes=classes, in_channels=in_channels)
