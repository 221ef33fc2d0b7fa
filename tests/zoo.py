"""A zoo of tiny random-init models, one per supported family, built here (never downloaded) and saved as
config.json + safetensors folders: for the readout, determinism, precision and fidelity checks."""

from __future__ import annotations

from pathlib import Path

TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 224, "patch_size": 16}
# ViT-S/16 widths (the facebook/vit-msn-small architecture), for benchmarks/fidelity.py: precision problems grow with
# width and depth, so the fidelity of each family is measured at a size people use.
VIT_S = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
         "image_size": 224, "patch_size": 16}
SWIN = {"tiny": {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2]},
        "vit-s": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24]}}  # Swin-T
CONVNEXT = {"tiny": {"num_stages": 2, "hidden_sizes": [8, 16], "depths": [1, 1]},
            "vit-s": {"num_stages": 4, "hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 9, 3]}}  # ConvNeXt-T


def _configs(size: str = "tiny") -> dict:
    import transformers as t

    SMALL = TINY if size == "tiny" else VIT_S  # noqa: N806 - the zoo's one size knob
    tower = dict(SMALL)
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "vocab_size": 99}
    return {
        "vit": lambda: t.ViTConfig(**SMALL),
        "vit-msn": lambda: t.ViTMSNConfig(**SMALL),
        "deit": lambda: t.DeiTConfig(**SMALL),
        "vit-patch8": lambda: t.ViTConfig(**{**SMALL, "patch_size": 8, "num_hidden_layers": 2}),
        "vit-384": lambda: t.ViTConfig(**{**SMALL, "image_size": 384}),
        "dinov2": lambda: t.Dinov2Config(**{**SMALL, "patch_size": 14, "image_size": 518}),
        "dinov2-registers": lambda: t.Dinov2WithRegistersConfig(**{**SMALL, "patch_size": 14, "image_size": 518},
                                                                num_register_tokens=4),
        "clip-vision": lambda: t.CLIPVisionConfig(**tower),
        "clip-full": lambda: t.CLIPConfig(vision_config=tower, text_config=text, projection_dim=16),
        "siglip-vision": lambda: t.SiglipVisionConfig(**tower),
        "siglip-full": lambda: t.SiglipConfig(vision_config=tower, text_config=text),
        "beit": lambda: t.BeitConfig(**SMALL),
        "data2vec-vision": lambda: t.Data2VecVisionConfig(**SMALL),
        "vit-mae": lambda: t.ViTMAEConfig(**SMALL),
        "swin": lambda: t.SwinConfig(image_size=224, patch_size=4, window_size=7, **SWIN[size]),
        "convnext": lambda: t.ConvNextConfig(**CONVNEXT[size]),
    }


FAMILIES = (
    "vit", "vit-msn", "deit", "vit-patch8", "vit-384", "dinov2", "dinov2-registers", "clip-vision", "clip-full",
    "siglip-vision", "siglip-full", "beit", "data2vec-vision", "vit-mae", "swin", "convnext")


def build(name: str, *, seed: int = 0, size: str = "tiny"):
    """The random-init transformers model of zoo entry ``name`` (the full two-tower model for *-full); ``size``:
    ``tiny`` (32 wide, 4 blocks: the tests) or ``vit-s`` (ViT-S/16 widths, Swin-T, ConvNeXt-T: the benchmark)."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    config = _configs(size)[name]()
    kwargs = {"add_pooling_layer": True} if config.model_type in ("beit", "data2vec-vision") else {}
    return AutoModel.from_config(config, **kwargs).eval()


def save(name: str, root: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Build zoo entry ``name`` and save it under ``root/name`` (config.json + model.safetensors)."""
    path = root / name
    if not (path / "config.json").is_file():
        build(name, seed=seed, size=size).save_pretrained(path)
    return path
