import json

import pytest
import torch
from transformers import ViTMSNModel

from lowshot.errors import BadInputError, ModelLoadError
from lowshot.models import backbones
from lowshot.models.backbones import load_backbone, resolve_dtype, resolve_model
from lowshot.models.readouts import CLS_POSTNORM


def test_prenorm_feature_is_the_last_hidden_state_cls_before_the_final_layernorm(tiny_model):
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 224, 224)
    stock = ViTMSNModel.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        out = stock(pixel_values=pixels, output_hidden_states=True)
    got = load_backbone(str(tiny_model), device="cpu", dtype="float32").embed(pixels)
    torch.testing.assert_close(got, out.hidden_states[-1][:, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, out.last_hidden_state[:, 0], atol=1e-3)  # really before the LayerNorm


def test_postnorm_feature_is_last_hidden_state_cls(tiny_model):
    pixels = torch.randn(2, 3, 224, 224)
    stock = ViTMSNModel.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        expected = stock(pixel_values=pixels).last_hidden_state[:, 0]
    got = load_backbone(str(tiny_model), device="cpu", dtype="float32", readout=CLS_POSTNORM).embed(pixels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hub_id_offline_and_not_cached_is_one_clear_error():
    with pytest.raises(ModelLoadError, match="offline .* not in the local Hugging Face cache"):
        resolve_model("facebook/vit-msn-small-does-not-exist")


def test_folder_without_config_and_missing_folder_are_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_model(str(tmp_path / "nope"))


def test_a_text_model_is_refused_as_not_a_vision_backbone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ModelLoadError, match="BertConfig is not a vision model"):
        resolve_model(str(tmp_path))


def test_weights_identity_changes_with_the_weights(tmp_path):
    from .conftest import save_random_msn

    a = resolve_model(str(save_random_msn(tmp_path / "a", seed=0))).identity
    b = resolve_model(str(save_random_msn(tmp_path / "b", seed=1))).identity
    a2 = resolve_model(str(save_random_msn(tmp_path / "a2", seed=0))).identity
    assert a != b and a == a2


def test_dtype_auto_uses_bfloat16_only_with_native_cpu_support(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(backbones, "cpu_flags", lambda: {"avx512f", "avx2"})
    assert resolve_dtype("auto", cpu)[0] == torch.float32
    monkeypatch.setattr(backbones, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert resolve_dtype("auto", cpu)[0] == torch.bfloat16
    assert resolve_dtype("float16", cpu)[0] == torch.float16
    with pytest.raises(BadInputError, match="--dtype 'int8'"):
        resolve_dtype("int8", cpu)


@pytest.mark.parametrize(("forced", "expected"), [("", torch.float32), ("avx512_bf16", torch.bfloat16),
                                                  ("avx2,amx_bf16", torch.bfloat16), ("avx512f avx2", torch.float32)])
def test_lowshot_cpu_flags_forces_the_detection_either_way(monkeypatch, forced, expected):
    monkeypatch.setenv("LOWSHOT_CPU_FLAGS", forced)
    assert resolve_dtype("auto", torch.device("cpu"))[0] == expected


def test_bfloat16_features_stay_close_to_float32(tiny_model):
    pixels = torch.randn(4, 3, 224, 224)
    fp32 = load_backbone(str(tiny_model), device="cpu", dtype="float32").embed(pixels)
    bf16 = load_backbone(str(tiny_model), device="cpu", dtype="bfloat16").embed(pixels)
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99


def test_dtype_auto_runs_the_stock_engine_in_float32_even_on_a_bf16_cpu(tiny_model, monkeypatch):
    from lowshot.models.backbones import plan_forward

    monkeypatch.setenv("LOWSHOT_CPU_FLAGS", "avx512_bf16 amx_bf16")
    ref = resolve_model(str(tiny_model))
    fast = plan_forward(ref, engine="auto", device="cpu", dtype="auto")
    stock = plan_forward(ref, engine="stock", device="cpu", dtype="auto")
    other_readout = plan_forward(ref, readout="avgpool", engine="auto", device="cpu", dtype="auto")
    assert (fast.engine, fast.dtype) == ("fast", torch.bfloat16)
    assert (stock.engine, stock.dtype) == ("stock", torch.float32) and "stock engine runs float32" in stock.dtype_reason
    assert (other_readout.engine, other_readout.dtype) == ("stock", torch.float32)
    assert plan_forward(ref, engine="stock", device="cpu", dtype="bfloat16").dtype == torch.bfloat16  # on request
