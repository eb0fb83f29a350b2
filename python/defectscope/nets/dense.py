"""Dense."""

from __future__ import annotations

import copy

import torch
from torch import nn

from defectscope.nets.vgg import DefectNet


def _dilate(layer: nn.Conv2d, dilation: int) -> None:
    layer.dilation = (dilation, dilation)
    layer.padding = (dilation * (layer.kernel_size[0] // 2),) * 2


def _rewire(features: nn.Sequential, native_stride: int) -> int:
    """Set pools and convolutions of a VGG trunk for ``native_stride``, in place.

    Pools that keep stride 2 give the native step; later ones run at stride 1 with the
    layers after them dilated, which evaluates every shifted grid at once. Returns the
    dilation the head needs.
    """
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    kept = {32: 5, 16: 4, 8: 3}[native_stride]
    dilation = 1
    for index, layer in enumerate(features):
        if isinstance(layer, nn.MaxPool2d):
            if pools.index(index) >= kept:
                features[index] = nn.MaxPool2d(2, stride=1, dilation=dilation)
                dilation *= 2
            else:
                features[index] = nn.MaxPool2d(2, stride=2)
        elif isinstance(layer, nn.Conv2d):
            _dilate(layer, dilation)
    return dilation


class DenseDefectNet(nn.Module):
    """A :class:`DefectNet` as one fully convolutional pass over a region.

    Parameters
    ----------
    model : DefectNet
        Copied; its weights are not shared.
    native_stride : {32, 16, 8}
        Step between output windows.
    in_channels : {1, 3}
        1 folds the first convolution over the replicated gray channels (exact, a
        third of its work); 3 for ImageNet normalization, whose channels differ.
    temperature : float
        Softmax temperature of the calibrated probabilities.

    Notes
    -----
    ``forward`` takes ``(N, C, H, W)`` with H and W multiples of ``align`` and returns
    probabilities ``(N, classes, h, w)`` and embeddings ``(N, d, h, w)``; output
    ``(i, j)`` is the window at ``(i * native_stride, j * native_stride)``.
    """

    def __init__(
        self, model: DefectNet, native_stride: int = 32, in_channels: int = 1, temperature=1.0
    ):
        super().__init__()
        if native_stride not in (32, 16, 8):
            raise ValueError(f"native stride must be 32, 16 or 8, got {native_stride}")
        features = copy.deepcopy(model.features)
        first = features[0]
        if in_channels == 1 and first.in_channels == 3:
            folded = nn.Conv2d(1, first.out_channels, first.kernel_size, padding=first.padding)
            with torch.no_grad():
                folded.weight.copy_(first.weight.sum(dim=1, keepdim=True))
                folded.bias.copy_(first.bias)
            features[0] = folded
        dilation = _rewire(features, native_stride)
        self.features = features
        linear = model.embedding[1]
        side = round((linear.in_features // 512) ** 0.5)
        self.head = nn.Conv2d(512, linear.out_features, side, dilation=dilation)
        self.classifier = nn.Conv2d(linear.out_features, model.classifier.out_features, 1)
        with torch.no_grad():
            self.head.weight.copy_(linear.weight.view(linear.out_features, 512, side, side))
            self.head.bias.copy_(linear.bias)
            self.classifier.weight.copy_(model.classifier.weight[:, :, None, None])
            self.classifier.bias.copy_(model.classifier.bias)
        self.native_stride = native_stride
        self.align = 2 ** {32: 5, 16: 4, 8: 3}[native_stride]
        self.in_channels = in_channels
        self.temperature = float(temperature)

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = torch.relu(self.head(self.features(x)))
        return self.classifier(embedding), embedding

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding = self.forward_logits(x)
        return torch.softmax(logits / self.temperature, dim=1), embedding

    def with_stride(self, native_stride: int) -> DenseDefectNet:
        """The same weights rewired for another native stride."""
        twin = copy.deepcopy(self)
        dilation = _rewire(twin.features, native_stride)
        twin.head.dilation = (dilation, dilation)
        twin.native_stride = native_stride
        twin.align = 2 ** {32: 5, 16: 4, 8: 3}[native_stride]
        return twin


def receptive_margin(model: DefectNet, patch_size: int) -> int:
    """Pixels beyond a window's edge that can reach its output, from the layer list."""
    jump, reach = 1, 0  # reach: how far the field extends past one output cell's span
    for layer in model.features:
        if isinstance(layer, nn.Conv2d):
            reach += (layer.kernel_size[0] // 2) * jump
        elif isinstance(layer, nn.MaxPool2d):
            jump *= 2
    return reach
