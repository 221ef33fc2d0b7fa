"""A model held in Python -- a Hugging Face model instance, any ``torch.nn.Module``, any callable -- as one contract:
normalised pixels ``(N, 3, H, W)`` in, features ``(N, dim)`` out.

A Hugging Face vision model is read out as a saved one is (:mod:`lowshot.models.readouts`: ``cls-prenorm`` by
default where there is a CLS token, ``pooled`` otherwise); anything else is called as it is, so a timm or
open_clip model is one line (``docs/training.md``): a callable that returns one vector per image.

Its cache key is a hash of the module's ``state_dict`` (names, dtypes, shapes and bytes of every parameter and
buffer), so a changed weight never reuses features, or a key the caller gives. A plain callable with no key has
none: its features are never reused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowshot.data.transforms import ImageTransform, msn_transform
from lowshot.errors import BadInputError
from lowshot.models import readouts
from lowshot.models.backbones import CPU_ROWS_PER_FORWARD, choose_engine, resolve_readout
from lowshot.models.engine import FastEncoder

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LiveModel:
    """A model object made ready for lowshot: ``forward`` maps normalised pixels to ``(N, dim)`` features.

    ``module`` is the ``torch.nn.Module`` behind it (None for a plain callable): its modes, grad flags and device
    are what an evaluation must leave as it found them, and its ``state_dict`` gives the key. ``readout`` is the
    resolved Hugging Face readout (None for anything else)."""

    forward: Forward
    module: torch.nn.Module | None
    transform: ImageTransform
    name: str
    readout: readouts.ReadoutSpec | None = None
    key: str | None = None  # the caller's key; None: the state_dict's hash (a module) or no key (a callable)
    engine: str = "stock"  # a Hugging Face model: "fast" where lowshot.models.engine covers it (as lowshot extract)

    def forward_for_call(self) -> Forward:
        """The forward of one evaluation: on the fast engine, built from the weights as they are now (the same
        forward ``lowshot extract`` runs on them saved); else :attr:`forward`."""
        if self.engine != "fast" or self.module is None or self.readout is None:
            return self.forward
        _, dtype = self.placement()
        fast = FastEncoder(self.module, dtype=dtype, rows_hint=CPU_ROWS_PER_FORWARD)
        postnorm = self.readout.name == readouts.CLS_POSTNORM
        return lambda pixels: (fast(pixels.float(), postnorm=postnorm) if fast.accepts(pixels)
                               else self.forward(pixels))

    def cache_key(self) -> str | None:
        """What names these features: the caller's key, else the hash of the module's current weights."""
        if self.key is not None:
            return self.key
        return state_dict_hash(self.module) if self.module is not None else None

    def placement(self) -> tuple[torch.device, torch.dtype]:
        """Where and in what dtype the model computes: its first floating parameter (or buffer); CPU float32 for a
        callable without any."""
        if self.module is not None:
            for tensor in (*self.module.parameters(), *self.module.buffers()):
                if tensor.is_floating_point():
                    return tensor.device, tensor.dtype
        return torch.device("cpu"), torch.float32

    def describe(self) -> dict:
        """What the results record of the model: its name, class, readout and key."""
        return {"model": self.name, "class": type(self.module).__name__ if self.module is not None else "callable",
                "readout": self.readout.record() if self.readout is not None else {"name": "model output"},
                "engine": self.engine}


def live_model(model, *, transform: ImageTransform | None = None, readout: str = readouts.AUTO,
               key: str | None = None, name: str | None = None) -> LiveModel:
    """``model`` as a :class:`LiveModel`: a Hugging Face vision model instance (read out by ``readout``), any
    ``torch.nn.Module`` or callable mapping pixels to ``(N, dim)`` (``readout`` must then stay ``auto``), or a
    LiveModel (returned as it is). ``transform``: the MSN transform unless given."""
    if isinstance(model, LiveModel):
        return model
    if not callable(model):
        raise BadInputError(f"model: a {type(model).__name__} is not a model; give a torch.nn.Module or a callable "
                            "pixels -> (batch, dim) features")
    transform = transform or msn_transform()
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    module = module if isinstance(module, torch.nn.Module) else None
    label = name or type(module or model).__name__
    config = getattr(model, "config", None)
    if isinstance(model, torch.nn.Module) and hasattr(config, "model_type"):
        spec, forward = hugging_face_readout(model, readout, transform.crop)
        engine, _ = choose_engine(model, spec, "auto", name=label)
        return LiveModel(forward, model, transform, label, spec, key, engine)
    if readout != readouts.AUTO:
        raise BadInputError(f"readout {readout}: {label} is not a Hugging Face model; it offers its own output "
                            "only (leave readout as auto, or pass a callable that returns the vector you want)")
    return LiveModel(model, module, transform, label, None, key)


def hugging_face_readout(net: torch.nn.Module, readout: str, input_size: int) -> tuple[readouts.ReadoutSpec, Forward]:
    """The readout of a transformers vision model instance, resolved as for a saved one (one line naming what the
    model offers when it cannot give ``readout``), and the forward that computes it."""
    family = readouts.family_of(net.config.model_type)
    try:
        spec = resolve_readout(family, net.config, readout, input_size=input_size, forward=net.forward)
    except BadInputError as exc:
        raise BadInputError(str(exc).removeprefix("--")) from None
    if family.random_masking and getattr(net.config, "mask_ratio", 0.0):
        raise BadInputError(f"{type(net).__name__}: mask_ratio {net.config.mask_ratio} masks patches at random; "
                            "set model.config.mask_ratio = 0.0 for evaluation")
    return spec, lambda pixels: readouts.run_readout(net, family, spec, pixels)


def state_dict_hash(module: torch.nn.Module) -> str:
    """sha256 over every entry of ``module.state_dict()``: name, dtype, shape and bytes (read on the host)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        flat = tensor.reshape(-1).contiguous().cpu()
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()
