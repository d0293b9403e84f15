"""Every registered model builds, runs, and survives the toolkit's model-name forms."""

import sys
import textwrap

import pytest
import torch

from compress.errors import CompressError
from compress.models import MODELS, build_model, check_model_name


@pytest.mark.parametrize("name", MODELS.names())
def test_registered_model_forward(name):
    in_ch, size = (1, 8) if name.startswith("digits") else (3, 32)
    model = build_model(name, num_classes=7, in_channels=in_ch).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_ch, size, size))
    assert out.shape == (2, 7)


def test_cifar_resnet_depths_and_size():
    # He et al. 2016: ResNet-20 has 0.27M parameters (option A); option B adds two 1x1 projections.
    n = sum(p.numel() for p in build_model("resnet20", 10).parameters())
    assert 270_000 < n < 280_000
    convs = [
        m for m in build_model("resnet56", 10).modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(convs) == 55  # 6n + 1 3x3 convs plus the classifier = 56 weighted layers


def test_torchvision_model_adapts_classes_and_channels():
    model = build_model("torchvision:resnet18", num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_user_model_from_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent("""
        import torch.nn as nn
        def tiny(num_classes, width=4):
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, width), nn.ReLU(), nn.Linear(width, num_classes))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("my_models:tiny", num_classes=5, in_channels=3, width=6)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    sys.modules.pop("my_models", None)


@pytest.mark.parametrize(
    "name, message",
    [
        ("resnet21", "did you mean"),
        ("torchvision:resnet19", "unknown torchvision classifier"),
        (":f", "package.module:function"),
    ],
)
def test_unknown_names_are_rejected_at_validation(name, message):
    with pytest.raises(ValueError, match=message):
        check_model_name(name)


def test_user_model_import_error_is_a_user_error():
    with pytest.raises(CompressError, match="cannot import"):
        build_model("no_such_module_xyz:f", num_classes=3)
