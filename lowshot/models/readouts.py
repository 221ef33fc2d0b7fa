"""Readouts: which vector of a backbone's output becomes an image's feature, for each model family.

A readout is named, resolved per family (where the CLS token is, how many prefix tokens precede the patches, which
module is the final norm, what the model's own pooled output is) and recorded in the cache key and the results.
Everything is computed from the transformers model's public outputs (``hidden_states``, ``last_hidden_state``,
``pooler_output``) plus the final-norm module, so it follows the model's own forward exactly.

- ``cls-prenorm``: the CLS token of the last block before the final norm (MSN ``logistic_eval.py``; the default
  where there is a CLS token).
- ``cls-postnorm``: the CLS token after the final norm (CLIP: ``post_layernorm``, which transformers applies only
  to the pooled output).
- ``avgpool``: the mean of the patch tokens after the final norm (DINO/DINOv2 linear evaluation); prefix tokens
  (CLS, DeiT's distillation token, DINOv2's registers) are left out.
- ``cls+avgpool``: ``cls-postnorm`` and ``avgpool`` concatenated (DINOv2 ``linear.py`` with ``use_avgpool``).
- ``last4-cls``: the CLS token of each of the last 4 blocks after the final norm, concatenated (DINOv2
  ``linear.py`` ``n_last_blocks=4``, whose ``get_intermediate_layers(norm=True)`` normalises each).
- ``pooled``: the model's own ``pooler_output`` (SigLIP's attention-pool head, Swin's average pool, ConvNeXt's
  normalised average pool; the default where there is no CLS token).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

CLS_PRENORM = "cls-prenorm"
CLS_POSTNORM = "cls-postnorm"
AVGPOOL = "avgpool"
CLS_AVGPOOL = "cls+avgpool"
LAST4_CLS = "last4-cls"
POOLED = "pooled"
AUTO = "auto"  # the family's default: cls-prenorm with a CLS token, pooled without one
READOUTS = (CLS_PRENORM, CLS_POSTNORM, AVGPOOL, CLS_AVGPOOL, LAST4_CLS, POOLED)
LAST_N_BLOCKS = 4  # DINOv2 eval/linear.py: n_last_blocks=4 for ViT-S/B
BUILT_IN = "interpolated (bicubic, built in)"  # DINOv2 interpolates its position embeddings to any input itself
READOUT_HELP = (
    "auto (the family's default: cls-prenorm with a CLS token, else pooled), cls-prenorm (CLS before the final "
    "norm, MSN), cls-postnorm, avgpool (mean of the normed patch tokens), cls+avgpool, last4-cls (normed CLS of the "
    "last 4 blocks, DINOv2), pooled (the model's own pooled output).")


@dataclass(frozen=True)
class Family:
    """How to read a family's outputs. ``norm``: the final norm's attribute; ``norm_in_output``: whether
    ``last_hidden_state`` already went through it (CLIP applies it to the pooled CLS only)."""

    name: str
    model_types: tuple[str, ...]
    cls: bool  # token 0 is a CLS token
    tokens: bool = True  # the output is a token sequence (False: a CNN feature map)
    prefix: int = 1  # tokens before the patch tokens (plus config.num_register_tokens where the config has it)
    norm: str | None = "layernorm"
    norm_in_output: bool = True
    pooled: str | None = None  # what pooler_output is (None: not offered)
    random_masking: bool = False  # ViTMAE: masks 75% of the patches at random unless switched off

    def prefix_tokens(self, config) -> int:
        return self.prefix + int(getattr(config, "num_register_tokens", 0) or 0)


FAMILIES = (
    Family("ViT", ("vit",), cls=True),
    Family("ViTMSN", ("vit_msn",), cls=True),
    Family("DeiT", ("deit",), cls=True, prefix=2),  # CLS, distillation token, patches
    Family("DINOv2", ("dinov2",), cls=True, pooled="the CLS token after the final norm"),
    Family("DINOv2 with registers", ("dinov2_with_registers",), cls=True,
           pooled="the CLS token after the final norm"),
    Family("CLIP vision", ("clip_vision_model",), cls=True, norm="post_layernorm", norm_in_output=False,
           pooled="the CLS token after post_layernorm"),
    Family("SigLIP vision", ("siglip_vision_model",), cls=False, prefix=0, norm="post_layernorm",
           pooled="the attention-pool head"),
    Family("BEiT", ("beit",), cls=True, pooled="the final norm of the mean patch token (mean pooling)"),
    Family("Data2Vec vision", ("data2vec-vision",), cls=True,
           pooled="the final norm of the mean patch token (mean pooling)"),
    Family("ViTMAE", ("vit_mae",), cls=True, random_masking=True),
    Family("Swin", ("swin",), cls=False, prefix=0, pooled="the average of the last stage's normed tokens"),
    Family("ConvNeXt", ("convnext",), cls=False, tokens=False, norm=None,
           pooled="the final LayerNorm of the global average pool"),
)
OTHER = Family("other vision model", (), cls=False, tokens=False, norm=None, pooled="the model's pooler_output")
TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}  # full two-tower folders: the vision tower


def family_of(model_type: str) -> Family:
    """The family of a (vision) config's ``model_type``; :data:`OTHER` for a vision model lowshot has no table for."""
    return next((f for f in FAMILIES if model_type in f.model_types), OTHER)


def offered(family: Family, config) -> dict[str, str | None]:
    """Each readout -> None where the model gives it, else why not (one line)."""
    no_cls = f"{family.name} has no CLS token"
    blocks = int(getattr(config, "num_hidden_layers", 0) or 0)
    pooled_missing = family.pooled is None or (family.name == "SigLIP vision"
                                                and not getattr(config, "vision_use_head", True))
    return {
        CLS_PRENORM: None if family.cls else no_cls,
        CLS_POSTNORM: None if family.cls else no_cls,
        AVGPOOL: None if family.tokens and family.norm else f"{family.name} gives no patch tokens",
        CLS_AVGPOOL: None if family.cls and family.tokens else no_cls,
        LAST4_CLS: (no_cls if not family.cls else None if blocks >= LAST_N_BLOCKS
                    else f"the model has {blocks} blocks, fewer than {LAST_N_BLOCKS}"),
        POOLED: f"{family.name} has no pooled output of its own" if pooled_missing else None,
    }


def default_readout(family: Family) -> str:
    return CLS_PRENORM if family.cls else POOLED


def same_as(family: Family, config, readout: str) -> str | None:
    """The other readout this one equals exactly for this model (None when it is distinct): said, not hidden."""
    beit_mean = family.name in ("BEiT", "Data2Vec vision") and getattr(config, "use_mean_pooling", True)
    if readout == CLS_POSTNORM and beit_mean:
        return f"{CLS_PRENORM} (with mean pooling {family.name} has no final norm on the tokens)"
    if readout == POOLED:
        if family.name in ("DINOv2", "DINOv2 with registers", "CLIP vision") or (
                family.name in ("BEiT", "Data2Vec vision") and not beit_mean):
            return f"{CLS_POSTNORM} ({family.name}'s pooled output is its normed CLS token)"
        if family.name == "Swin":
            return f"{AVGPOOL} (Swin's pooled output is the average of its normed tokens)"
    return None


@dataclass(frozen=True)
class ReadoutSpec:
    """A readout resolved for one model and input size: what is computed, recorded in the cache key and results."""

    name: str
    family: str
    input_size: int
    native_size: int | None
    position_embeddings: str  # "native", "interpolated (bicubic)" or "any size" (no absolute positions)
    masking: str = "none"  # ViTMAE: "off (mask_ratio 0, patch order kept)"
    same_as: str | None = None

    @property
    def interpolate(self) -> bool:
        return self.position_embeddings.startswith("interpolated")

    def key(self) -> dict:
        """The cache-key input: everything that changes the features (not ``same_as``, a note for people)."""
        return {"name": self.name, "family": self.family, "input_size": self.input_size,
                "native_size": self.native_size, "position_embeddings": self.position_embeddings,
                "masking": self.masking}

    def record(self) -> dict:
        """What results and manifests record: the key, and which other readout gives the same vector."""
        return {**self.key(), "same_as": self.same_as}


def native_size(config) -> int | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else None


def position_mode(family: Family, config, input_size: int, forward) -> str:
    """How the model meets an input size: its own, interpolated absolute position embeddings, or any size."""
    native = native_size(config)
    if family.name in ("Swin", "ConvNeXt"):
        return "any size"
    if native is None or native == input_size:
        return "native"
    if family.name.startswith("DINOv2"):
        return BUILT_IN
    if "interpolate_pos_encoding" in inspect.signature(forward).parameters:
        return "interpolated (bicubic)"
    return f"unsupported: trained at {native} px and no position-embedding interpolation"


def _norm(net: torch.nn.Module, family: Family) -> torch.nn.Module:
    module = getattr(net, family.norm, None)
    if module is None:  # transformers 4.x wrapped CLIP/SigLIP towers in .vision_model
        module = getattr(getattr(net, "vision_model", None), family.norm)
    return module


def run_readout(net: torch.nn.Module, family: Family, spec: ReadoutSpec, pixels: torch.Tensor) -> torch.Tensor:
    """The model's own forward on ``pixels``, read out as ``spec`` says: (N, dim)."""
    kwargs = {}
    if spec.interpolate and spec.position_embeddings != BUILT_IN:
        kwargs["interpolate_pos_encoding"] = True
    if family.random_masking:  # ViTMAE with mask_ratio 0 still shuffles the patches by random noise: sort by index
        patch = net.config.patch_size
        n_patches = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        kwargs["noise"] = torch.arange(n_patches, device=pixels.device, dtype=torch.float32).expand(len(pixels), -1)
    hidden = spec.name in (CLS_PRENORM, LAST4_CLS)
    out = net(pixel_values=pixels, output_hidden_states=hidden, **kwargs)
    name = spec.name
    if name == POOLED:
        return out.pooler_output.flatten(1)
    if name == CLS_PRENORM:
        return out.hidden_states[-1][:, 0]
    norm = _norm(net, family)
    if name == LAST4_CLS:
        return torch.cat([norm(h[:, :1])[:, 0] for h in out.hidden_states[-LAST_N_BLOCKS:]], dim=-1)
    tokens = out.last_hidden_state if family.norm_in_output else norm(out.last_hidden_state)
    cls = tokens[:, 0]
    if name == CLS_POSTNORM:
        return cls
    avg = tokens[:, family.prefix_tokens(net.config):].mean(dim=1)
    return avg if name == AVGPOOL else torch.cat([cls, avg], dim=-1)
