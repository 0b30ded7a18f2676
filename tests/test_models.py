"""The architecture registry: shapes, input-size limits and the offline pretrained path."""

from __future__ import annotations

import time
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mlaas import models
from mlaas.images import InputShape
from mlaas.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    PretrainedWeightsUnavailable,
    architecture_names,
    build_model,
    min_input_size,
)

EXPECTED = {
    "cnn-small",
    "cnn-medium",
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg16-bn",
    "mobilenet-v3-small",
    "mobilenet-v3-large",
    "densenet121",
}


def _shapes(arch: str) -> list[InputShape]:
    grey = max(28, min_input_size(arch))
    return [InputShape(1, grey, grey), InputShape(3, 32, 32)]


def test_registry_names() -> None:
    assert set(architecture_names()) == EXPECTED


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_builds_with_right_shapes(arch: str) -> None:
    torch.manual_seed(0)
    for shape in _shapes(arch):
        model = build_model(arch, 7, shape).eval()
        assert isinstance(model, Classifier)
        assert model.num_classes == 7
        assert model.head.in_features == model.feature_dim
        x = torch.rand(2, shape.channels, shape.height, shape.width)
        with torch.no_grad():
            logits = model(x)
            logits2, features = model.forward_with_features(x)
        assert logits.shape == (2, 7)
        assert features.shape == (2, model.feature_dim)
        assert torch.equal(logits, logits2)
        assert torch.equal(model.head(features), logits)
        assert torch.isfinite(logits).all()
        # Normalisation defaults to 0.5/0.5 per channel without pretrained weights.
        assert model.mean.shape == (1, shape.channels, 1, 1)
        assert torch.allclose(model.mean, torch.full_like(model.mean, 0.5))


@pytest.mark.parametrize("arch", sorted(EXPECTED - {"vgg16-bn"}))  # vgg's minimum is 32: above
def test_builds_at_its_minimum_size(arch: str) -> None:
    side = min_input_size(arch)
    model = build_model(arch, 3, InputShape(1, side, side)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, side, side)).shape == (1, 3)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_rejects_inputs_below_its_minimum(arch: str) -> None:
    side = min_input_size(arch) - 1
    if side < 1:
        pytest.skip("no smaller input exists")
    with pytest.raises(ValueError, match=f"at least {side + 1}x{side + 1}"):
        build_model(arch, 10, InputShape(1, side, side + 10))


def test_vgg_refuses_28px_with_a_clear_message() -> None:
    assert min_input_size("vgg16-bn") == 32
    with pytest.raises(ValueError, match=r"vgg16-bn needs inputs of at least 32x32 px, got 28x28"):
        build_model("vgg16-bn", 10, InputShape(1, 28, 28))


def test_unknown_architecture_lists_the_names() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet9'") as info:
        build_model("resnet9", 10, InputShape(1, 28, 28))
    for name in EXPECTED:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown architecture"):
        min_input_size("nope")


def test_other_argument_errors() -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("cnn-small", 10, InputShape(1, 28, 28), pretrained="imagenet")
    with pytest.raises(ValueError, match="unknown pretrained weights"):
        build_model("resnet18", 10, InputShape(3, 32, 32), pretrained="cifar")
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        build_model("cnn-small", 10, InputShape(3, 28, 28), mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_model("cnn-small", 1, InputShape(1, 28, 28))


def test_normalisation_is_inside_the_model() -> None:
    torch.manual_seed(0)
    model = build_model("cnn-small", 10, InputShape(1, 28, 28), mean=[0.2], std=[0.4]).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = model.head(torch.flatten(model.backbone((x - 0.2) / 0.4), 1))
        assert torch.allclose(model(x), expected)
    # Mean/std are buffers: they travel in the state dict.
    assert {"mean", "std"} <= set(model.state_dict())


def test_small_resnet_stem_only_without_pretrained_weights() -> None:
    scratch = build_model("resnet18", 10, InputShape(1, 28, 28))
    stem = scratch.backbone.conv1
    assert (stem.in_channels, stem.kernel_size, stem.stride) == (1, (3, 3), (1, 1))
    assert isinstance(scratch.backbone.maxpool, nn.Identity)
    # The pretrained layout (built here without fetching) keeps ImageNet's stem, made grey.
    layout = build_model(
        "resnet18", 10, InputShape(1, 28, 28), pretrained="imagenet", fetch_weights=False
    )
    stem = layout.backbone.conv1
    assert (stem.in_channels, stem.kernel_size, stem.stride) == (1, (7, 7), (2, 2))
    assert isinstance(layout.backbone.maxpool, nn.MaxPool2d)
    # Large inputs keep the ImageNet stem even from scratch.
    big = build_model("resnet18", 10, InputShape(3, 96, 96))
    assert big.backbone.conv1.kernel_size == (7, 7)


def test_pretrained_defaults_to_imagenet_statistics() -> None:
    rgb = build_model(
        "mobilenet-v3-small", 5, InputShape(3, 32, 32), pretrained="imagenet", fetch_weights=False
    )
    assert rgb.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert rgb.std.flatten().tolist() == pytest.approx(IMAGENET_STD)
    grey = build_model(
        "mobilenet-v3-small", 5, InputShape(1, 32, 32), pretrained="imagenet", fetch_weights=False
    )
    assert grey.mean.flatten().tolist() == pytest.approx([sum(IMAGENET_MEAN) / 3])
    assert grey.backbone.features[0][0].in_channels == 1


def test_grey_pretrained_stem_sums_the_rgb_filters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serve fake 'ImageNet' weights from the cache and check how the grey stem uses them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchvision.models import get_model, get_model_weights

    torch.manual_seed(0)
    rgb = get_model("mobilenet_v3_small", weights=None).state_dict()
    target = models._weights_file(get_model_weights("mobilenet_v3_small").DEFAULT.url)
    target.parent.mkdir(parents=True)
    torch.save(rgb, target)
    model = build_model("mobilenet-v3-small", 4, InputShape(1, 32, 32), pretrained="imagenet")
    stem = model.backbone.features[0][0].weight
    assert torch.allclose(stem, rgb["features.0.0.weight"].sum(dim=1, keepdim=True))
    # Everything but the stem and the replaced classifier is ImageNet's.
    block = "features.1.block.0.0.weight"
    assert torch.equal(model.backbone.state_dict()[block], rgb[block])


def test_pretrained_offline_fails_clearly_and_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an empty cache and no network, never silently random weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(models, "DOWNLOAD_TIMEOUT_S", 5.0)
    started = time.monotonic()
    try:
        build_model("mobilenet-v3-small", 10, InputShape(3, 32, 32), pretrained="imagenet")
    except PretrainedWeightsUnavailable as exc:
        message = str(exc)
    else:
        pytest.skip("this machine reached download.pytorch.org: nothing offline to test")
    assert time.monotonic() - started < 20
    assert "mobilenet-v3-small" in message
    assert "TORCH_HOME" in message and "internet" in message
    assert "mobilenet_v3_small-" in message  # the file to provide
    assert not list((tmp_path / "hub" / "checkpoints").glob("*"))  # no partial file left


def test_pretrained_unreachable_host_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same path made deterministic: the fetch itself fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def refuse(url: str, timeout: float) -> None:
        assert timeout == models.DOWNLOAD_TIMEOUT_S  # the fetch is bounded
        raise urllib.error.URLError("timed out")

    monkeypatch.setattr(models.urllib.request, "urlopen", refuse)
    with pytest.raises(PretrainedWeightsUnavailable, match=r"resnet18.*timed out"):
        build_model("resnet18", 10, InputShape(3, 32, 32), pretrained="imagenet")


def test_corrupt_cached_weights_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchvision.models import get_model_weights

    target = models._weights_file(get_model_weights("resnet18").DEFAULT.url)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsUnavailable, match="cannot be loaded"):
        build_model("resnet18", 10, InputShape(3, 32, 32), pretrained="imagenet")
