"""Committed files stay usable: every bench config with baselines passes its own gate against them with today's code
(so a format or protocol change cannot strand them), and no committed JSON carries a machine's absolute path."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowshot.cli import app

from .conftest import REPO, SHARED, require_shared

runner = CliRunner()
# Absolute paths of one machine: POSIX homes and scratch folders, this project's work tree, macOS, Windows drives.
MACHINE_PATH = re.compile(r"(?<![\w.])(/work/|/root/|/home/|/tmp/|/Users/|[A-Za-z]:\\\\)")


def committed_json() -> list[str]:
    """Every JSON under benchmarks/ and examples/ that git tracks (all of them there, without git)."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "benchmarks", "examples"], capture_output=True,
                                text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(REPO)) for folder in ("benchmarks", "examples")
                  for p in (REPO / folder).rglob("*") if "out" not in p.relative_to(REPO).parts]
    return sorted(p for p in listed if p.endswith(".json"))


@pytest.mark.parametrize("path", committed_json())
def test_committed_json_holds_no_absolute_machine_path(path):
    text = (REPO / path).read_text()
    found = sorted({text[max(0, m.start() - 30):m.start() + 40] for m in MACHINE_PATH.finditer(text)})
    assert not found, f"{path}: {found[:3]}"


def test_the_machine_path_pattern_finds_each_kind_and_spares_relative_paths():
    for text in ('"/work/shared/x"', '"/home/me/x"', '"/tmp/a"', '"/Users/me"', '"C:\\\\data"', '"--data /root/d"'):
        assert MACHINE_PATH.search(text), text
    for text in ('"../../shared/data/models/deit-tiny-patch16-224"', '"out/digits"', '"facebook/vit-msn-small"',
                 '"1/2"', '"a/work/b"'):
        assert not MACHINE_PATH.search(text), text


# -- each committed bench config against its committed baselines (real DeiT-Tiny: slow) ---------------------------
def bench_passes(config: Path, cache: Path, output: Path) -> str:
    result = runner.invoke(app, ["bench", str(config), "--cache-dir", str(cache), "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output, result.output
    return result.output


@pytest.mark.slow
def test_ci_benchmark_passes_its_gate_against_its_committed_baseline(imagenette_cache, tmp_path):
    """What examples/github-actions-benchmark.yml runs: 'lowshot bench benchmarks/imagenette-deit-tiny.toml'."""
    require_shared()
    output = bench_passes(REPO / "benchmarks" / "imagenette-deit-tiny.toml", imagenette_cache, tmp_path / "out")
    assert "gate passed: deit-tiny" in output


@pytest.mark.slow
def test_example_suite_passes_its_gates_against_its_committed_baselines(imagenette_cache, tmp_path):
    """examples/suite.toml with its inputs made as its header says, in a copy of the repository's layout (the config
    reaches ../../shared beside the checkout and out/ beside itself)."""
    require_shared()
    root = tmp_path / "root"
    examples = root / "main" / "examples"
    examples.mkdir(parents=True)
    (root / "shared").symlink_to(SHARED.parent, target_is_directory=True)
    (examples / "suite.toml").write_bytes((REPO / "examples" / "suite.toml").read_bytes())
    for baseline in (REPO / "examples" / "baseline").rglob("*.json"):
        target = examples / baseline.relative_to(REPO / "examples")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(baseline.read_bytes())
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from make_digits import make_digits
        from make_random_model import make_random_model
        from make_subset import make_subset
    finally:
        del sys.path[0]
    make_subset(SHARED / "datasets" / "imagenette2-224", examples / "out" / "imagenette-30",
                per_split={"train": 30, "val": 30})
    make_digits(examples / "out" / "digits")
    make_random_model(SHARED / "models" / "deit-tiny-patch16-224", examples / "out" / "deit-tiny-random")
    output = bench_passes(examples / "suite.toml", imagenette_cache, tmp_path / "out")
    for name in ("deit-tiny on imagenette", "deit-tiny-random on imagenette", "deit-tiny on digits",
                 "deit-tiny-random on digits"):
        assert f"gate passed: {name}" in output
