"""Raw MSN checkpoints (.pth.tar): converted on load to ViTMSN, checked against MSN's own ViT forward written out
here from facebookresearch/msn src/deit.py; never unpickling code; unknown keys refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowshot
from lowshot.errors import ModelLoadError
from lowshot.models.backbones import load_backbone, resolve_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)

WIDTH, DEPTH, HEADS, PATCH, GRID = 192, 2, 3, 16, 14  # deit_tiny's width and heads, 2 blocks, 224 px



def msn_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under MSN's names (LayerNorm weights random too, so a wrong mapping or eps shows)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    state = {"cls_token": r(1, 1, WIDTH, scale=1), "pos_embed": r(1, GRID * GRID + 1, WIDTH, scale=0.5),
             "patch_embed.proj.weight": r(WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": r(WIDTH),
             "norm.weight": 1 + r(WIDTH, scale=0.2), "norm.bias": r(WIDTH)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        state |= {b + "norm1.weight": 1 + r(WIDTH, scale=0.2), b + "norm1.bias": r(WIDTH),
                  b + "attn.qkv.weight": r(3 * WIDTH, WIDTH), b + "attn.qkv.bias": r(3 * WIDTH),
                  b + "attn.proj.weight": r(WIDTH, WIDTH), b + "attn.proj.bias": r(WIDTH),
                  b + "norm2.weight": 1 + r(WIDTH, scale=0.2), b + "norm2.bias": r(WIDTH),
                  b + "mlp.fc1.weight": r(4 * WIDTH, WIDTH), b + "mlp.fc1.bias": r(4 * WIDTH),
                  b + "mlp.fc2.weight": r(WIDTH, 4 * WIDTH), b + "mlp.fc2.bias": r(WIDTH)}
    return state


def save_msn_checkpoint(path, state: dict[str, torch.Tensor]) -> str:
    """As MSN's msn_train.py saves it: DDP 'module.' names, the projection head, other training state."""
    encoder = {f"module.{k}": v for k, v in state.items()}
    encoder |= {"module.fc.fc1.weight": torch.zeros(8, WIDTH), "module.fc.bn1.running_mean": torch.zeros(8),
                "module.fc.bn1.num_batches_tracked": torch.tensor(3)}
    torch.save({"encoder": encoder, "target_encoder": encoder, "prototypes": torch.zeros(4, 8), "epoch": 300,
                "lr": 0.001}, path)
    return str(path)


def msn_forward(state: dict[str, torch.Tensor], x: torch.Tensor, *, n_blocks: int = 1) -> torch.Tensor:
    """MSN's VisionTransformer.forward_blocks (src/deit.py): the CLS of the last blocks, before the final norm."""
    h = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([state["cls_token"].expand(len(x), -1, -1), h], dim=1) + state["pos_embed"]
    n, t, d = h.shape
    out = []
    for i in range(DEPTH):
        b = f"blocks.{i}."
        y = F.layer_norm(h, (d,), state[b + "norm1.weight"], state[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(n, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // HEADS) ** -0.5).softmax(dim=-1)
        h = h + F.linear((attn @ v).transpose(1, 2).reshape(n, t, d), state[b + "attn.proj.weight"],
                         state[b + "attn.proj.bias"])
        y = F.layer_norm(h, (d,), state[b + "norm2.weight"], state[b + "norm2.bias"], eps=1e-6)
        h = h + F.linear(F.gelu(F.linear(y, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"])),
                         state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
        if DEPTH - i <= n_blocks:
            out.append(h[:, 0])
    return torch.cat(out, dim=-1)


@pytest.mark.parametrize("engine", ["fast", "stock"])
def test_an_msn_checkpoint_gives_the_features_of_msns_own_vit(tmp_path, engine):
    state = msn_state()
    path = save_msn_checkpoint(tmp_path / "vits16_800ep.pth.tar", state)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 224, 224)
    backbone = load_backbone(path, device="cpu", dtype="float32", engine=engine)
    assert backbone.info["source"] == "msn-checkpoint" and backbone.engine == engine
    torch.testing.assert_close(backbone.embed(x), msn_forward(state, x), atol=2e-5, rtol=1e-4)
    normed = F.layer_norm(msn_forward(state, x), (WIDTH,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    postnorm = load_backbone(path, device="cpu", dtype="float32", engine=engine, readout="cls-postnorm")
    torch.testing.assert_close(postnorm.embed(x), normed, atol=2e-5, rtol=1e-4)


def test_the_checkpoint_identity_is_its_content_and_extraction_caches_it(tmp_path, image_data):
    a = save_msn_checkpoint(tmp_path / "a.pth.tar", msn_state(0))
    b = save_msn_checkpoint(tmp_path / "b.pth.tar", msn_state(1))
    assert resolve_model(a).identity != resolve_model(b).identity
    first = lowshot.extract_features(a, str(image_data), cache_dir=tmp_path / "cache", device="cpu", dtype="float32")
    again = lowshot.extract_features(a, str(image_data), cache_dir=tmp_path / "cache", device="cpu", dtype="float32")
    assert not first.train.cached and again.train.cached and first.train.features.dim == WIDTH


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth.tar"
    torch.save({"target_encoder": {"module.cls_token": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(ModelLoadError, match="refused, the file holds more than tensors") as info:
        resolve_model(str(path))
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_unknown_keys_and_non_msn_files_are_one_line_errors(tmp_path):
    state = msn_state() | {"blocks.0.attn.extra.weight": torch.zeros(2)}
    odd = save_msn_checkpoint(tmp_path / "odd.pth.tar", state)
    with pytest.raises(ModelLoadError, match=r"unknown keys in the MSN encoder \(blocks.0.attn.extra.weight\)"):
        load_backbone(odd, device="cpu", dtype="float32")
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(ModelLoadError, match="not an MSN checkpoint .*found state_dict"):
        resolve_model(str(other))
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint"):
        resolve_model(str(garbage))
