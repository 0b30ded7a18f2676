"""Architecture registry: every model the testbed trains, serves or steals with.

Victims and substitutes are all :class:`Classifier` objects: a backbone that maps an image to a
feature vector, and a linear head. The split is explicit because the provider's detectors read
the penultimate features (Mahalanobis, feature-space PRADA) from the same forward pass that
answers the query, and because an attacker may fine-tune only the head.

Normalisation lives inside the model, so every caller feeds float ``NCHW`` in ``[0, 1]`` (what
:func:`mlaas.images.to_tensor` makes) and a checkpoint carries its own mean and std.

Two families are available: small CNNs for 28x28 inputs (the default Fashion-MNIST victim is
``cnn-small``) and torchvision's ImageNet architectures, adapted to the input's channel count
and the class count. ImageNet weights come from torchvision's weight enums; offline they raise
:class:`PretrainedWeightsUnavailable` rather than silently training from random weights, which
would quietly invalidate any "pretrained victim" experiment.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn

from mlaas.images import InputShape

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PRETRAINED_CHOICES: tuple[str, ...] = ("imagenet",)

DOWNLOAD_TIMEOUT_S: float = 30.0
"""Per-socket-operation timeout for fetching weights, so an unreachable host fails, not hangs."""

SMALL_INPUT_PX = 64
"""Inputs at most this size get the CIFAR-style ResNet stem when trained from scratch."""


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be fetched or read (usually: offline)."""


def _channel_buffer(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32).view(1, -1, 1, 1)


class Classifier(nn.Module):
    """``backbone -> features (N, feature_dim)``, then ``head: nn.Linear(feature_dim, K)``.

    Normalisation (per-channel mean/std) is the first step inside the model, so the model takes
    float ``NCHW`` in ``[0, 1]``. Mean and std are buffers: they are saved in the state dict and
    move with ``.to(device)``.
    """

    # Registered as buffers in __init__; declared here, as nn.Module's attribute lookup is
    # typed as "Tensor | Module" otherwise.
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.register_buffer("mean", _channel_buffer(mean))
        self.register_buffer("std", _channel_buffer(std))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, feature_dim)`` of images in ``[0, 1]``."""
        return torch.flatten(self.backbone(self.normalise(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and penultimate features from one pass (what the server's detectors need)."""
        features = self.features(x)
        return self.head(features), features


# --------------------------------------------------------------------------- small CNNs


def _conv_block(in_ch: int, out_ch: int) -> list[nn.Module]:
    # bias=False: BatchNorm's shift makes a conv bias redundant.
    return [
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """VGG-style stages of 3x3 conv + BatchNorm + ReLU, each ending in a 2x2 max-pool, then FC.

    The flatten size is computed from the input shape rather than fixed to 28x28 (and no global
    pooling is used, which costs accuracy at this scale), so the same definition serves any input
    size of at least ``2 ** len(stages)`` pixels.
    """

    def __init__(
        self,
        shape: InputShape,
        stages: Sequence[Sequence[int]],
        hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = shape.channels
        height, width = shape.height, shape.width
        for stage in stages:
            for out_ch in stage:
                layers += _conv_block(channels, out_ch)
                channels = out_ch
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * height * width, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.out_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _build_cnn_small(shape: InputShape) -> tuple[nn.Module, int]:
    # Sized to the CPU budget: 3 epochs on 50,000 Fashion-MNIST images with the default
    # TrainConfig (AdamW + OneCycle) took 37-114 s on 2 shared cores, 92.0-92.2 % test accuracy.
    net = SmallCNN(shape, stages=[[32], [64]], hidden=128, dropout=0.3)
    return net, net.out_features


def _build_cnn_medium(shape: InputShape) -> tuple[nn.Module, int]:
    net = SmallCNN(shape, stages=[[32, 32], [64, 64], [128]], hidden=256, dropout=0.4)
    return net, net.out_features


# --------------------------------------------------------------------------- torchvision


@dataclass(frozen=True)
class _TorchvisionSpec:
    torchvision_name: str
    first_conv: str  # dotted path of the stem convolution
    last_layer: str  # dotted path of the ImageNet classification layer
    min_size: int


_TORCHVISION: dict[str, _TorchvisionSpec] = {
    # ResNets and MobileNets run on any size (padded stride-2 stages bottom out at 1 px); 8 px
    # is a floor below which the images carry too little to classify.
    "resnet18": _TorchvisionSpec("resnet18", "conv1", "fc", 8),
    "resnet34": _TorchvisionSpec("resnet34", "conv1", "fc", 8),
    "resnet50": _TorchvisionSpec("resnet50", "conv1", "fc", 8),
    # Five 2x2 max-pools: below 32 px the last one has nothing left to pool.
    "vgg16-bn": _TorchvisionSpec("vgg16_bn", "features.0", "classifier.6", 32),
    "mobilenet-v3-small": _TorchvisionSpec("mobilenet_v3_small", "features.0.0", "classifier.3", 8),
    "mobilenet-v3-large": _TorchvisionSpec("mobilenet_v3_large", "features.0.0", "classifier.3", 8),
    # Stride-2 stem, max-pool and three 2x2 average-pooling transitions: 29 px at the least.
    "densenet121": _TorchvisionSpec("densenet121", "features.conv0", "classifier", 32),
}

_SMALL: dict[str, tuple[Callable[[InputShape], tuple[nn.Module, int]], int]] = {
    "cnn-small": (_build_cnn_small, 4),
    "cnn-medium": (_build_cnn_medium, 8),
}


def architecture_names() -> list[str]:
    """Every name :func:`build_model` accepts."""
    return [*_SMALL, *_TORCHVISION]


def _check_arch(arch: str) -> None:
    if arch not in _SMALL and arch not in _TORCHVISION:
        raise ValueError(
            f"unknown architecture {arch!r}; choose one of: {', '.join(architecture_names())}"
        )


def min_input_size(arch: str) -> int:
    """Smallest image side (pixels) ``arch`` is built for; smaller inputs are refused."""
    _check_arch(arch)
    if arch in _SMALL:
        return _SMALL[arch][1]
    return _TORCHVISION[arch].min_size


def _get_submodule_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), leaf


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, leaf = _get_submodule_parent(root, path)
    setattr(parent, leaf, module)


def _conv_like(conv: nn.Conv2d, in_channels: int, **overrides: object) -> nn.Conv2d:
    kwargs: dict[str, object] = dict(
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    kwargs.update(overrides)
    return nn.Conv2d(in_channels, **kwargs)  # type: ignore[arg-type]


def _weights_file(url: str) -> Path:
    """Where ``torch.hub`` caches ``url`` (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _fetch_weights(url: str, target: Path) -> None:
    """Download ``url`` to ``target`` with a socket timeout, checking torch.hub's hash prefix.

    torch.hub's own download has no timeout, so an unreachable host could block a server
    start indefinitely; this fetches into the same cache file torch.hub then reads.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(target.name)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
        ):
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
        if match and not digest.hexdigest().startswith(match.group(1)):
            raise PretrainedWeightsUnavailable(
                f"downloaded {url} but its SHA-256 does not match the expected prefix "
                f"{match.group(1)}; the download is corrupt"
            )
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; the cache may be shared
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _check_pretrained(pretrained: str | None) -> None:
    if pretrained is not None and pretrained not in PRETRAINED_CHOICES:
        raise ValueError(
            f"unknown pretrained weights {pretrained!r}; choose one of {PRETRAINED_CHOICES} or None"
        )


def _pretrained_torchvision(spec: _TorchvisionSpec, arch: str, pretrained: str) -> nn.Module:
    from torchvision.models import get_model, get_model_weights

    weights = get_model_weights(spec.torchvision_name).DEFAULT
    target = _weights_file(weights.url)
    if not target.is_file():
        try:
            _fetch_weights(weights.url, target)
        except (urllib.error.URLError, OSError) as exc:  # URLError, timeouts, DNS, disk
            raise PretrainedWeightsUnavailable(
                f"cannot fetch the ImageNet weights for {arch} ({weights}) from {weights.url}: "
                f"{exc}. They need internet access once, or TORCH_HOME pointing at a directory "
                f"whose hub/checkpoints/ holds {target.name} (looked for {target}). "
                "Not falling back to random weights."
            ) from exc
    try:
        return get_model(spec.torchvision_name, weights=weights, progress=False)
    except Exception as exc:  # a truncated or foreign file in the cache
        raise PretrainedWeightsUnavailable(
            f"the cached ImageNet weights for {arch} at {target} cannot be loaded ({exc}); "
            "delete the file to fetch it again"
        ) from exc


def _build_torchvision(
    arch: str, shape: InputShape, pretrained: str | None, fetch_weights: bool
) -> tuple[nn.Module, int]:
    # Imported here, not with this module: torchvision.models takes seconds to import, which
    # every server process and CLI command would pay for the small CNNs that need none of it.
    from torchvision.models import get_model

    spec = _TORCHVISION[arch]
    _check_pretrained(pretrained)
    if pretrained is None or not fetch_weights:
        net = get_model(spec.torchvision_name, weights=None)
    else:
        net = _pretrained_torchvision(spec, arch, pretrained)

    conv = net.get_submodule(spec.first_conv)
    assert isinstance(conv, nn.Conv2d)
    small = max(shape.height, shape.width) <= SMALL_INPUT_PX
    if arch.startswith("resnet") and small and pretrained is None:
        # CIFAR-style stem: a 7x7 stride-2 conv plus max-pool would shrink 28 px to 7 px before
        # the first residual stage. Pretrained models keep their ImageNet stem, because the
        # pretrained filters and downstream statistics were learned for it.
        net.conv1 = _conv_like(conv, shape.channels, kernel_size=3, stride=1, padding=1)
        net.maxpool = nn.Identity()
    elif shape.channels != conv.in_channels:
        new_conv = _conv_like(conv, shape.channels)
        if pretrained is not None:
            # Grey input: sum the RGB filters (timm's convention). A grey image replicated to
            # RGB gives exactly this response, so activations keep their ImageNet scale
            # (averaging would shrink them threefold).
            with torch.no_grad():
                new_conv.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
                if conv.bias is not None:
                    assert new_conv.bias is not None
                    new_conv.bias.copy_(conv.bias)
        _replace(net, spec.first_conv, new_conv)

    last = net.get_submodule(spec.last_layer)
    assert isinstance(last, nn.Linear)
    _replace(net, spec.last_layer, nn.Identity())
    return net, last.in_features


def build_model(
    arch: str,
    num_classes: int,
    shape: InputShape,
    *,
    pretrained: str | None = None,
    fetch_weights: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """Build ``arch`` for ``shape`` inputs and ``num_classes`` outputs.

    ``pretrained="imagenet"`` loads torchvision's default ImageNet weights for the backbone (the
    head is always new) and defaults mean/std to ImageNet's; otherwise they default to 0.5/0.5.
    Grey inputs get a one-channel stem (pretrained RGB filters are summed into it).

    ``fetch_weights=False`` builds the layout and normalisation a pretrained model has but
    leaves the weights random: for loading a checkpoint of a fine-tuned pretrained model
    without network access (see :func:`mlaas.modelstore.load_model`).
    """
    _check_arch(arch)
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, not {num_classes}")
    side = min(shape.height, shape.width)
    if side < min_input_size(arch):
        raise ValueError(
            f"{arch} needs inputs of at least {min_input_size(arch)}x{min_input_size(arch)} px, "
            f"got {shape.height}x{shape.width}; resize the data (e.g. --shape "
            f"{shape.channels}x{min_input_size(arch)}x{min_input_size(arch)}) or pick another "
            "architecture"
        )
    if arch in _SMALL:
        if pretrained is not None:
            raise ValueError(f"{arch} has no pretrained weights; use pretrained=None")
        backbone, feature_dim = _SMALL[arch][0](shape)
    else:
        backbone, feature_dim = _build_torchvision(arch, shape, pretrained, fetch_weights)

    c = shape.channels
    if pretrained is not None:
        default_mean: Sequence[float] = IMAGENET_MEAN
        default_std: Sequence[float] = IMAGENET_STD
        if c == 1:  # the grey stem sums the RGB filters: use the mean statistics
            default_mean = (sum(IMAGENET_MEAN) / 3,)
            default_std = (sum(IMAGENET_STD) / 3,)
    else:
        default_mean, default_std = (0.5,) * c, (0.5,) * c
    mean = list(default_mean if mean is None else mean)
    std = list(default_std if std is None else std)
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std need {c} values for {shape} inputs, got {mean} and {std}")
    return Classifier(backbone, feature_dim, num_classes, mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRETRAINED_CHOICES",
    "Classifier",
    "PretrainedWeightsUnavailable",
    "architecture_names",
    "build_model",
    "count_parameters",
    "min_input_size",
]
