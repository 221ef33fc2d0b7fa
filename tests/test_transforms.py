from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowshot.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    center_crop,
    msn_transform,
    named_transform,
    processor_transform,
    shorter_side_size,
)
from lowshot.errors import BadInputError

from .conftest import DEIT_TINY, IMAGENETTE


def gradient_image(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.broadcast_to((x + y) / 2, (h, w, 1))], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_shorter_side_resize_follows_torchvision_arithmetic():
    assert shorter_side_size((500, 375), 256) == (341, 256)  # int(256 * 500 / 375) = 341
    assert shorter_side_size((375, 500), 256) == (256, 341)
    assert shorter_side_size((224, 224), 256) == (256, 256)


def test_msn_transform_on_non_square_image_is_resize_256_then_center_crop_224():
    image = gradient_image(500, 375)
    out = msn_transform()(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    resized = image.resize((341, 256), Image.Resampling.BILINEAR)
    left, top = int(round((341 - 224) / 2.0)), int(round((256 - 224) / 2.0))
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)))
    np.testing.assert_array_equal(out, expected)


def test_normalize_matches_to_tensor_then_imagenet_normalize():
    crop = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    got = msn_transform().normalize(torch.from_numpy(crop))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(crop).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_processor_transform_reads_the_models_preprocessor_config():
    tf = processor_transform(DEIT_TINY)
    assert (tf.mode, tf.crop, tf.interpolation) == ("square", 224, "bicubic")
    assert tf.key() != msn_transform().key()
    assert tf(gradient_image(500, 375)).shape == (224, 224, 3)


def test_center_crop_pads_images_smaller_than_the_crop_with_zeros_as_torchvision():
    image = gradient_image(101, 150)  # narrower and shorter than the crop: padded on all sides, never resized
    out = np.asarray(center_crop(image, 224))
    expected = np.zeros((224, 224, 3), dtype=np.uint8)
    left, top = (224 - 101) // 2, (224 - 150) // 2  # torchvision: padding (crop - side) // 2 before, rest after
    expected[top:top + 150, left:left + 101] = np.asarray(image)
    np.testing.assert_array_equal(out, expected)
    tall = gradient_image(100, 300)  # one side padded, the other cropped at round((300 - 224) / 2) = 38
    out = np.asarray(center_crop(tall, 224))
    np.testing.assert_array_equal(out[:, 62:162], np.asarray(tall)[38:262])
    assert not out[:, :62].any() and not out[:, 162:].any()


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_odd_image_modes_become_rgb_crops(mode):
    base = gradient_image(320, 240)
    image = base.convert(mode) if mode not in ("I;16", "I", "F") else \
        Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    if mode in ("I", "F"):
        image = image.convert(mode)
    out = ImageTransform()(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out.std() > 5  # a real picture came through, not a flat fill


def test_transparent_pixels_are_composited_on_white():
    image = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    out = ImageTransform()(image)
    assert (out == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    image = gradient_image(400, 300)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    upright_path = tmp_path / "upright.jpg"
    image.transpose(Image.Transpose.ROTATE_270).save(upright_path)  # what a viewer shows, stored without EXIF
    upright = ImageTransform(jpeg_draft=False)(Image.open(upright_path))
    got = ImageTransform(jpeg_draft=False)(Image.open(path))
    assert got.shape == (224, 224, 3)
    assert np.abs(got.astype(int) - upright.astype(int)).mean() < 2


def big_photo(tmp_path) -> Path:
    photo = Image.open(sorted((IMAGENETTE / "train" / "n01440764").glob("*.JPEG"))[0]).convert("RGB")
    path = tmp_path / "big.jpg"
    photo.resize((1200, 900), Image.Resampling.BICUBIC).save(path, quality=95)
    return path


def test_default_msn_transform_decodes_big_jpegs_fully_as_the_reference(tmp_path):
    path = big_photo(tmp_path)
    with Image.open(path) as image:
        full = image.convert("RGB")  # the reference: PIL's full decode, then Resize(256) + CenterCrop(224)
    resized = full.resize(shorter_side_size(full.size, 256), Image.Resampling.BILINEAR)
    left, top = int(round((resized.width - 224) / 2.0)), int(round((resized.height - 224) / 2.0))
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)))
    with Image.open(path) as image:
        np.testing.assert_array_equal(msn_transform()(image), expected)
    assert named_transform("msn", DEIT_TINY) == msn_transform()


def test_msn_draft_is_a_named_option_with_its_own_key_and_close_pixels(tmp_path):
    path = big_photo(tmp_path)
    draft = named_transform("msn-draft", DEIT_TINY)
    assert draft.jpeg_draft and draft.key() != msn_transform().key()
    with Image.open(path) as a, Image.open(path) as b:
        fast, full = draft(a).astype(float), msn_transform()(b).astype(float)
    assert 0 < np.abs(fast - full).mean() < 3.0  # the draft decode really ran, and stays close
    with pytest.raises(BadInputError, match="--transform 'nope'"):
        named_transform("nope", DEIT_TINY)
