"""The package as a user installs it: importable from the folder that holds the clone, with its data files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_from_the_folder_holding_a_clone_named_lowshot_finds_the_package(tmp_path):
    # The README's layout: the clone (named lowshot) beside shared/, python started one level up. With a meta-path
    # editable finder the clone folder wins as an empty namespace package and lowshot.load_export is missing.
    (tmp_path / "lowshot").symlink_to(REPO, target_is_directory=True)
    code = "import lowshot; print(lowshot.__file__); print(callable(lowshot.load_export))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    where, has_api = done.stdout.split()
    assert Path(where).resolve() == (REPO / "lowshot" / "__init__.py").resolve()
    assert has_api == "True"
