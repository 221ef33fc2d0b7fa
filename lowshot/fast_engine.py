"""A lean inference forward for Hugging Face ViT-layout backbones (ViT, ViTMSN, DeiT, DINOv2 with or without
registers): same weights, same math.

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
  model's own embedding module (in float32), which interpolates its position embeddings to any input size.

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

VIT_CLASSES = ("ViTModel", "ViTMSNModel", "DeiTModel")
DINOV2_CLASSES = ("Dinov2Model", "Dinov2WithRegistersModel")
SUPPORTED_CLASSES = VIT_CLASSES + DINOV2_CLASSES
# The readouts this engine computes (the last block runs the CLS row only); any other runs on the stock forward.
FAST_READOUTS = ("cls-prenorm", "cls-postnorm")
# transformers' activation names -> oneDNN's GELU algorithm ("none" is the exact erf GELU, as nn.GELU()).
GELU_ALGORITHMS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}
PACKED_DTYPES = (torch.float32, torch.bfloat16)  # dtypes oneDNN's prepacked linear kernels take on the CPU


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
    dinov2 = type(net).__name__ in DINOV2_CLASSES
    layers = getattr(getattr(net, "encoder", None), "layer", None) if dinov2 else getattr(net, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        where = "encoder.layer" if dinov2 else "layers"
        return f"no '{where}' list (a transformers version with another module layout)"
    names = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
    found = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "attention", None), getattr(layer, "mlp", None)
        norms = [getattr(layer, n, None) for n in names]
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        swiglu = dinov2 and hasattr(mlp, "gate_proj")
        mlp_names = ("gate_proj", "up_proj", "down_proj") if swiglu else ("fc1", "fc2")
        mlp_linears = [getattr(mlp, n, None) for n in mlp_names]
        if not all(isinstance(m, nn.Linear) for m in projections + mlp_linears) or \
                not all(isinstance(m, nn.LayerNorm) for m in norms):
            return f"layer {i} does not have q/k/v/o_proj, {'/'.join(mlp_names)} and {'/'.join(names)}"
        scales = [None, None]
        if dinov2:
            scales = [getattr(getattr(layer, n, None), "lambda1", None) for n in ("layer_scale1", "layer_scale2")]
            if not all(isinstance(t, torch.Tensor) for t in scales):
                return f"layer {i} does not have layer_scale1/2.lambda1"
        found.append(_Parts(*norms, *projections, tuple(mlp_linears), *scales))
    return found


def unsupported_reason(net: nn.Module) -> str | None:
    """Why the fast path cannot run ``net`` exactly (None when it can). Checks the layout, not just the name."""
    name = type(net).__name__
    if name not in SUPPORTED_CLASSES:
        return f"{name} is not one of {', '.join(SUPPORTED_CLASSES)}"
    config = net.config
    parts = _block_parts(net)
    if isinstance(parts, str):
        return parts
    act = getattr(config, "hidden_act", None)
    if not all(p.swiglu for p in parts) and (not isinstance(act, str) or act not in GELU_ALGORITHMS):
        return f"activation {act!r} is not one of {', '.join(GELU_ALGORITHMS)}"
    emb = getattr(net, "embeddings", None)
    proj = getattr(getattr(emb, "patch_embeddings", None), "projection", None)
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.padding != (0, 0) \
            or proj.groups != 1 or proj.dilation != (1, 1):
        return "patch embedding is not a non-overlapping Conv2d"
    if getattr(emb, "cls_token", None) is None or getattr(emb, "position_embeddings", None) is None:
        return "no CLS token or position embeddings"
    if not isinstance(getattr(net, "layernorm", None), nn.LayerNorm):
        return "no final 'layernorm' (a transformers version with another module layout)"
    hidden = config.hidden_size
    for i, (layer, p) in enumerate(zip(_layers(net), parts, strict=True)):
        attn = layer.attention
        heads, head_dim = getattr(attn, "num_attention_heads", 0), getattr(attn, "head_dim", 0)
        if heads * head_dim != p.q.out_features or p.o.out_features != hidden:
            return f"layer {i}: attention shapes are not heads x head_dim"
        if abs(getattr(attn, "scaling", head_dim ** -0.5) - head_dim ** -0.5) > 1e-12:
            return f"layer {i}: attention scaling is not 1/sqrt(head_dim)"
    return None


def _layers(net: nn.Module) -> nn.ModuleList:
    return net.encoder.layer if type(net).__name__ in DINOV2_CLASSES else net.layers


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
        if self.packed:
            if gelu is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], gelu)
        y = F.linear(x, self.weight, self.bias)
        return y if gelu is None else F.gelu(y, approximate=gelu)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x W^T + b: fused when the residual has the compute dtype, else added in the residual's."""
        if residual.dtype != x.dtype:
            return residual + self(x)
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


class FastViT:
    """Features of a ViT-layout ``net`` (see :func:`unsupported_reason`): ``(N, 3, H, W)`` -> CLS ``(N, hidden)``.

    ``dtype`` (default: the net's) is the compute dtype of the blocks' linear layers and attention. With bfloat16
    or float16 the pixels, the patch embedding (about 1% of the work), the residual stream, the LayerNorms and the
    feature stay in float32: pixels rounded to bfloat16 alone moved DeiT-Tiny's CLS features to cosine 0.997 of
    float32 on an Imagenette photo (as did stock bf16 autocast, which rounds them too). Build it from the float32
    net to keep those parameters exact; pass float32 pixels.
    ``rows_hint`` (images x tokens per forward) only tunes oneDNN's weight packing; any batch size works."""

    def __init__(self, net: nn.Module, *, dtype: torch.dtype | None = None, rows_hint: int = 64 * 197):
        reason = unsupported_reason(net)
        if reason is not None:
            raise ValueError(f"the fast path does not cover this model: {reason}")
        emb = net.embeddings
        conv = emb.patch_embeddings.projection
        self.device = conv.weight.device
        self.dtype = dtype or conv.weight.dtype
        self.stream = torch.float32 if self.dtype in (torch.bfloat16, torch.float16) else self.dtype
        self.packed = _packable(self.device, self.dtype)
        self.image_size = tuple(emb.patch_embeddings.image_size)
        self.position = emb.position_embeddings.detach().to(self.stream).clone()
        # DINOv2: the model's own embedding module (float32 copy), which interpolates the position embeddings to
        # the input size and adds the register tokens; ViT/DeiT: conv + prefix tokens + positions, native size only
        self.embeddings = copy.deepcopy(emb).to(self.stream) if type(net).__name__ in DINOV2_CLASSES else None
        self.patch_weight = conv.weight.detach().to(self.stream).clone()
        self.patch_bias = None if conv.bias is None else conv.bias.detach().to(self.stream).clone()
        self.patch_stride = conv.stride
        prefix = [emb.cls_token]
        if getattr(emb, "distillation_token", None) is not None:  # DeiT: CLS, distillation, patches
            prefix.append(emb.distillation_token)
        self.prefix = torch.cat(prefix, dim=1).detach().to(self.stream)
        self.gelu = GELU_ALGORITHMS.get(net.config.hidden_act, "none")  # unused by SwiGLU blocks
        layers, parts = _layers(net), _block_parts(net)
        self.blocks = [_Block(p, layer.attention.num_attention_heads, layer.attention.head_dim, stream=self.stream,
                              compute=self.dtype, packed=self.packed, rows_hint=rows_hint, last=i == len(parts) - 1)
                       for i, (layer, p) in enumerate(zip(layers, parts, strict=True))]
        self.final_norm = _Norm(net.layernorm, stream=self.stream, compute=self.stream)

    @property
    def tokens(self) -> int:
        return int(self.position.shape[1])

    def accepts(self, pixels: torch.Tensor) -> bool:
        """Images of the size the position embeddings were trained for, or any size where the model interpolates
        them itself (DINOv2); anything else goes to the stock path."""
        return self.embeddings is not None or tuple(pixels.shape[-2:]) == self.image_size

    def embed_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """The token sequence the first block takes, in the residual stream's dtype."""
        if self.embeddings is not None:
            return self.embeddings(pixels.to(self.stream))
        n = pixels.shape[0]
        h = F.conv2d(pixels.to(self.stream), self.patch_weight, self.patch_bias, stride=self.patch_stride)
        h = h.flatten(2).transpose(1, 2)
        return torch.cat([self.prefix.expand(n, -1, -1), h], dim=1).add_(self.position)

    def __call__(self, pixels: torch.Tensor, *, postnorm: bool = False) -> torch.Tensor:
        h = self.embed_tokens(pixels)
        for block in self.blocks:
            h = block(h, self.gelu)
        cls = h[:, 0]
        return self.final_norm(cls) if postnorm else cls
