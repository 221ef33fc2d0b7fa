"""Load a frozen vision backbone (hub id or local folder) and turn pixels into CLS features.

Features (MSN ``logistic_eval.py``): the CLS token of the last transformer block, *before* the encoder's final
LayerNorm -- ``hidden_states[-1][:, 0]`` in Hugging Face terms (``FEATURE_PRENORM``). ``FEATURE_POSTNORM`` is
``last_hidden_state[:, 0]`` (final LayerNorm applied), offered as a named alternative.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import DEFAULT_MODEL, FEATURE_POSTNORM, FEATURE_PRENORM, FEATURES  # noqa: F401 (re-exported)
from .errors import BadInputError, ModelLoadError
from .fast_engine import FastViT, unsupported_reason

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ENGINES = ("auto", "fast", "stock")  # auto: the fast path where it covers the model, else the stock transformers one
# Token rows per forward pass on the CPU (16 ViT-S/16 images). ViT-S/16 fp32 on a 2-core Xeon: with the cores
# shared, 8-16 images per forward ran ~10% faster than 64 (smaller activations stay in cache); on a quiet machine
# 8 to 64 were within noise (benchmarks/extract_speed.py, forward-batch sweep). It also bounds the memory of
# large-token models (patch 4: 3,137 tokens -> one image per forward).
CPU_ROWS_PER_FORWARD = 16 * 197
MAX_ACTIVATION_BYTES = 2 << 30  # any device: the activations of one forward pass stay under this


@dataclass
class Backbone:
    """A loaded, frozen backbone. ``identity`` names the exact weights and config (for the cache key)."""

    model: torch.nn.Module
    name: str
    folder: Path
    identity: dict
    device: torch.device
    dtype: torch.dtype
    feature: str = FEATURE_PRENORM
    dtype_reason: str = ""
    info: dict = field(default_factory=dict)
    engine: str = "stock"  # which forward runs: "fast" (lowshot.fast_engine) or "stock" (the transformers model)
    engine_reason: str = ""
    fast: FastViT | None = None
    forward_batch: int = 64  # at most this many images per forward pass (embed splits bigger batches)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (N, 3, H, W) -> float32 CLS features (N, dim) on the CPU."""
        parts = [self._forward(part.to(self.device, non_blocking=True)).float().cpu()
                 for part in pixels.split(self.forward_batch)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.fast is not None and self.fast.accepts(pixels):  # takes float32 pixels (see FastViT)
            return self.fast(pixels, postnorm=self.feature == FEATURE_POSTNORM)
        return self.stock_forward(pixels.to(self.dtype))

    @torch.inference_mode()
    def stock_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The reference: the transformers model's own forward, through its public outputs only."""
        if self.feature == FEATURE_PRENORM:
            out = self.model(pixel_values=pixels, output_hidden_states=True)
            return out.hidden_states[-1][:, 0]
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise BadInputError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    return torch.device(device)


ENV_CPU_FLAGS = "LOWSHOT_CPU_FLAGS"  # e.g. "avx512_bf16 amx_bf16" or "": pretend the CPU has exactly these flags


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), or the ones ``LOWSHOT_CPU_FLAGS`` names when it is set, so that the
    test suite (and a user reproducing another machine's choice) can force the detection either way."""
    forced = os.environ.get(ENV_CPU_FLAGS)
    if forced is not None:
        return set(forced.replace(",", " ").split())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(dtype: str, device: torch.device) -> tuple[torch.dtype, str]:
    """``auto`` picks bf16 only where the hardware runs it natively (AVX-512-bf16/AMX CPUs, bf16 GPUs)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise BadInputError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
        return DTYPES[dtype], "requested"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: GPU supports bfloat16"
        return torch.float16, "auto: GPU without bfloat16"
    flags = cpu_flags()
    native = sorted(flags & {"amx_bf16", "avx512_bf16"})
    if native:
        return torch.bfloat16, f"auto: CPU has {', '.join(native)}"
    return torch.float32, "auto: CPU has no native bfloat16 (no avx512_bf16/amx_bf16), float32 is faster"


def resolve_model_folder(model: str, *, revision: str | None = None) -> tuple[Path, dict]:
    """A local folder, or a hub id resolved through the local Hugging Face cache (downloaded when online)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"--model {model}: folder has no config.json (need config.json + weights)")
        return path.resolve(), {"source": "folder"}
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"--model {model}: no such folder")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:
        folder = snapshot_download(model, revision=revision, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; the message below is what matters
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "offline (HF_HUB_OFFLINE=1)" if offline else type(exc).__name__
        raise ModelLoadError(
            f"cannot load model {model!r}: {why} and not in the local Hugging Face cache; download it where the "
            f"hub is reachable, or pass --model /path/to/folder with config.json and the weights"
        ) from exc
    folder_path = Path(folder)
    return folder_path, {"source": "hub", "revision": folder_path.name}


def weights_identity(folder: Path, *, memo: dict | None = None) -> dict:
    """sha256 of every weight file and of config.json: the content, not the name, decides the features."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ModelLoadError(f"{folder}: no weight files (*.safetensors or *.bin)")
    digests = {}
    for file in files:
        stat = file.stat()
        memo_key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if memo is not None and memo_key in memo:
            digests[file.name] = memo[memo_key]
            continue
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        digests[file.name] = digest.hexdigest()
        if memo is not None:
            memo[memo_key] = digests[file.name]
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    config_digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return {"weights_sha256": digests, "config_sha256": config_digest}


@dataclass(frozen=True)
class ModelRef:
    """A model resolved to a local folder, with the identity of its exact weights and config."""

    name: str
    folder: Path
    identity: dict
    info: dict


def resolve_model(model: str = DEFAULT_MODEL, *, revision: str | None = None,
                  hash_memo: dict | None = None) -> ModelRef:
    """Find the model's files and hash them, without loading it (enough to look features up in the cache)."""
    folder, origin = resolve_model_folder(model, revision=revision)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad config
        raise ModelLoadError(f"--model {model}: unreadable config.json ({str(exc).splitlines()[0]})") from exc
    if not hasattr(config, "patch_size") or not hasattr(config, "hidden_size"):
        raise ModelLoadError(f"--model {model}: {type(config).__name__} is not a vision transformer with a CLS "
                             "token (need a ViT-family config with patch_size and hidden_size)")
    info = {"model_type": config.model_type, "hidden_size": config.hidden_size, "patch_size": config.patch_size,
            "image_size": getattr(config, "image_size", None), **origin}
    return ModelRef(model, folder, weights_identity(folder, memo=hash_memo), info)


def load_backbone(
    model: str | ModelRef = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    feature: str = FEATURE_PRENORM,
    engine: str = "auto",
) -> Backbone:
    """Load ``model`` frozen and in eval mode, ready for :meth:`Backbone.embed`.

    ``engine``: ``"fast"`` runs :mod:`lowshot.fast_engine` (an error if it does not cover the model), ``"stock"`` the
    transformers forward, ``"auto"`` the fast path where it covers the model and the stock one elsewhere."""
    if feature not in FEATURES:
        raise BadInputError(f"--feature {feature!r}: expected one of {', '.join(FEATURES)}")
    if engine not in ENGINES:
        raise BadInputError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    torch_device = resolve_device(device)
    torch_dtype, reason = resolve_dtype(dtype, torch_device)
    ref = model if isinstance(model, ModelRef) else resolve_model(model, revision=revision)
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    kwargs = {"add_pooling_layer": False} if ref.info["model_type"] in ("vit", "deit") else {}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report lists the unused classifier head: noise for a backbone
    hf_logging.disable_progress_bar()
    try:
        net = AutoModel.from_pretrained(ref.folder, dtype=torch.float32, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"--model {ref.name}: cannot load weights ({str(exc).splitlines()[0]})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if "pixel_values" not in inspect.signature(net.forward).parameters:
        raise ModelLoadError(f"--model {ref.name}: {type(net).__name__} does not take images (no pixel_values)")
    net.requires_grad_(False)
    net.eval().to(torch_device)
    info = {**ref.info, "class": type(net).__name__}
    backbone = Backbone(net, ref.name, ref.folder, ref.identity, torch_device, torch_dtype, feature, reason, info)
    use_engine(backbone, engine)  # from the float32 weights: the fast path keeps norms and residuals in float32
    net.to(torch_dtype)
    return backbone


def use_engine(backbone: Backbone, engine: str = "auto") -> Backbone:
    """Set up ``backbone`` to run on ``engine`` (see :func:`load_backbone`) with a forward batch that fits."""
    net = backbone.model
    why_not = unsupported_reason(net) if engine != "stock" else "stock engine requested"
    if engine == "fast" and why_not is not None:
        raise ModelLoadError(f"--engine fast: {backbone.name}: {why_not} (use --engine auto or stock)")
    tokens = model_tokens(net)
    backbone.forward_batch = choose_forward_batch(net, tokens=tokens, device=backbone.device, dtype=backbone.dtype,
                                           stock=why_not is not None)
    if why_not is None:
        backbone.fast = FastViT(net, dtype=backbone.dtype, rows_hint=backbone.forward_batch * tokens)
        backbone.engine, backbone.engine_reason = "fast", "lowshot.fast_engine covers " + type(net).__name__
    else:
        backbone.fast = None
        backbone.engine, backbone.engine_reason = "stock", why_not
    return backbone


def model_tokens(net: torch.nn.Module) -> int:
    """Tokens per image (patches + CLS and any other prefix token) at the model's own image size."""
    position = getattr(getattr(net, "embeddings", None), "position_embeddings", None)
    if isinstance(position, torch.Tensor) and position.ndim == 3:
        return int(position.shape[1])
    config = net.config
    size, patch = config.image_size, config.patch_size
    size = size if isinstance(size, int) else size[0]
    patch = patch if isinstance(patch, int) else patch[0]
    return (size // patch) ** 2 + 1


def choose_forward_batch(net: torch.nn.Module, *, tokens: int, device: torch.device, dtype: torch.dtype,
                  stock: bool) -> int:
    """Images per forward pass: on the CPU about ``CPU_ROWS_PER_FORWARD`` token rows, anywhere within
    ``MAX_ACTIVATION_BYTES`` (so patch-4 and patch-7 models run with bounded memory)."""
    config = net.config
    hidden = int(config.hidden_size)
    width = 7 * hidden + int(getattr(config, "intermediate_size", 4 * hidden))  # live activations per token
    if stock:  # output_hidden_states keeps every layer's output until the forward returns
        width += (int(getattr(config, "num_hidden_layers", 12)) + 1) * hidden
    per_image = tokens * width * torch.finfo(dtype).bits // 8
    n = max(1, MAX_ACTIVATION_BYTES // per_image)
    if device.type == "cpu":
        n = min(n, max(1, CPU_ROWS_PER_FORWARD // tokens))
    return int(n)
