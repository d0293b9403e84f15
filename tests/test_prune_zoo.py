"""Structured pruning on the torchvision zoo: residual, concat (DenseNet), channel split and shuffle
(ShuffleNet), grouped convs (RegNet), depthwise + squeeze-excite (MobileNet, EfficientNet),
LayerNorm (ConvNeXt) and attention (ViT). Random weights at small inputs: the graph is what
matters. Each pruned model must really shrink, keep its output shape, export to ONNX with ONNX
Runtime agreeing with PyTorch, and reload from a compress checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.bench.size import onnx_weight_counts
from compress.checkpoint import load_weights, read_checkpoint, save_model
from compress.errors import StageFailed
from compress.models import build_model
from compress.pruning.structured import StructuredOptions, count, prune_step
from compress.stages.export import export_onnx, parity

ZOO = {
    "resnet18": {},
    "resnet50": {},
    "mobilenet_v2": {},
    "mobilenet_v3_small": {},
    "efficientnet_b0": {},
    "densenet121": {},
    "shufflenet_v2_x1_0": {},
    "regnet_x_400mf": {},
    "convnext_tiny": {},
    "vit_b_16": {"image_size": 32},
}
# ShuffleNet's channel shuffle (view → transpose → view) defeats torch-pruning 1.6's reshape tracing
# (a ZeroDivisionError inside it); the stage reports where instead of a traceback.
UNSUPPORTED = {
    "shufflenet_v2_x1_0": r"^prune: torch-pruning cannot prune ShuffleNetV2: at the reshape after layer "
    r"'stage4\.1\.branch2\.\d+': ZeroDivisionError",
}
SLOW = {"vit_b_16", "convnext_tiny", "densenet121", "resnet50"}  # tiny_vit below covers ViT in the fast run


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ZOO])
def test_zoo_prunes_exports_and_reloads(name, tmp_path):
    if name in UNSUPPORTED:  # torch-pruning cannot: the stage must say where, in one line
        model = build_model(f"torchvision:{name}", 10, 3).eval()
        with pytest.raises(StageFailed, match=UNSUPPORTED[name]):
            prune_step(model, torch.randn(1, 3, 32, 32), StructuredOptions(), 0.3, 10)
        return
    check_prune_export_reload(f"torchvision:{name}", ZOO[name], tmp_path)


def tiny_vit(num_classes: int) -> nn.Module:
    """A two-block torchvision VisionTransformer: the same modules as vit_b_16 (conv_proj,
    class token, pos_embedding, nn.MultiheadAttention, MLP), small enough for the fast run."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=num_classes
    )


def test_tiny_vit_prunes_head_dims_and_mlp(tmp_path):
    model = check_prune_export_reload("tests.test_prune_zoo:tiny_vit", {}, tmp_path)
    attn = model.encoder.layers[0].self_attention
    assert attn.num_heads == 4 and attn.embed_dim < 64 and attn.embed_dim % 4 == 0  # every head kept, narrower
    assert model.encoder.layers[0].mlp[0].out_features < 128


def test_a_pruned_model_that_no_longer_runs_names_the_layer():
    # 4 heads, but widths rounded to multiples of 3: the attention width 42 is not divisible by 4
    # heads; the one-line error names the attention layer.
    model = tiny_vit(10).eval()
    with pytest.raises(StageFailed, match=r"no longer runs at layer 'encoder\.layers\.encoder_layer_0\.self_attention"):
        prune_step(model, torch.randn(1, 3, 32, 32), StructuredOptions(round_to=3), 0.3, 10)


def check_prune_export_reload(name: str, kwargs: dict, tmp_path) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, 10, 3, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    macs0, params0 = count(model, x)
    prune_step(model, x, StructuredOptions(), 0.3, 10)
    macs1, params1 = count(model, x)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    assert params1 < 0.8 * params0 and macs1 < 0.8 * macs0, (params0, params1, macs0, macs1)
    assert torch.isfinite(out).all()
    # the exported graph computes what the pruned PyTorch model computes
    onnx_path = tmp_path / "pruned.onnx"
    export_onnx(model, x, onnx_path, opset=18)
    p = parity(model, onnx_path, x)
    assert p["max_abs_diff"] <= 1e-3 * max(1.0, p["max_abs_logit"]), p
    weights, _ = onnx_weight_counts(onnx_path)
    assert weights <= params1 < 0.8 * params0  # the file holds the shrunken tensors (BN folded away)
    # a fresh, unpruned model takes the pruned checkpoint's shapes and gives the same outputs
    ckpt = tmp_path / "pruned.pt"
    save_model(model, ckpt, name=name, kwargs=kwargs, num_classes=10, in_channels=3, pruned=True)
    fresh = build_model(name, 10, 3, **kwargs).eval()
    state, pruned = read_checkpoint(ckpt, "student", "test")
    load_weights(fresh, state, pruned=pruned, field="test")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out)
    return model
