"""The fast forward (lowshot.models.engine) against the stock transformers forward it replaces, and the fallback."""

import numpy as np
import pytest
import torch

from lowshot.data.transforms import msn_transform
from lowshot.errors import ModelLoadError
from lowshot.models import backbones
from lowshot.models.backbones import choose_forward_batch, load_backbone
from lowshot.models.engine import unsupported_reason
from lowshot.models.readouts import CLS_POSTNORM, CLS_PRENORM

from .conftest import DEIT_TINY, IMAGENETTE, require_shared, save_random_msn


def save_random(path, kind, **overrides):
    """A small random ViT-family model whose weights are not near zero (ViTMSN initialises CLS/positions to 0)."""
    import transformers as t

    torch.manual_seed(3)
    shape = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=224,
                 patch_size=16) | overrides
    if kind == "deit":
        model = t.DeiTModel(t.DeiTConfig(**shape), add_pooling_layer=False)
    elif kind == "dinov2":
        model = t.Dinov2Model(t.Dinov2Config(**shape))
    elif kind == "dinov2-registers":
        model = t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(**shape))
    elif kind == "clip":
        model = t.CLIPVisionModel(t.CLIPVisionConfig(**shape))
    elif kind == "beit":
        model = t.BeitModel(t.BeitConfig(**shape), add_pooling_layer=False)
    else:
        model = t.ViTModel(t.ViTConfig(**shape), add_pooling_layer=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return path


def real_pixels(n=6):
    require_shared()
    return msn_transform().load(sorted((IMAGENETTE / "val").glob("*/*.JPEG"))[:: 400][:n])


def both(path, feature, **kw):
    fast = load_backbone(str(path), device="cpu", dtype="float32", readout=feature, **kw)
    stock = load_backbone(str(path), device="cpu", dtype="float32", readout=feature, engine="stock")
    assert (fast.engine, stock.engine) == ("fast", "stock")
    return fast, stock


def assert_agree(a, b, *, atol):
    cos = torch.nn.functional.cosine_similarity(a, b)
    assert cos.min() > 0.9999, cos
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("feature", [CLS_PRENORM, CLS_POSTNORM])
def test_fast_path_equals_stock_on_a_random_vitmsn(tiny_model, feature):
    fast, stock = both(tiny_model, feature)
    pixels = torch.randn(5, 3, 224, 224)
    assert_agree(fast.embed(pixels), stock.embed(pixels), atol=1e-5)


@pytest.mark.parametrize("kind,overrides", [
    ("deit", {}),  # CLS + distillation token
    ("vit", {"hidden_act": "gelu_pytorch_tanh", "qkv_bias": False}),
    ("vit", {"hidden_act": "gelu_new", "num_hidden_layers": 1}),  # the last block is also the first
    ("clip", {}),  # pre-norm, quick-GELU, post_layernorm as the final norm
    ("clip", {"hidden_act": "gelu"}),
])
def test_fast_path_equals_stock_on_other_vit_layouts(tmp_path, kind, overrides):
    path = save_random(tmp_path / kind, kind, **overrides)
    pixels = torch.randn(4, 3, 224, 224)
    for feature in (CLS_PRENORM, CLS_POSTNORM):
        fast, stock = both(path, feature)
        assert_agree(fast.embed(pixels), stock.embed(pixels), atol=1e-4)


DINOV2 = {"patch_size": 14, "image_size": 518}  # trained at 518 px, run at 224: positions interpolated by the model


@pytest.mark.parametrize("kind,overrides", [
    ("dinov2", DINOV2),
    ("dinov2", {**DINOV2, "use_swiglu_ffn": True}),  # SwiGLU MLP (DINOv2 giant's)
    ("dinov2-registers", {**DINOV2, "num_register_tokens": 4}),
])
def test_fast_path_equals_stock_on_dinov2_layouts(tmp_path, kind, overrides):
    """Layer scales (random here, not 1) folded into the weights, SwiGLU, registers, interpolated positions."""
    path = save_random(tmp_path / kind, kind, **overrides)
    pixels = torch.randn(3, 3, 224, 224)
    for feature in (CLS_PRENORM, CLS_POSTNORM):
        fast, stock = both(path, feature)
        a, b = fast.embed(pixels), stock.embed(pixels)
        assert torch.nn.functional.cosine_similarity(a, b).min() >= 0.99999
        assert_agree(a, b, atol=1e-4)


@pytest.mark.slow
def test_fast_path_equals_stock_on_real_deit_tiny_and_real_photos():
    pixels = real_pixels()
    fast, stock = both(DEIT_TINY, CLS_PRENORM)
    assert_agree(fast.embed(pixels), stock.embed(pixels), atol=1e-4)


# Imagenette photos whose DeiT-Tiny features move most when the pixels are rounded to bfloat16 (cosine 0.997 to
# float32: found by benchmarks/fidelity.py-style scan of 1,300 photos); the fast path must keep float32 pixels.
SENSITIVE = ("val/n02979186/n02979186_10402.JPEG", "train/n03445777/ILSVRC2012_val_00035918.JPEG",
             "val/n03445777/ILSVRC2012_val_00025591.JPEG", "train/n03445777/ILSVRC2012_val_00007755.JPEG")


@pytest.mark.slow
def test_bfloat16_fast_path_stays_within_cosine_0999_of_float32_on_real_deit_tiny():
    require_shared()
    pixels = torch.cat([msn_transform().load(IMAGENETTE / name for name in SENSITIVE), real_pixels(4)])
    reference = load_backbone(str(DEIT_TINY), device="cpu", dtype="float32", engine="stock").embed(pixels)
    bf16 = load_backbone(str(DEIT_TINY), device="cpu", dtype="bfloat16")
    assert bf16.engine == "fast"
    assert torch.nn.functional.cosine_similarity(bf16.embed(pixels), reference).min() >= 0.9995


def test_unsupported_models_fall_back_to_the_stock_path(tmp_path):
    beit = save_random(tmp_path / "beit", "beit")
    relu = save_random(tmp_path / "relu", "vit", hidden_act="relu")
    for path, why in ((beit, "BeitModel"), (relu, "activation 'relu'")):
        backbone = load_backbone(str(path), device="cpu", dtype="float32")
        assert backbone.engine == "stock" and why in backbone.engine_reason
        assert backbone.embed(torch.randn(2, 3, 224, 224)).shape == (2, 48)
        with pytest.raises(ModelLoadError, match="--engine fast"):
            load_backbone(str(path), device="cpu", dtype="float32", engine="fast")


def test_a_changed_module_layout_is_detected_not_guessed(tiny_model):
    backbone = load_backbone(str(tiny_model), device="cpu", dtype="float32", engine="stock")
    assert unsupported_reason(backbone.model) is None
    del backbone.model.layers[0].mlp.fc1
    assert "fc1" in unsupported_reason(backbone.model)


def test_images_of_another_size_go_to_the_stock_path(tiny_model, monkeypatch):
    backbone = load_backbone(str(tiny_model), device="cpu", dtype="float32")
    calls = []
    monkeypatch.setattr(backbone, "stock_forward", lambda pixels: calls.append(pixels.shape) or pixels[:, 0, 0, :32])
    backbone.embed(torch.randn(1, 3, 224, 224))
    assert calls == []
    backbone.embed(torch.randn(1, 3, 192, 192))
    assert calls == [(1, 3, 192, 192)]


def test_forward_batch_is_split_and_results_do_not_depend_on_it(tiny_model):
    backbone = load_backbone(str(tiny_model), device="cpu", dtype="float32")
    pixels = torch.randn(7, 3, 224, 224)
    backbone.forward_batch = 7
    whole = backbone.embed(pixels)
    backbone.forward_batch = 3
    torch.testing.assert_close(backbone.embed(pixels), whole, atol=1e-5, rtol=1e-5)


def test_large_token_models_get_a_bounded_forward_batch(tmp_path):
    patch4 = save_random_msn(tmp_path / "p4", hidden=32, layers=1, image_size=224, patch_size=4)
    backbone = load_backbone(str(patch4), device="cpu", dtype="float32")
    assert backbone.engine == "fast" and backbone.fast.tokens == 3137
    assert backbone.forward_batch == 1  # CPU_ROWS_PER_FORWARD // 3,137 tokens
    assert backbone.embed(torch.randn(3, 3, 224, 224)).shape == (3, 32)

    class Config:  # ViT-L/7 and ViT-B/4 shapes, on a GPU: only the activation budget bounds the batch
        def __init__(self, hidden, layers, inter):
            self.hidden_size, self.num_hidden_layers, self.intermediate_size = hidden, layers, inter

    for (hidden, layers, inter), tokens in (((1024, 24, 4096), 1025), ((768, 12, 3072), 3137)):
        net = type("Net", (), {"config": Config(hidden, layers, inter)})()
        for stock in (False, True):
            n = choose_forward_batch(net, tokens=tokens, device=torch.device("cuda"), dtype=torch.float32,
                                     stock=stock)
            width = 7 * hidden + inter + ((layers + 1) * hidden if stock else 0)
            assert n >= 1 and n * tokens * width * 4 <= backbones.MAX_ACTIVATION_BYTES


def test_engine_is_recorded_and_a_rerun_with_the_other_engine_is_a_cache_hit(tiny_model, image_data, cache_dir):
    import lowshot

    def run(engine):
        return lowshot.extract_features(str(tiny_model), str(image_data), cache_dir=cache_dir, device="cpu",
                                        batch_size=4, engine=engine, dtype="float32")  # auto: stock means float32

    first = run("auto")
    assert first.settings["engine"] == "fast" and first.train.features.manifest["engine"] == "fast"
    again = run("stock")
    assert again.train.cached and again.test.cached
    assert again.settings["engine"] == "fast"  # the engine that computed the stored features


def test_a_patch4_model_extracts_with_bounded_forward_batches(tmp_path, image_data, cache_dir):
    import lowshot

    patch4 = save_random_msn(tmp_path / "p4", hidden=32, layers=1, patch_size=4)
    run = lowshot.extract_features(str(patch4), str(image_data), cache_dir=cache_dir, device="cpu", batch_size=8)
    manifest = run.train.features.manifest
    assert (manifest["engine"], manifest["forward_batch"]) == ("fast", 1)
    assert run.train.features.features.shape == (18, 32) and np.isfinite(run.train.features.features).all()
