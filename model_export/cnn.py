"""A small residual CNN, the ViT's baseline in the data-efficiency experiment (never served)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ResNetConfig:
    """ResNet-18's layout (He et al.) at half its width: two basic blocks per
    stage, four stages, each halving the resolution after a stem that quarters it.

    With the defaults it has 2.8 M parameters, as the default ViT (width 192, depth 6) has.
    """

    image_size: int = 128
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks_per_stage: int = 2
    num_classes: int = 8

    def __post_init__(self) -> None:
        reduction = 4 * 2 ** (len(self.widths) - 1)
        assert self.image_size % reduction == 0, f"image size must be divisible by {reduction}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _conv(inputs: int, outputs: int, *, kernel: int, stride: int) -> nn.Conv2d:
    # No bias: the batch norm after each convolution has its own.
    return nn.Conv2d(inputs, outputs, kernel, stride=stride, padding=kernel // 2, bias=False)


class Stem(nn.Module):
    """Two stride-2 3x3 convolutions: the input at a quarter of its side, as ResNet's stem."""

    def __init__(self, *, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _conv(3, width // 2, kernel=3, stride=2),
            nn.BatchNorm2d(width // 2),
            nn.ReLU(inplace=True),
            _conv(width // 2, width, kernel=3, stride=2),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)  # (B, C, S/4, S/4)


class BasicBlock(nn.Module):
    """relu(x + BN(conv(relu(BN(conv(x)))))); a strided 1x1 projection where the shape changes."""

    def __init__(self, *, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(inputs, outputs, kernel=3, stride=stride)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = _conv(outputs, outputs, kernel=3, stride=1)
        self.bn2 = nn.BatchNorm2d(outputs)
        # Zero scale on the last BN: the block starts as the identity (Goyal et al.), so the deep
        # net trains like a shallow one at first, as the ViT's residual stream does.
        nn.init.zeros_(self.bn2.weight)
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1 and inputs == outputs
            else nn.Sequential(
                _conv(inputs, outputs, kernel=1, stride=stride), nn.BatchNorm2d(outputs)
            )
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(self.act(self.bn1(self.conv1(features)))))
        return self.act(self.shortcut(features) + residual)


class ResNet(nn.Module):
    """Stem, residual stages, global average pooling, a linear head: logits like the ViT's."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = Stem(width=config.widths[0])
        blocks: list[nn.Module] = []
        inputs = config.widths[0]
        for stage, width in enumerate(config.widths):
            for index in range(config.blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(inputs=inputs, outputs=width, stride=stride))
                inputs = width
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(inputs, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(images))  # (B, C, S/32, S/32)
        return features.mean(dim=(-2, -1))  # (B, C)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)  # (B, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))
