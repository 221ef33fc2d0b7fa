"""Raw MSN checkpoints (``.pth.tar`` as facebookresearch/msn releases them), converted on load to ``ViTMSNModel``.

The file holds a dict whose ``target_encoder`` is the state dict of MSN's DeiT-style ViT (``src/deit.py``), keys
prefixed with ``module.`` (DistributedDataParallel), plus the projection head ``fc.*`` used only in pre-training.
It is read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, never code. The
architecture is read off the tensor shapes; the head count, which no shape holds, from MSN's model table.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch

from lowshot.errors import ModelLoadError

CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt")
ENCODER_KEY = "target_encoder"  # MSN src/msn_train.py saves 'encoder', 'target_encoder', 'prototypes', 'opt', ...
# msn src/deit.py: deit_tiny 192 wide x 3 heads, deit_small 384 x 6, deit_base 768 x 12, deit_large 1024 x 16,
# deit_huge 1280 x 16 (head_dim 64 except huge's 80).
MSN_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
MSN_LAYER_NORM_EPS = 1e-6  # msn src/deit.py: norm_layer=partial(nn.LayerNorm, eps=1e-6)
CONVERSION = "msn-target-encoder/1"  # recorded in the model identity: bump if the mapping ever changes
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_BLOCK_KEYS = {  # MSN block parameter -> ViTMSN layer parameter (transformers 5.x names); qkv is split below
    "norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
    "attn.proj.weight": "attention.o_proj.weight", "attn.proj.bias": "attention.o_proj.bias",
    "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_TOP_KEYS = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
             "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
             "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_IGNORED = ("fc.",)  # MSN's projection head (fc1/bn1/fc2/bn2/fc3): pre-training only, not part of the backbone


def is_checkpoint(path: Path) -> bool:
    return path.is_file() and path.name.endswith(CHECKPOINT_SUFFIXES)


def file_identity(path: Path, *, memo: dict | None = None) -> dict:
    """The checkpoint's sha256 and the conversion's version: what decides the converted model's features.
    ``memo`` (path|size|mtime -> sha256, as for weight folders) saves re-hashing a file that did not change."""
    stat = path.stat()
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if memo is None or memo_key not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        if memo is None:
            return {"weights_sha256": {path.name: digest.hexdigest()}, "conversion": CONVERSION}
        memo[memo_key] = digest.hexdigest()
    return {"weights_sha256": {path.name: memo[memo_key]}, "conversion": CONVERSION}


def read_encoder(path: Path) -> dict[str, torch.Tensor]:
    """The target encoder's tensors, ``module.`` stripped, projection head dropped. Never unpickles code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip().split(" was not an allowed")[0] for line in str(exc).splitlines()
                       if "Unsupported global" in line), None)
        if detail is None:  # not a pickle of allowed types at all: a damaged or foreign file
            raise ModelLoadError(f"--model {path}: not a readable PyTorch checkpoint (torch.load weights_only=True "
                                 "could not unpickle it)") from exc
        raise ModelLoadError(f"--model {path}: refused, the file holds more than tensors ({detail}); torch.load "
                             "runs with weights_only=True and lowshot never runs code from a checkpoint") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ModelLoadError(f"--model {path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})") \
            from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(ENCODER_KEY), dict):
        top = ", ".join(sorted(map(str, checkpoint))[:8]) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ModelLoadError(f"--model {path}: not an MSN checkpoint (no '{ENCODER_KEY}' state dict; found {top})")
    state = {}
    for key, value in checkpoint[ENCODER_KEY].items():
        name = key.removeprefix("module.")
        if name.startswith(_IGNORED):
            continue
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"--model {path}: '{key}' in '{ENCODER_KEY}' is not a tensor")
        state[name] = value
    return state


def msn_config(state: dict[str, torch.Tensor], *, source: Path):
    """A ``ViTMSNConfig`` read off the tensor shapes (heads from ``MSN_HEADS``)."""
    from transformers import ViTMSNConfig

    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight") if k not in state]
    if missing:
        raise ModelLoadError(f"--model {source}: not a DeiT-style ViT encoder (missing {', '.join(missing)})")
    hidden = int(state["cls_token"].shape[-1])
    if hidden not in MSN_HEADS:
        raise ModelLoadError(f"--model {source}: width {hidden} is not one of MSN's ViTs "
                             f"({', '.join(map(str, MSN_HEADS))}); the head count cannot be known")
    layers = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    return ViTMSNConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=MSN_HEADS[hidden],
                        intermediate_size=int(state["blocks.0.mlp.fc1.weight"].shape[0]) if layers else 4 * hidden,
                        image_size=grid * patch, patch_size=patch, qkv_bias="blocks.0.attn.qkv.bias" in state,
                        layer_norm_eps=MSN_LAYER_NORM_EPS, hidden_act="gelu")


def convert(state: dict[str, torch.Tensor], config, *, source: Path) -> dict[str, torch.Tensor]:
    """MSN names -> ViTMSN names (qkv split into q/k/v); any key not accounted for is an error naming it."""
    hidden, out, unknown = config.hidden_size, {}, []
    for key, value in state.items():
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
        elif (m := _BLOCK.match(key)) and m.group(2) in _BLOCK_KEYS:
            out[f"layers.{m.group(1)}.{_BLOCK_KEYS[m.group(2)]}"] = value
        elif m and m.group(2) in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = m.group(2).rsplit(".", 1)[1]
            for part, name in zip(value.split(hidden), ("q_proj", "k_proj", "v_proj"), strict=True):
                out[f"layers.{m.group(1)}.attention.{name}.{kind}"] = part
        else:
            unknown.append(key)
    if unknown:
        raise ModelLoadError(f"--model {source}: unknown keys in the MSN encoder ({', '.join(sorted(unknown)[:5])}"
                             f"{' …' if len(unknown) > 5 else ''}); only the plain DeiT-style ViT is supported")
    return out


def load_msn(path: Path):
    """``(ViTMSNModel in float32, its config)`` from a raw MSN checkpoint."""
    from transformers import ViTMSNModel

    state = read_encoder(path)
    config = msn_config(state, source=path)
    net = ViTMSNModel(config)
    try:
        result = net.load_state_dict(convert(state, config, source=path), strict=False)
    except RuntimeError as exc:  # a shape that does not fit the architecture read off the other shapes
        raise ModelLoadError(f"--model {path}: the converted weights do not fit ViTMSN "
                             f"({str(exc).splitlines()[-1].strip()[:200]})") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(f"--model {path}: the converted weights do not fit ViTMSN (missing "
                             f"{', '.join(result.missing_keys[:5]) or 'none'}; unexpected "
                             f"{', '.join(result.unexpected_keys[:5]) or 'none'})")
    return net, config
