"""Benchmark scripts write their results through benchmarks/_common.write, which must leave no machine path in a file
that is committed (command lines and log lines name the repository, ../shared and temporary folders)."""

import tempfile
from pathlib import Path

from benchmarks._common import REPO, write

from .test_committed_baselines import MACHINE_PATH


def test_written_results_name_the_repository_shared_data_and_temp_folders_without_machine_paths(tmp_path):
    temp = Path(tempfile.gettempdir())
    command = (f"--model {REPO.parent}/shared/data/models/m --out {REPO}/benchmarks/out/x --cache {temp}/run-1/cache "
               f"--tree {REPO.parent}/bench-tree/work/cache")
    json_path, md_path = write("run", {"command": command}, f"Command: `{command}`", out_dir=tmp_path)
    for text in (json_path.read_text(), md_path.read_text()):
        assert not MACHINE_PATH.search(text), text
        assert "--model ../shared/data/models/m --out ./benchmarks/out/x --cache $TMPDIR/run-1/cache" in text
        assert "--tree ../bench-tree/work/cache" in text
