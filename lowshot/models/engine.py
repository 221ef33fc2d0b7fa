"""A lean inference forward for Hugging Face ViT-layout backbones (ViT, ViTMSN, DeiT, DINOv2 with or without
registers, CLIP's vision tower): same weights, same math.

The stock forward is kept as the reference and the fallback (``engine="stock"``); this one differs only in how the
work is scheduled, measured in ``benchmarks/extract_speed.py``:

- one fused QKV GEMM per block instead of three, attention through ``scaled_dot_product_attention``;
- on the CPU, oneDNN kernels with the weights pre-packed once, GELU fused into fc1 and the residual adds fused into
  the attention output projection and fc2 (no separate passes over the activations);
- in the last block only the CLS row goes through the query, attention output and MLP (every token still gives
  keys and values): the feature reads nothing else;
- in bfloat16/float16 only the blocks' linear layers and attention run in it; pixels, patch embedding, residual
  stream and LayerNorms stay in float32, so the features keep a cosine >= 0.999 to float32;
- no ``output_hidden_states`` bookkeeping;
- DINOv2: its layer scales are folded into the attention output and fc2 weights (diag(lambda) W, lambda b: the
  same products, no extra pass), SwiGLU's gate and up projections run as one GEMM, and the tokens come from the
  model's own embedding module (in float32), which interpolates its position embeddings to any input size;
- CLIP: its own embedding module and pre-norm (float32), quick-GELU after the fc1 product (no oneDNN post-op),
  ``post_layernorm`` as the final norm (``cls-postnorm``; ``cls-prenorm`` reads the CLS before it).

Anything else -- another architecture, an activation we do not fuse, a module layout this version of
``transformers`` does not have -- is reported by :func:`unsupported_reason` and runs on the stock path instead.
Agreement with the stock path is tested (``tests/test_fast_engine.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Layout:
    """Where a family keeps what the engine reads: the block list, each block's norms, attention and output
    projection names, DINOv2's layer scales, the final (and CLIP's pre-) norm, and how tokens are made: by the
    engine itself from the patch conv and prefix tokens (ViT, DeiT), or by the model's own embedding module
    (DINOv2, CLIP), which for DINOv2 interpolates the position embeddings to any input size."""

    blocks: str
    norms: tuple[str, str]
    attention: str
    output: str
    final_norm: str = "layernorm"
    pre_norm: str | None = None
    scales: tuple[str, str] | None = None
    own_embeddings: bool = False
    any_size: bool = False


VIT = Layout("layers", ("layernorm_before", "layernorm_after"), "attention", "o_proj")
DINOV2 = Layout("encoder.layer", ("norm1", "norm2"), "attention", "o_proj", scales=("layer_scale1", "layer_scale2"),
                own_embeddings=True, any_size=True)
CLIP = Layout("encoder.layers", ("layer_norm1", "layer_norm2"), "self_attn", "out_proj", final_norm="post_layernorm",
              pre_norm="pre_layrnorm", own_embeddings=True)
LAYOUTS = {"ViTModel": VIT, "ViTMSNModel": VIT, "DeiTModel": VIT, "Dinov2Model": DINOV2,
           "Dinov2WithRegistersModel": DINOV2, "CLIPVisionModel": CLIP}
SUPPORTED_CLASSES = tuple(LAYOUTS)
# The readouts this engine computes (the last block runs the CLS row only); any other runs on the stock forward.
FAST_READOUTS = ("cls-prenorm", "cls-postnorm")
# transformers' activation names -> oneDNN's GELU algorithm ("none" is the exact erf GELU, as nn.GELU()); CLIP's
# quick_gelu, x sigmoid(1.702 x), has no oneDNN post-op and runs after the product.
GELU_ALGORITHMS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "quick_gelu": "quick"}
PACKED_DTYPES = (torch.float32, torch.bfloat16)  # dtypes oneDNN's prepacked linear kernels take on the CPU


def _attr(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
    return obj


@dataclass(frozen=True)
class _Parts:
    """One block's modules, whatever the family calls them: pre-norms, attention projections, the MLP (fc1/fc2, or
    SwiGLU's gate/up/down) and DINOv2's layer scales (None: none)."""

    norm1: nn.LayerNorm
    norm2: nn.LayerNorm
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp: tuple[nn.Linear, ...]  # (fc1, fc2) or (gate, up, down)
    scale1: torch.Tensor | None = None
    scale2: torch.Tensor | None = None

    @property
    def swiglu(self) -> bool:
        return len(self.mlp) == 3


def _block_parts(net: nn.Module) -> list[_Parts] | str:
    """Every block's :class:`_Parts`, or why this layout is not one the engine knows."""
    layout = LAYOUTS[type(net).__name__]
    layers = _attr(net, layout.blocks)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return f"no '{layout.blocks}' list (a transformers version with another module layout)"
    found = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, layout.attention, None), getattr(layer, "mlp", None)
        norms = [getattr(layer, n, None) for n in layout.norms]
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", layout.output)]
        swiglu = layout.scales is not None and hasattr(mlp, "gate_proj")  # DINOv2's SwiGLU MLP
        mlp_names = ("gate_proj", "up_proj", "down_proj") if swiglu else ("fc1", "fc2")
        mlp_linears = [getattr(mlp, n, None) for n in mlp_names]
        if not all(isinstance(m, nn.Linear) for m in projections + mlp_linears) or \
                not all(isinstance(m, nn.LayerNorm) for m in norms):
            return (f"layer {i} does not have q/k/v_proj/{layout.output}, {'/'.join(mlp_names)} and "
                    f"{'/'.join(layout.norms)}")
        scales = [None, None]
        if layout.scales:
            scales = [_attr(layer, f"{n}.lambda1") for n in layout.scales]
            if not all(isinstance(t, torch.Tensor) for t in scales):
                return f"layer {i} does not have {'/'.join(layout.scales)}.lambda1"
        found.append(_Parts(*norms, *projections, tuple(mlp_linears), *scales))
    return found


def _heads(attn: nn.Module) -> tuple[int, int, float | None]:
    """(heads, head_dim, scaling) whatever the family names them."""
    heads = getattr(attn, "num_attention_heads", None) or getattr(attn, "num_heads", 0)
    return heads, getattr(attn, "head_dim", 0), getattr(attn, "scaling", getattr(attn, "scale", None))


def _patch_conv(net: nn.Module) -> nn.Module | None:
    emb = getattr(net, "embeddings", None)
    return _attr(emb, "patch_embeddings.projection") or getattr(emb, "patch_embedding", None)


def unsupported_reason(net: nn.Module) -> str | None:
    """Why the fast path cannot run ``net`` exactly (None when it can). Checks the layout, not just the name."""
    name = type(net).__name__
    if name not in LAYOUTS:
        return f"{name} is not one of {', '.join(SUPPORTED_CLASSES)}"
    layout, config = LAYOUTS[name], net.config
    parts = _block_parts(net)
    if isinstance(parts, str):
        return parts
    act = getattr(config, "hidden_act", None)
    if not all(p.swiglu for p in parts) and (not isinstance(act, str) or act not in GELU_ALGORITHMS):
        return f"activation {act!r} is not one of {', '.join(GELU_ALGORITHMS)}"
    proj = _patch_conv(net)
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.padding != (0, 0) \
            or proj.groups != 1 or proj.dilation != (1, 1):
        return "patch embedding is not a non-overlapping Conv2d"
    emb = net.embeddings
    if not layout.own_embeddings and (getattr(emb, "cls_token", None) is None
                                      or getattr(emb, "position_embeddings", None) is None):
        return "no CLS token or position embeddings"
    for norm in (layout.final_norm, layout.pre_norm):
        if norm is not None and not isinstance(getattr(net, norm, None), nn.LayerNorm):
            return f"no '{norm}' LayerNorm (a transformers version with another module layout)"
    hidden = config.hidden_size
    for i, (layer, p) in enumerate(zip(_attr(net, layout.blocks), parts, strict=True)):
        heads, head_dim, scaling = _heads(getattr(layer, layout.attention))
        if heads * head_dim != p.q.out_features or p.o.out_features != hidden:
            return f"layer {i}: attention shapes are not heads x head_dim"
        if abs((scaling if scaling is not None else head_dim ** -0.5) - head_dim ** -0.5) > 1e-12:
            return f"layer {i}: attention scaling is not 1/sqrt(head_dim)"
    return None


def _packable(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's prepacked linear runs here (CPU builds without it, or without the op for this dtype, use F.linear)."""
    if device.type != "cpu" or dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), 4)
        torch.ops.mkldnn._linear_pointwise(torch.ones(4, 8, dtype=dtype), w, None, "gelu", [], "none")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


class _Linear:
    """y = x W^T + b, optionally with GELU or a residual add fused in (oneDNN on the CPU, plain torch elsewhere)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, dtype: torch.dtype, packed: bool,
                 rows_hint: int):
        self.packed = packed
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        weight = weight.detach().to(dtype).contiguous()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint) if packed else weight

    def __call__(self, x: torch.Tensor, gelu: str | None = None) -> torch.Tensor:
        if gelu == "quick":  # CLIP's x sigmoid(1.702 x): after the product
            y = self(x)
            return y.mul_(torch.sigmoid(1.702 * y))
        if self.packed:
            if gelu is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], gelu)
        y = F.linear(x, self.weight, self.bias)
        return y if gelu is None else F.gelu(y, approximate=gelu)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x W^T + b: fused when the residual has the compute dtype, else added into the residual in
        place, in its dtype (the residual stream's own tensor; the same sums as ``residual + y``, without a
        converted copy of y and a new tensor per block)."""
        if residual.dtype != x.dtype:
            return residual.add_(self(x))
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), self.weight, self.bias, "add")
        return F.linear(x, self.weight, self.bias).add_(residual)


def _cat_bias(*linears: nn.Linear) -> torch.Tensor | None:
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device)
                      for b, m in zip(biases, linears, strict=True)])


class _Norm:
    """LayerNorm in the residual stream's dtype (float32 for reduced-precision compute), output in the compute dtype."""

    def __init__(self, norm: nn.LayerNorm, *, stream: torch.dtype, compute: torch.dtype):
        self.shape, self.eps, self.compute = norm.normalized_shape, norm.eps, compute
        self.weight = None if norm.weight is None else norm.weight.detach().to(stream).clone()
        self.bias = None if norm.bias is None else norm.bias.detach().to(stream).clone()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, self.shape, self.weight, self.bias, self.eps).to(self.compute)


def _scaled(linear: nn.Linear, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of ``scale * linear(x)``: a layer scale folded into the layer (float32, before any cast)."""
    weight, bias = linear.weight.detach().float(), None if linear.bias is None else linear.bias.detach().float()
    if scale is None:
        return weight, bias
    scale = scale.detach().float()
    return scale[:, None] * weight, None if bias is None else scale * bias


class _Block:
    def __init__(self, parts: _Parts, heads: int, head_dim: int, *, stream: torch.dtype, compute: torch.dtype,
                 packed: bool, rows_hint: int, last: bool):
        self.heads, self.head_dim = heads, head_dim
        self.norm1 = _Norm(parts.norm1, stream=stream, compute=compute)
        self.norm2 = _Norm(parts.norm2, stream=stream, compute=compute)
        linear = {"dtype": compute, "packed": packed, "rows_hint": rows_hint}
        q, k, v = parts.q, parts.k, parts.v
        if last:  # only the CLS row needs a query; every token needs a key and a value
            self.q = _Linear(q.weight, q.bias, **linear)
            self.kv = _Linear(torch.cat([k.weight, v.weight]), _cat_bias(k, v), **linear)
        else:
            self.qkv = _Linear(torch.cat([q.weight, k.weight, v.weight]), _cat_bias(q, k, v), **linear)
        self.out = _Linear(*_scaled(parts.o, parts.scale1), **linear)
        self.swiglu = parts.swiglu
        if self.swiglu:  # gate and up in one GEMM; silu(gate) * up in the compute dtype
            gate, up, down = parts.mlp
            self.fc1 = _Linear(torch.cat([gate.weight, up.weight]), _cat_bias(gate, up), **linear)
            self.fc2 = _Linear(*_scaled(down, parts.scale2), **linear)
        else:
            self.fc1 = _Linear(parts.mlp[0].weight, parts.mlp[0].bias, **linear)
            self.fc2 = _Linear(*_scaled(parts.mlp[1], parts.scale2), **linear)
        self.last = last

    def __call__(self, h: torch.Tensor, gelu: str) -> torch.Tensor:
        n, tokens, _ = h.shape
        y = self.norm1(h)
        if self.last:
            kv = self.kv(y).view(n, tokens, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q = self.q(y[:, :1].contiguous()).view(n, 1, self.heads, self.head_dim).transpose(1, 2)
            k, v = kv[0], kv[1]
            h = h[:, :1]
        else:
            qkv = self.qkv(y).view(n, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, q.shape[2], -1)
        h = self.out.add(a, h)
        if self.swiglu:
            gate, up = self.fc1(self.norm2(h)).chunk(2, dim=-1)
            return self.fc2.add(F.silu(gate).mul_(up), h)
        return self.fc2.add(self.fc1(self.norm2(h), gelu), h)


class FastEncoder:
    """The fast engine's forward for any ViT-layout encoder ``net`` (ViT, DeiT, DINOv2, CLIP's vision tower; see
    :func:`unsupported_reason`): ``(N, 3, H, W)`` -> CLS ``(N, hidden)``.

    ``dtype`` (default: the net's) is the compute dtype of the blocks' linear layers and attention. With bfloat16
    or float16 the pixels, the patch embedding (about 1% of the work), the residual stream, the LayerNorms and the
    feature stay in float32: rounding the pixels to bfloat16 alone moves CLS features measurably (as stock bf16
    autocast does, which rounds them too). Build it from the float32
    net to keep those parameters exact; pass float32 pixels.
    ``rows_hint`` (images x tokens per forward) only tunes oneDNN's weight packing; any batch size works."""

    def __init__(self, net: nn.Module, *, dtype: torch.dtype | None = None, rows_hint: int = 64 * 197):
        reason = unsupported_reason(net)
        if reason is not None:
            raise ValueError(f"the fast path does not cover this model: {reason}")
        layout = LAYOUTS[type(net).__name__]
        emb = net.embeddings
        conv = _patch_conv(net)
        self.device = conv.weight.device
        self.dtype = dtype or conv.weight.dtype
        self.stream = torch.float32 if self.dtype in (torch.bfloat16, torch.float16) else self.dtype
        self.packed = _packable(self.device, self.dtype)
        size = net.config.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.any_size = layout.any_size
        patches = (self.image_size[0] // conv.stride[0]) * (self.image_size[1] // conv.stride[1])
        if layout.own_embeddings:  # the model's own module (float32 copy): DINOv2 interpolates, adds registers
            self.embeddings = copy.deepcopy(emb).to(self.stream)
            self.tokens = patches + 1 + int(getattr(net.config, "num_register_tokens", 0) or 0)
        else:  # conv + prefix tokens + positions, native size only
            self.embeddings = None
            self.patch_weight = conv.weight.detach().to(self.stream).clone()
            self.patch_bias = None if conv.bias is None else conv.bias.detach().to(self.stream).clone()
            self.patch_stride = conv.stride
            prefix = [emb.cls_token]
            if getattr(emb, "distillation_token", None) is not None:  # DeiT: CLS, distillation, patches
                prefix.append(emb.distillation_token)
            self.prefix = torch.cat(prefix, dim=1).detach().to(self.stream)
            self.position = emb.position_embeddings.detach().to(self.stream).clone()
            self.tokens = int(self.position.shape[1])
        self.pre_norm = None if layout.pre_norm is None else _Norm(getattr(net, layout.pre_norm), stream=self.stream,
                                                                   compute=self.stream)
        self.gelu = GELU_ALGORITHMS.get(net.config.hidden_act, "none")  # unused by SwiGLU blocks
        layers, parts = _attr(net, layout.blocks), _block_parts(net)
        self.blocks = [_Block(p, *_heads(getattr(layer, layout.attention))[:2], stream=self.stream,
                              compute=self.dtype, packed=self.packed, rows_hint=rows_hint, last=i == len(parts) - 1)
                       for i, (layer, p) in enumerate(zip(layers, parts, strict=True))]
        self.final_norm = _Norm(getattr(net, layout.final_norm), stream=self.stream, compute=self.stream)

    def accepts(self, pixels: torch.Tensor) -> bool:
        """Images of the size the position embeddings were trained for, or any size where the model interpolates
        them itself (DINOv2); anything else goes to the stock path."""
        return self.any_size or tuple(pixels.shape[-2:]) == self.image_size

    def embed_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """The token sequence the first block takes, in the residual stream's dtype."""
        if self.embeddings is not None:
            h = self.embeddings(pixels.to(self.stream))
        else:
            n = pixels.shape[0]
            h = F.conv2d(pixels.to(self.stream), self.patch_weight, self.patch_bias, stride=self.patch_stride)
            h = h.flatten(2).transpose(1, 2)
            h = torch.cat([self.prefix.expand(n, -1, -1), h], dim=1).add_(self.position)
        return h if self.pre_norm is None else self.pre_norm(h)

    def __call__(self, pixels: torch.Tensor, *, postnorm: bool = False) -> torch.Tensor:
        h = self.embed_tokens(pixels)
        for block in self.blocks:
            h = block(h, self.gelu)
        cls = h[:, 0]
        return self.final_norm(cls) if postnorm else cls
