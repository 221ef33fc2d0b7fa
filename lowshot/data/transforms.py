"""Image transforms: the MSN evaluation transform, and named alternatives.

``msn`` (`logistic_eval.py`): decode the whole image, Resize(256) on the shorter side (bilinear), CenterCrop(224),
ToTensor, Normalize with the ImageNet mean/std. We do this with PIL and numpy (there is no CPU torchvision here),
reproducing torchvision's size and crop arithmetic exactly. Decoding returns uint8 HWC crops; normalisation happens
batched on the torch side.

``msn-draft``: the same, except that libjpeg may decode a JPEG whose shorter side is at least twice 256 at 1/2, 1/4
or 1/8 scale (never below 256) before the resize: faster on big photos, slightly different pixels (its effect on
features and top-1 is measured by ``benchmarks/draft_decode.py``). ``processor``: the model's own
``preprocessor_config.json`` (HF ViT: resize straight to 224x224).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lowshot.config import TRANSFORMS  # noqa: F401 (declared with the extraction settings; re-exported)
from lowshot.errors import BadInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision / MSN logistic_eval.py
IMAGENET_STD = (0.229, 0.224, 0.225)
MSN_RESIZE = 256  # MSN logistic_eval.py: transforms.Resize(size=256)
MSN_CROP = 224  # MSN logistic_eval.py: transforms.CenterCrop(size=224)
ORIENTATION = 0x0112  # the EXIF orientation tag
BACKGROUND = (255, 255, 255)  # transparent pixels (RGBA, LA, palette with transparency) are composited on white

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class ImageTransform:
    """Resize + crop + normalise. ``mode`` is ``"shorter-side"`` (resize the shorter side to ``resize``, then
    center-crop ``crop``) or ``"square"`` (resize straight to ``crop`` x ``crop``, no crop: the HF processor way)."""

    name: str = "msn"
    mode: str = "shorter-side"
    resize: int = MSN_RESIZE
    crop: int = MSN_CROP
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    jpeg_draft: bool = False  # let libjpeg decode big JPEGs at 1/2, 1/4, 1/8 scale, never below the resize target

    def key(self) -> dict:
        """Everything that changes the pixels, for the cache key."""
        return asdict(self)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image (any mode) -> uint8 array (crop, crop, 3)."""
        image = to_rgb(image, draft_size=self.resize if self.mode == "shorter-side" else self.crop,
                       draft=self.jpeg_draft)
        resample = _RESAMPLE[self.interpolation]
        if self.mode == "square":
            image = image.resize((self.crop, self.crop), resample)
        else:
            image = image.resize(shorter_side_size(image.size, self.resize), resample)
            image = center_crop(image, self.crop)
        return np.asarray(image, dtype=np.uint8)

    def load(self, paths, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Image files -> the normalised batch (N, 3, crop, crop) that extraction feeds the model (for notebooks,
        checks and benchmarks; extraction itself decodes on worker threads)."""
        crops = []
        for path in paths:
            with Image.open(path) as image:
                crops.append(self(image))
        return self.normalize(torch.from_numpy(np.stack(crops)), dtype)

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """uint8 (N, H, W, 3) on any device -> normalised float (N, 3, H, W) there, as ToTensor + Normalize; into
        ``out`` (float32, that shape) when given. The same arithmetic on every device (the host path and an
        accelerator's give identical pixels)."""
        device = batch.device
        scale = (1.0 / (torch.tensor(self.std, dtype=torch.float32) * 255.0)).view(1, 3, 1, 1).to(device)
        shift = -torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) / torch.tensor(self.std).view(1, 3, 1, 1)
        shift = shift.to(device)
        x = torch.empty(batch.shape[0], 3, *batch.shape[1:3], dtype=torch.float32, device=device) if out is None \
            else out
        x.copy_(batch.permute(0, 3, 1, 2))  # one pass to planar float, then two in place: 3x faster than before
        return x.mul_(scale).add_(shift).to(dtype)




def msn_transform(*, draft: bool = False) -> ImageTransform:
    """The MSN protocol's transform (the default: full decode, as the reference); ``draft=True``: ``msn-draft``."""
    return ImageTransform(name="msn-draft", jpeg_draft=True) if draft else ImageTransform()


def named_transform(name: str, model_folder: str | Path) -> ImageTransform:
    """The transform a ``--transform`` name stands for (see the module docstring)."""
    if name not in TRANSFORMS:
        raise BadInputError(f"--transform {name!r}: expected one of {', '.join(TRANSFORMS)}")
    if name == "processor":
        return processor_transform(model_folder)
    return msn_transform(draft=name == "msn-draft")


def processor_transform(model_dir: str | Path) -> ImageTransform:
    """The model's own ``preprocessor_config.json`` (HF ViT processors resize straight to a square, no crop)."""
    path = Path(model_dir) / "preprocessor_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    size = cfg.get("size", {"height": 224, "width": 224})
    side = size.get("height", size.get("shortest_edge", 224)) if isinstance(size, dict) else int(size)
    resample = {2: "bilinear", 3: "bicubic"}.get(cfg.get("resample", 2), "bilinear")
    return ImageTransform(
        name="processor", mode="square", resize=side, crop=side, interpolation=resample,
        mean=tuple(cfg.get("image_mean", IMAGENET_MEAN)), std=tuple(cfg.get("image_std", IMAGENET_STD)),
    )


def shorter_side_size(size: tuple[int, int], target: int) -> tuple[int, int]:
    """torchvision's Resize(int) arithmetic: shorter side -> target, longer side truncated proportionally."""
    w, h = size
    if w <= h:
        return target, int(target * h / w)
    return int(target * w / h), target


def center_crop(image: Image.Image, crop: int) -> Image.Image:
    """torchvision's CenterCrop arithmetic (round half to even on the offsets, as in torchvision)."""
    w, h = image.size
    if w < crop or h < crop:  # torchvision pads with zeros, (crop - side) // 2 before; only when resize < crop
        padded = Image.new(image.mode, (max(w, crop), max(h, crop)))
        padded.paste(image, (max(crop - w, 0) // 2, max(crop - h, 0) // 2))
        image, (w, h) = padded, padded.size
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def to_rgb(image: Image.Image, *, draft_size: int | None = None, draft: bool = True) -> Image.Image:
    """Any PIL image -> RGB: EXIF orientation applied, first frame of animations, alpha composited on
    ``BACKGROUND``, 16-bit and float greyscale scaled to 8 bits, CMYK converted."""
    if draft and draft_size and image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
        w, h = image.size
        scale = min(w, h) / draft_size
        if scale >= 2:  # only worth it, and only safe, when libjpeg can halve without going below the target
            image.draft(image.mode, (math.ceil(w / scale), math.ceil(h / scale)))
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd EXIF; the orientation is still applied
        if image.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image (7% of a decode)
            image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8))
    return image.convert("RGB") if image.mode != "RGB" else image
