"""The zoo: a tiny random-init model of every supported family (tests/zoo.py), each readout checked against the
model's own transformers forward, spelled out here family by family; determinism, precision and resolution."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import lowshot
from lowshot.errors import BadInputError
from lowshot.models.backbones import load_backbone
from lowshot.models.readouts import READOUTS

from . import zoo
from .conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)

PREFIX = {"deit": 2, "dinov2-registers": 5, "siglip-vision": 0, "siglip-full": 0, "swin": 0}  # before the patches
# Readouts each family gives (the rest must be refused in one line): the README table says the same.
CLS_READOUTS = {"cls-prenorm", "cls-postnorm", "avgpool", "cls+avgpool", "last4-cls"}
GIVES = {
    **{name: CLS_READOUTS for name in ("vit", "vit-msn", "deit", "vit-384", "vit-mae")},
    "vit-patch8": CLS_READOUTS - {"last4-cls"},  # 2 blocks
    **{name: CLS_READOUTS | {"pooled"} for name in ("dinov2", "dinov2-registers", "clip-vision", "clip-full",
                                                    "beit", "data2vec-vision")},
    **{name: {"avgpool", "pooled"} for name in ("siglip-vision", "siglip-full", "swin")},
    "convnext": {"pooled"},
}
DEFAULT = {name: "cls-prenorm" if "cls-prenorm" in gives else "pooled" for name, gives in GIVES.items()}



@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def reference(name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each readout computed straight from the transformers model's own outputs, family by family."""
    net = zoo.build(name)
    if name.endswith("-full"):
        net = net.vision_model  # the vision tower of a two-tower model
    kwargs = {}
    if name == "vit-384":
        kwargs["interpolate_pos_encoding"] = True
    if name == "vit-mae":  # masking off: keep every patch, in order
        net.config.mask_ratio = 0.0
        kwargs["noise"] = torch.arange(196, dtype=torch.float32).expand(len(x), -1)
    with torch.no_grad():
        out = net(pixel_values=x, output_hidden_states=True, **kwargs)
        if name == "convnext":
            return {"pooled": out.pooler_output.flatten(1)}
        hs, last = out.hidden_states, out.last_hidden_state
        p = PREFIX.get(name, 1)
        if name in ("siglip-vision", "siglip-full", "swin"):
            return {"avgpool": last.mean(1), "pooled": out.pooler_output}
        norm = net.post_layernorm if name.startswith("clip") else net.layernorm
        tokens = norm(last) if name.startswith("clip") else last  # CLIP normalises only its pooled CLS
        ref = {"cls-prenorm": hs[-1][:, 0], "cls-postnorm": tokens[:, 0], "avgpool": tokens[:, p:].mean(1),
               "last4-cls": torch.cat([norm(h)[:, 0] for h in hs[-4:]], dim=1)}
        ref["cls+avgpool"] = torch.cat([ref["cls-postnorm"], ref["avgpool"]], dim=1)
        if getattr(out, "pooler_output", None) is not None:
            ref["pooled"] = out.pooler_output
    return ref


@pytest.mark.parametrize("name", zoo.FAMILIES)
def test_every_readout_matches_the_families_own_forward_and_the_rest_are_refused(name, zoo_dir):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 224, 224)
    ref = reference(name, x)
    path = zoo.save(name, zoo_dir)
    assert set(ref) >= GIVES[name]
    for readout in READOUTS:
        if readout not in GIVES[name]:
            with pytest.raises(BadInputError, match=re.escape(f"--readout {readout}: ") + ".*offers"):
                load_backbone(str(path), device="cpu", dtype="float32", readout=readout)
            continue
        backbone = load_backbone(str(path), device="cpu", dtype="float32", readout=readout)
        got = backbone.embed(x)
        assert backbone.dim == got.shape[1] == ref[readout].shape[1]
        torch.testing.assert_close(got, ref[readout], atol=2e-5, rtol=1e-4, msg=f"{name} {readout}")
    assert load_backbone(str(path), device="cpu", dtype="float32").readout_name == DEFAULT[name]


def test_clip_postnorm_and_beit_postnorm_say_what_they_equal(zoo_dir):
    clip = load_backbone(str(zoo.save("clip-vision", zoo_dir)), device="cpu", dtype="float32",
                         readout="cls-postnorm")
    beit = load_backbone(str(zoo.save("beit", zoo_dir)), device="cpu", dtype="float32", readout="cls-postnorm")
    assert clip.readout.same_as is None  # post_layernorm applied: no longer the pre-norm CLS
    assert beit.readout.same_as.startswith("cls-prenorm")  # mean pooling: BEiT has no final norm on the tokens
    x = torch.randn(1, 3, 224, 224)
    prenorm = load_backbone(str(zoo.save("clip-vision", zoo_dir)), device="cpu", dtype="float32").embed(x)
    assert not torch.allclose(clip.embed(x), prenorm, atol=1e-3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("photos") / "mini", classes=2, train=2, test=2)


@pytest.mark.parametrize("name", zoo.FAMILIES)
def test_two_extractions_into_fresh_caches_agree(name, zoo_dir, photos, tmp_path):
    path = zoo.save(name, zoo_dir)
    runs = [lowshot.extract_features(str(path), str(photos), cache_dir=tmp_path / f"cache{i}", device="cpu",
                                     dtype="float32", batch_size=4, all_images=True) for i in range(2)]
    for a, b in zip(runs[0].splits(), runs[1].splits(), strict=True):
        assert not a.cached and not b.cached
        assert np.abs(np.asarray(a.features.features) - np.asarray(b.features.features)).max() <= 1e-6


def test_vit_mae_masking_is_off_and_recorded(zoo_dir, photos, tmp_path):
    run = lowshot.extract_features(str(zoo.save("vit-mae", zoo_dir)), str(photos), cache_dir=tmp_path, device="cpu",
                                   dtype="float32", all_images=True)
    assert run.settings["readout"]["masking"].startswith("off")
    assert run.train.features.manifest["readout"]["masking"].startswith("off")
    assert len(run.train.features) == 4  # every image, all 196 patches seen (the reference test checks the values)


def test_a_384px_model_runs_at_224_with_interpolated_positions_in_the_key(zoo_dir, photos, tmp_path):
    run = lowshot.extract_features(str(zoo.save("vit-384", zoo_dir)), str(photos), cache_dir=tmp_path, device="cpu",
                                   dtype="float32", all_images=True)
    readout = run.settings["readout"]
    assert (readout["input_size"], readout["native_size"]) == (224, 384)
    assert readout["position_embeddings"].startswith("interpolated")
    assert run.settings["engine"] == "stock"  # the fast engine runs only at the model's own size
    assert np.isfinite(np.asarray(run.train.features.features)).all()
    results = lowshot.run_probe(run.train.features, run.test.features, shots=(1,), percents=(), seeds=1)
    assert results.meta["readout"] == readout  # the results say how the features were read out


@pytest.mark.parametrize("name", ["vit", "deit", "clip-vision", "beit", "dinov2", "vit-mae", "siglip-vision", "swin",
                                  "convnext"])
def test_dtype_auto_keeps_every_feature_within_cosine_0999_of_float32_on_a_bf16_cpu(name, zoo_dir, monkeypatch):
    from lowshot.data.transforms import msn_transform

    from .conftest import IMAGENETTE

    monkeypatch.setenv("LOWSHOT_CPU_FLAGS", "avx512_bf16 amx_bf16")  # what --dtype auto sees on an AMX machine
    files = sorted(IMAGENETTE.glob("val/*/*.JPEG"))[::400][:8]
    pixels = msn_transform().load(files)
    path = str(zoo.save(name, zoo_dir))
    auto = load_backbone(path, device="cpu", dtype="auto")
    reference = load_backbone(path, device="cpu", dtype="float32", engine="stock")
    got, ref = auto.embed(pixels), reference.embed(pixels)
    centre = ref.mean(dim=0, keepdim=True)  # random-init features share a large common part: take it out too
    for a, b in ((got, ref), (got - centre, ref - centre)):
        cosine = torch.nn.functional.cosine_similarity(a, b)
        assert cosine.min() >= 0.999, (name, auto.engine, auto.dtype, cosine.min())
    expected = torch.bfloat16 if auto.engine == "fast" else torch.float32
    assert auto.dtype == expected, auto.dtype_reason
