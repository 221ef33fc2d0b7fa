"""The LICENSE file and pyproject.toml name the same license (the wheel ships LICENSE through license-files)."""

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# The first lines of a license text -> its SPDX identifier (pyproject.toml's ``license`` is an SPDX expression).
HEADERS = {r"Apache License\s+Version 2\.0, January 2004": "Apache-2.0", r"MIT License": "MIT",
           r"BSD 3-Clause License": "BSD-3-Clause"}


def spdx_of(text: str) -> str | None:
    head = " ".join(text.split()[:12])
    return next((spdx for pattern, spdx in HEADERS.items() if re.search(pattern, head)), None)


def test_license_file_names_the_license_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == spdx_of((ROOT / "LICENSE").read_text()) == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]


def test_license_file_is_the_full_apache_text_with_our_copyright():
    text = (ROOT / "LICENSE").read_text()
    assert "END OF TERMS AND CONDITIONS" in text and text.count("\n") > 190
    assert "Copyright 2026 the lowshot authors" in text and "[yyyy]" not in text


def test_spdx_of_tells_licenses_apart():
    assert spdx_of("MIT License\n\nCopyright (c) 2026") == "MIT"
    assert spdx_of("  Apache License\n  Version 2.0, January 2004\n") == "Apache-2.0"
    assert spdx_of("GNU GENERAL PUBLIC LICENSE") is None
