"""Load a frozen vision backbone (hub id, local folder or raw MSN checkpoint) and turn pixels into features.

Any Hugging Face vision backbone loads through its Auto class (a full CLIP/SigLIP folder through its vision tower);
the readout (:mod:`lowshot.models.readouts`) says which vector becomes the feature. The MSN default
(``logistic_eval.py``) is the CLS token of the last block *before* the final LayerNorm -- ``hidden_states[-1][:, 0]``.

Rules that keep a feature from being silently wrong: a readout the model cannot give is refused in one line;
ViTMAE's random masking is switched off (and recorded); the input is the transform's size (224 for the MSN
protocol) and a model trained at another size gets its position embeddings interpolated (recorded in the cache
key); ``--dtype auto`` runs reduced precision only on the fast engine, whose mixed precision keeps every feature
within cosine 0.999 of float32 -- the stock engine runs float32 (whole-model bfloat16 fell to 0.96 on ViT).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowshot.config import DEFAULT_MODEL, DTYPES, ENGINES
from lowshot.errors import BadInputError, ModelLoadError
from lowshot.models import checkpoints, readouts
from lowshot.models.engine import FAST_READOUTS, FastEncoder, unsupported_reason
from lowshot.models.readouts import Family, ReadoutSpec

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES if name != "auto"}  # config.DTYPES, as torch's
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Token rows per forward pass on the CPU (16 ViT-S/16 images). ViT-S/16 fp32 on a 2-core Xeon: with the cores
# shared, 8-16 images per forward ran ~10% faster than 64 (smaller activations stay in cache); on a quiet machine
# 8 to 64 were within noise (benchmarks/extract_speed.py, forward-batch sweep). It also bounds the memory of
# large-token models (patch 4: 3,137 tokens -> one image per forward).
CPU_ROWS_PER_FORWARD = 16 * 197
MAX_ACTIVATION_BYTES = 2 << 30  # any device: the activations of one forward pass stay under this
PROTOCOL_INPUT = 224  # MSN logistic_eval.py CenterCrop(224): the input size the MSN transform produces
POOLING_LAYER = {"vit": False, "deit": False, "beit": True, "data2vec-vision": True}  # add_pooling_layer on load


@dataclass
class Backbone:
    """A loaded, frozen backbone. ``identity`` names the exact weights and config (for the cache key)."""

    model: torch.nn.Module
    name: str
    folder: Path
    identity: dict
    device: torch.device
    dtype: torch.dtype
    readout_name: str = readouts.CLS_PRENORM
    dtype_reason: str = ""
    info: dict = field(default_factory=dict)
    engine: str = "stock"  # which forward runs: "fast" (lowshot.models.engine) or "stock" (the transformers model)
    engine_reason: str = ""
    fast: FastEncoder | None = None
    forward_batch: int = 64  # at most this many images per forward pass (embed splits bigger batches)
    readout: ReadoutSpec | None = None  # None: ``readout_name`` at the model's own size
    family: Family | None = None
    width: int | None = None  # the feature's width, measured on load (cls+avgpool, last4-cls: a multiple)

    @property
    def dim(self) -> int:
        return int(self.width or _hidden_size(self.model.config))

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (N, 3, H, W) -> float32 CLS features (N, dim) on the CPU."""
        parts = [self._forward(part.to(self.device, non_blocking=True)).float().cpu()
                 for part in pixels.split(self.forward_batch)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.fast is not None and self.fast.accepts(pixels):  # takes float32 pixels (see FastEncoder)
            return self.fast(pixels, postnorm=self.readout_name == readouts.CLS_POSTNORM)
        return self.stock_forward(pixels.to(self.dtype))

    @torch.inference_mode()
    def stock_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The reference: the transformers model's own forward, read out through its public outputs."""
        family = self.family or readouts.family_of(self.model.config.model_type)
        spec = self.readout or resolve_readout(family, self.model.config, self.readout_name,
                                               input_size=int(pixels.shape[-1]), forward=self.model.forward)
        return readouts.run_readout(self.model, family, spec, pixels)


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
        # load_backbone and plan_forward take plain strings from Python callers, not only ExtractSettings' values
        if dtype not in TORCH_DTYPES:
            raise BadInputError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        return TORCH_DTYPES[dtype], "requested"
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
    if path.exists():
        raise ModelLoadError(f"--model {model}: is a file, not a model; give a folder with config.json and the "
                             f"weights, a raw MSN checkpoint ({', '.join(checkpoints.CHECKPOINT_SUFFIXES)}) or a "
                             "Hugging Face hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"--model {model}: no such folder")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:
        folder = snapshot_download(model, revision=revision, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; _hub_problem says which in words
        raise ModelLoadError(f"cannot load model {model!r}: {_hub_problem(exc, revision)}") from exc
    folder_path = Path(folder)
    return folder_path, {"source": "hub", "revision": folder_path.name}


LOCAL_HINT = "pass --model /path/to/folder with config.json and the weights"


def _hub_problem(exc: Exception, revision: str | None) -> str:
    """Why a hub download failed, in words a user can act on (never an exception's class name)."""
    from huggingface_hub import errors

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if offline or isinstance(exc, errors.OfflineModeIsEnabled):
        return (f"offline (HF_HUB_OFFLINE=1) and not in the local Hugging Face cache; download it where the hub "
                f"is reachable, or {LOCAL_HINT}")
    if isinstance(exc, errors.GatedRepoError):
        return "a gated model: accept its terms on its hub page, then log in (hf auth login)"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"no such model on the Hugging Face hub (or a private one: log in with hf auth login); or {LOCAL_HINT}"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"the hub has no revision {revision!r} of it"
    if _no_connection(exc):
        return (f"no network connection to the Hugging Face hub, and it is not in the local Hugging Face cache; "
                f"download it where the hub is reachable, or {LOCAL_HINT}")
    first = str(exc).strip().splitlines()
    return f"the Hugging Face hub download failed ({first[0] if first else 'no reason given'}); or {LOCAL_HINT}"


def _no_connection(exc: BaseException) -> bool:
    """The download failed for want of a connection: huggingface_hub says it could not reach the hub and finds no
    local copy (LocalEntryNotFoundError), or a connection or timeout error is somewhere in the chain."""
    from huggingface_hub import errors

    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, (errors.LocalEntryNotFoundError, ConnectionError, TimeoutError)) or \
                name in ("ConnectError", "ConnectTimeout", "ReadTimeout", "ConnectionError", "Timeout"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
    """A model resolved to local files, with the identity of its exact weights and config. ``config`` is the
    (vision) config that decides the architecture; ``checkpoint`` marks a raw MSN ``.pth.tar`` (``folder`` is then
    that file)."""

    name: str
    folder: Path
    identity: dict
    info: dict
    config: object = None
    checkpoint: bool = False

    @property
    def family(self) -> Family:
        return readouts.family_of(self.config.model_type)


def resolve_model(model: str = DEFAULT_MODEL, *, revision: str | None = None,
                  hash_memo: dict | None = None) -> ModelRef:
    """Find the model's files, read its config and hash them, without loading the weights (enough for a cache
    lookup). A full CLIP/SigLIP folder resolves to its vision tower; a ``.pth.tar`` to an MSN checkpoint."""
    path = Path(model).expanduser()
    if checkpoints.is_checkpoint(path):
        config = checkpoints.msn_config(checkpoints.read_encoder(path), source=path)
        info = {"model_type": config.model_type, "family": "ViTMSN", "hidden_size": config.hidden_size,
                "patch_size": config.patch_size, "image_size": config.image_size, "source": "msn-checkpoint"}
        return ModelRef(model, path.resolve(), checkpoints.file_identity(path, memo=hash_memo), info, config,
                        checkpoint=True)
    folder, origin = resolve_model_folder(model, revision=revision)
    from transformers import AutoConfig

    config_dict = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if isinstance(config_dict, dict) and config_dict.get("auto_map"):
        raise ModelLoadError(f"--model {model}: the folder's config needs its own Python code (auto_map); lowshot "
                             "never runs code from a model folder (no trust_remote_code)")
    try:  # trust_remote_code=False: refuse at once, never prompt or run the folder's code
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad config
        raise ModelLoadError(f"--model {model}: unreadable config.json ({str(exc).splitlines()[0]})") from exc
    tower = None
    if config.model_type in readouts.TOWERS:
        tower, config = config.model_type, config.vision_config
    family = readouts.family_of(config.model_type)
    if family is readouts.OTHER:
        _require_vision(model, config)
    info = {"model_type": config.model_type, "family": family.name, "hidden_size": _hidden_size(config),
            "patch_size": getattr(config, "patch_size", None), "image_size": readouts.native_size(config),
            **({"tower_of": tower} if tower else {}), **origin}
    return ModelRef(model, folder, weights_identity(folder, memo=hash_memo), info, config)


def _require_vision(model: str, config) -> None:
    """A config lowshot has no family table for must at least be an image model (forward takes pixel_values)."""
    from transformers import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(config)]
    except (KeyError, ValueError):
        raise ModelLoadError(f"--model {model}: {type(config).__name__} has no transformers AutoModel class; it is "
                             "not a backbone lowshot can load") from None
    if "pixel_values" not in inspect.signature(model_class.forward).parameters:
        families = ", ".join(f.name for f in readouts.FAMILIES)
        raise ModelLoadError(f"--model {model}: {type(config).__name__} is not a vision model (no pixel_values "
                             f"input); supported: {families}, or any vision model through its pooled output")


def _meta_net(config, *, name: str) -> torch.nn.Module:
    """The model's architecture without weights (meta device): enough to check its layout and signature."""
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            return AutoModel.from_config(config, **_load_kwargs(config))
    except Exception as exc:  # noqa: BLE001 - an unknown config type, or one AutoModel cannot build
        raise ModelLoadError(f"--model {name}: {type(config).__name__} is not a vision backbone transformers "
                             f"can build ({str(exc).splitlines()[0][:160]})") from exc


def _load_kwargs(config) -> dict:
    pooling = POOLING_LAYER.get(config.model_type)
    return {} if pooling is None else {"add_pooling_layer": pooling}


def _hidden_size(config) -> int | None:
    hidden = getattr(config, "hidden_size", None)
    if hidden is None and getattr(config, "hidden_sizes", None):
        hidden = config.hidden_sizes[-1]  # ConvNeXt: the last stage's width
    return None if hidden is None else int(hidden)


def resolve_readout(family: Family, config, readout: str, *, input_size: int, forward) -> ReadoutSpec:
    """``readout`` (a readout name or ``auto``) resolved for this model and input size, or one clear error."""
    if readout == readouts.AUTO:
        readout = readouts.default_readout(family)
    if readout not in readouts.READOUTS:
        raise BadInputError(f"--readout {readout!r}: expected one of auto, {', '.join(readouts.READOUTS)}")
    why_not = readouts.offered(family, config)[readout]
    if why_not is not None:
        options = [r for r, reason in readouts.offered(family, config).items() if reason is None]
        raise BadInputError(f"--readout {readout}: {why_not}; this model offers {', '.join(options)}")
    positions = readouts.position_mode(family, config, input_size, forward)
    if positions.startswith("unsupported"):
        raise ModelLoadError(f"{family.name}: {positions}; use --transform processor (the model's own size)")
    return ReadoutSpec(readout, family.name, input_size, readouts.native_size(config), positions,
                       masking="off (mask_ratio 0, patch order kept)" if family.random_masking else "none",
                       same_as=readouts.same_as(family, config, readout))


@dataclass(frozen=True)
class ForwardPlan:
    """What an extraction will compute and how, decided before any weight is loaded (it makes the cache key)."""

    readout: ReadoutSpec
    engine: str  # "fast" or "stock"
    engine_reason: str
    dtype: torch.dtype
    dtype_reason: str


def plan_forward(ref: ModelRef, *, readout: str = readouts.AUTO, engine: str = "auto",
                 device: str | torch.device = "auto", dtype: str = "auto",
                 input_size: int = PROTOCOL_INPUT) -> ForwardPlan:
    """Readout, engine and dtype for ``ref``. ``dtype="auto"`` runs reduced precision only on the fast engine
    (its float32 norms and residuals keep cosine >= 0.999 to float32); the stock engine then runs float32.
    ``device``: a resolved ``torch.device`` is taken as is."""
    if engine not in ENGINES:  # a Python caller's plain string (load_backbone), not only ExtractSettings.engine
        raise BadInputError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype, dtype_reason = resolve_dtype(dtype, torch_device)
    net = _meta_net(ref.config, name=ref.name)
    spec = resolve_readout(ref.family, ref.config, readout, input_size=input_size, forward=net.forward)
    engine_used, engine_reason = choose_engine(net, spec, engine, name=ref.name)
    if dtype == "auto" and engine_used == "stock" and torch_dtype != torch.float32:
        torch_dtype = torch.float32
        dtype_reason = (f"auto: {dtype_reason.removeprefix('auto: ')}, but the stock engine runs float32 "
                        "(whole-model bfloat16 loses cosine 0.999 to float32)")
    return ForwardPlan(spec, engine_used, engine_reason, torch_dtype, dtype_reason)


def choose_engine(net: torch.nn.Module, spec: ReadoutSpec, engine: str, *, name: str) -> tuple[str, str]:
    """The one place the forward is chosen: ``(engine, why)``. The fast engine runs where it covers the model's
    layout, the readout and the input size; ``engine="fast"`` elsewhere is an error."""
    if engine == "stock":
        return "stock", "stock engine requested"
    why_not = unsupported_reason(net)
    if why_not is None and spec.name not in FAST_READOUTS:
        why_not = f"readout {spec.name} is not one the fast engine computes ({', '.join(FAST_READOUTS)})"
    if why_not is None and spec.position_embeddings not in ("native", readouts.BUILT_IN):  # DINOv2: its own
        why_not = f"input {spec.input_size} px differs from the model's {spec.native_size} px"
    if why_not is None:
        return "fast", "lowshot.models.engine covers " + type(net).__name__
    if engine == "fast":
        raise ModelLoadError(f"--engine fast: {name}: {why_not} (use --engine auto or stock)")
    return "stock", why_not


def load_backbone(
    model: str | ModelRef = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    readout: str = readouts.AUTO,
    engine: str = "auto",
    input_size: int = PROTOCOL_INPUT,
    forward: ForwardPlan | None = None,
) -> Backbone:
    """Load ``model`` frozen and in eval mode, ready for :meth:`Backbone.embed` on ``input_size`` pixels.

    ``readout``: :mod:`lowshot.models.readouts` (``auto``: the family's default). ``engine``: ``"fast"``
    runs :mod:`lowshot.models.engine` (an error if it does not cover the model and readout), ``"stock"`` the
    transformers forward, ``"auto"`` the fast path where it covers them and the stock one elsewhere. Every problem
    (not a vision model, a readout it lacks, weights that do not load, a forward that fails on one image) is one
    :class:`ModelLoadError` or :class:`BadInputError`, raised before any feature is written. ``forward``: the
    :func:`plan_forward` already made for ``model`` on ``device`` (an extraction makes it once, for the cache key);
    ``readout``, ``engine`` and ``dtype`` are then its own."""
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    ref = model if isinstance(model, ModelRef) else resolve_model(model, revision=revision)
    plan = forward or plan_forward(ref, readout=readout, engine=engine, device=torch_device, dtype=dtype,
                                   input_size=input_size)
    net = _load_weights(ref)
    if "pixel_values" not in inspect.signature(net.forward).parameters:
        raise ModelLoadError(f"--model {ref.name}: {type(net).__name__} does not take images (no pixel_values)")
    if ref.family.random_masking:
        net.config.mask_ratio = 0.0  # ViTMAE: keep every patch (the patch order is kept by the readout's noise)
    net.requires_grad_(False)
    net.eval().to(torch_device)
    info = {**ref.info, "class": type(net).__name__}
    backbone = Backbone(net, ref.name, ref.folder, ref.identity, torch_device, plan.dtype, plan.readout.name,
                        plan.dtype_reason, info, readout=plan.readout, family=ref.family)
    # from the float32 weights: the fast path keeps norms and residuals in float32
    use_engine(backbone, plan.engine, reason=plan.engine_reason)
    net.to(plan.dtype)
    backbone.width = _measure_width(backbone, input_size)
    return backbone


def _load_weights(ref: ModelRef) -> torch.nn.Module:
    """The float32 model: the vision tower of a two-tower folder, the converted ViTMSN of an MSN checkpoint."""
    if ref.checkpoint:
        return checkpoints.load_msn(ref.folder)[0]
    from transformers import MODEL_MAPPING, AutoModel
    from transformers.utils import logging as hf_logging

    loader = MODEL_MAPPING[type(ref.config)] if "tower_of" in ref.info else AutoModel
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report lists the unused heads and text tower: noise for a backbone
    hf_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(ref.folder, dtype=torch.float32, trust_remote_code=False,
                                      **_load_kwargs(ref.config))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"--model {ref.name}: cannot load weights ({str(exc).splitlines()[0]})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _measure_width(backbone: Backbone, input_size: int) -> int:
    """One blank image through the chosen forward: the feature's true width, and any failure of this model at this
    input size surfaces here, as one line, before extraction opens a cache entry."""
    blank = torch.zeros(1, 3, input_size, input_size)
    try:
        out = backbone.embed(blank)
    except Exception as exc:  # noqa: BLE001 - any failure of a model's forward is this model's problem
        raise ModelLoadError(f"--model {backbone.name}: a {input_size}-px image does not go through "
                             f"{type(backbone.model).__name__} with readout {backbone.readout_name} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if out.ndim != 2:
        raise ModelLoadError(f"--model {backbone.name}: readout {backbone.readout_name} gives shape "
                             f"{tuple(out.shape)}, not one vector per image")
    return int(out.shape[1])


def use_engine(backbone: Backbone, engine: str = "auto", *, reason: str | None = None) -> Backbone:
    """Set up ``backbone`` to run on ``engine`` (see :func:`load_backbone`) with a forward batch that fits.
    ``reason``: the engine ("fast" or "stock") was already chosen, for this reason, by :func:`plan_forward`."""
    net = backbone.model
    family = backbone.family or readouts.family_of(net.config.model_type)
    spec = backbone.readout or resolve_readout(family, net.config, backbone.readout_name,
                                               input_size=readouts.native_size(net.config) or PROTOCOL_INPUT,
                                               forward=net.forward)
    used, why = (engine, reason) if reason is not None else choose_engine(net, spec, engine, name=backbone.name)
    tokens = model_tokens(net, input_size=spec.input_size)
    backbone.forward_batch = choose_forward_batch(net, tokens=tokens, device=backbone.device, dtype=backbone.dtype,
                                                  stock=used == "stock")
    if used == "fast":
        backbone.fast = FastEncoder(net, dtype=backbone.dtype, rows_hint=backbone.forward_batch * tokens)
    else:
        backbone.fast = None
    backbone.engine, backbone.engine_reason = used, why
    return backbone


def model_tokens(net: torch.nn.Module, *, input_size: int | None = None) -> int:
    """Tokens per image (patches + CLS and any other prefix token) at ``input_size`` (default: the model's own);
    a CNN counts its first stage's positions (patch_size 4 in ConvNeXt and Swin configs)."""
    config = net.config
    position = getattr(getattr(net, "embeddings", None), "position_embeddings", None)
    if input_size is None and isinstance(position, torch.Tensor) and position.ndim == 3:
        return int(position.shape[1])
    size = input_size or readouts.native_size(config) or PROTOCOL_INPUT
    patch = getattr(config, "patch_size", None) or 4
    patch = patch if isinstance(patch, int) else patch[0]
    prefix = readouts.family_of(config.model_type).prefix_tokens(config)
    return (size // patch) ** 2 + prefix


def choose_forward_batch(net: torch.nn.Module, *, tokens: int, device: torch.device, dtype: torch.dtype,
                         stock: bool) -> int:
    """Images per forward pass: on the CPU about ``CPU_ROWS_PER_FORWARD`` token rows, anywhere within
    ``MAX_ACTIVATION_BYTES`` (so patch-4 and patch-7 models run with bounded memory)."""
    config = net.config
    hidden = _hidden_size(config) or 768
    width = 7 * hidden + int(getattr(config, "intermediate_size", 4 * hidden))  # live activations per token
    if stock:  # output_hidden_states keeps every layer's output until the forward returns
        width += (int(getattr(config, "num_hidden_layers", 12)) + 1) * hidden
    per_image = tokens * width * torch.finfo(dtype).bits // 8
    n = max(1, MAX_ACTIVATION_BYTES // per_image)
    if device.type == "cpu":
        n = min(n, max(1, CPU_ROWS_PER_FORWARD // tokens))
    return int(n)
