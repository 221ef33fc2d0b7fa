import numpy as np
import pytest
import torch

from lowshot.data.transforms import msn_transform, processor_transform
from lowshot.models.devices import Device, capabilities

from .conftest import IMAGENETTE, require_shared


def real_crops(n=5):
    require_shared()
    files = sorted((IMAGENETTE / "val").glob("*/*.JPEG"))[:: 97][:n]
    tf = msn_transform()
    crops = []
    from PIL import Image

    for f in files:
        with Image.open(f) as image:
            crops.append(tf(image))
    return crops


@pytest.mark.parametrize("transform", [msn_transform(), processor_transform("/nonexistent")])
def test_accelerator_data_path_gives_the_same_pixels_as_the_host_path(transform):
    crops = real_crops()
    host = Device.for_device("cpu").stage(crops, transform)
    device_path = Device.for_device("cpu", accelerated=True).stage(crops, transform)
    reference = transform.normalize(torch.from_numpy(np.stack(crops)))
    assert host.dtype == device_path.dtype == torch.float32 and host.shape == (5, 3, 224, 224)
    assert torch.equal(host, reference)
    assert torch.equal(device_path, reference)  # same arithmetic on the device as on the host: identical floats


def test_the_cpu_path_normalises_into_one_kept_buffer():
    crops, transform = real_crops(5), msn_transform()
    device = Device.for_device("cpu")
    first = device.stage(crops, transform)
    pointer = first.data_ptr()
    for batch in (crops[::-1], crops[:2], crops):  # other pixels, a smaller last batch, the full size again
        staged = device.stage(batch, transform)
        assert staged.data_ptr() == pointer  # no fresh 38 MB tensor per 64-image batch (page faults: devices.py)
        assert torch.equal(staged, transform.normalize(torch.from_numpy(np.stack(batch))))


def test_normalize_keeps_the_batch_on_its_device():
    batch = torch.from_numpy(np.stack(real_crops(2)))
    out = msn_transform().normalize(batch.to("meta"))
    assert out.device.type == "meta" and out.shape == (2, 3, 224, 224) and out.dtype == torch.float32


def test_cpu_device_uses_no_pinned_memory_and_reports_bf16_from_the_cpu_flags(monkeypatch):
    device = Device.for_device("cpu")
    assert not device.accelerated and not device.pin_memory
    batch = device.host_batch(real_crops(2))
    assert batch.dtype == torch.uint8 and batch.shape == (2, 224, 224, 3) and not batch.is_pinned()
    monkeypatch.setenv("LOWSHOT_CPU_FLAGS", "avx512_bf16")
    assert capabilities("cpu") == {"type": "cpu", "name": "cpu", "bf16": True, "pin_memory": False}
    monkeypatch.setenv("LOWSHOT_CPU_FLAGS", "")
    assert capabilities("cpu")["bf16"] is False


def test_extraction_through_the_accelerator_data_path_matches_the_host_path(tiny_model, image_data, tmp_path,
                                                                            monkeypatch):
    from lowshot.features.extract import extract_features
    from lowshot.models import devices

    host = extract_features(str(tiny_model), image_data, cache_dir=tmp_path / "a", dtype="float32", device="cpu")
    original = devices.Device.for_device.__func__
    monkeypatch.setattr(devices.Device, "for_device",
                        classmethod(lambda cls, d, accelerated=None: original(cls, d, accelerated=True)))
    moved = extract_features(str(tiny_model), image_data, cache_dir=tmp_path / "b", dtype="float32", device="cpu")
    for a, b in zip(host.splits(), moved.splits(), strict=True):
        assert not a.cached and not b.cached and a.images == b.images > 0
        np.testing.assert_array_equal(np.asarray(a.features.features), np.asarray(b.features.features))
