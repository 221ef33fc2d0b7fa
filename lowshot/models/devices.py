"""Where the model runs, and how decoded images get there: one small abstraction for the CPU and accelerators.

The extraction loop hands each decoded batch (uint8 crops, N x H x W x 3) to :meth:`Device.stage` and gets back the
normalised float batch on the model's device. What differs by device is hidden here:

- **CPU**: normalise on the host (one copy to planar float, two in-place passes) into a float32 buffer the Device
  keeps: a 64-image batch is 38.5 MB, over glibc's largest mmap threshold (32 MB), so a fresh buffer per batch would
  be a fresh mapping zero-filled page by page. A staged CPU batch is therefore valid until the next
  :meth:`Device.stage`.
- **CUDA** (and any accelerator torch reaches by ``.to(device)``): copy the *uint8* crops -- a quarter of the bytes
  of float32 -- from page-locked (pinned) host memory with a non-blocking copy, then convert and normalise on the
  device. The copy of batch k+1 overlaps the model's work on batch k (it is queued on a side stream), and the
  decode threads keep decoding further batches meanwhile, so decode, transfer and compute overlap.

``Device.accelerated`` forces the accelerator data path on any device, so the CPU tests exercise the same code a
GPU runs (minus the pinning and streams, which need CUDA). The compute dtype (bf16 where the hardware has it, fp16 on
GPUs without bf16) is ``backbones.resolve_dtype``'s choice; :func:`capabilities` reports what a device offers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lowshot.data.transforms import ImageTransform


@dataclass
class Device:
    """How batches reach ``device``: pinned staging and non-blocking copies where they exist (CUDA)."""

    device: torch.device
    accelerated: bool = False  # uint8 to the device, normalised there (True on any non-CPU device)
    pin_memory: bool = False  # page-locked host buffers: needed for truly asynchronous host-to-device copies
    _copy_stream: object | None = field(default=None, repr=False)
    _host_out: torch.Tensor | None = field(default=None, repr=False)  # the CPU path's output, reused

    @classmethod
    def for_device(cls, device: torch.device | str, *, accelerated: bool | None = None) -> Device:
        """The data path for ``device``; ``accelerated`` overrides the choice (tests force it on the CPU)."""
        device = torch.device(device)
        on_cuda = device.type == "cuda" and torch.cuda.is_available()
        stream = torch.cuda.Stream(device) if on_cuda else None
        return cls(device, accelerated=device.type != "cpu" if accelerated is None else accelerated,
                   pin_memory=on_cuda, _copy_stream=stream)

    def host_batch(self, crops: list[np.ndarray]) -> torch.Tensor:
        """Stack uint8 crops (H, W, 3) into one (N, H, W, 3) host tensor, page-locked where that helps."""
        out = torch.empty((len(crops), *crops[0].shape), dtype=torch.uint8, pin_memory=self.pin_memory)
        np.stack(crops, out=out.numpy())
        return out

    def stage(self, crops: list[np.ndarray], transform: ImageTransform) -> torch.Tensor:
        """Decoded uint8 crops -> the normalised float32 batch (N, 3, H, W) on ``device``. On the CPU it lives in a
        buffer this Device reuses (see the module docstring): valid until the next call."""
        batch = self.host_batch(crops)
        if not self.accelerated:
            n, shape = batch.shape[0], (3, *batch.shape[1:3])
            if self._host_out is None or self._host_out.shape[1:] != shape or self._host_out.shape[0] < n:
                self._host_out = torch.empty(n, *shape, dtype=torch.float32)  # the largest batch so far
            return transform.normalize(batch, out=self._host_out[:n]).to(self.device)
        if self._copy_stream is None:
            return transform.normalize(batch.to(self.device, non_blocking=self.pin_memory))
        with torch.cuda.stream(self._copy_stream):
            moved = batch.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        moved.record_stream(torch.cuda.current_stream(self.device))  # the copy's memory is used on the main stream
        return transform.normalize(moved)

    def to_host(self, features: torch.Tensor) -> torch.Tensor:
        """Model output -> float32 on the CPU (a synchronising copy on accelerators)."""
        return features.float().cpu()


def capabilities(device: torch.device | str) -> dict:
    """What ``device`` offers the extraction: name, bfloat16 support, pinned memory, memory size."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "bf16": torch.cuda.is_bf16_supported(),
                "capability": f"{props.major}.{props.minor}", "memory_gb": props.total_memory / 2**30,
                "pin_memory": True}
    from lowshot.models.backbones import cpu_flags

    flags = cpu_flags()
    return {"type": device.type, "name": "cpu", "bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
            "pin_memory": False}
