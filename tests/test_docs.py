"""Every code block in README.md and docs/ runs, as written, the way a user would run it.

Each fenced block declares how it runs (a block with no language, or another one, fails the test):

- ``console``: every ``$ `` line is a shell command (a trailing ``\\`` continues it), run from a copy of the clone
  with ``../shared`` beside it, the package's ``lowshot`` command first on PATH, the hub offline and one feature
  cache for the whole session. The lines after a command are what it prints on stdout: each such line must appear
  in what the command printed, numbers within ``NUMBER_TOLERANCE`` (float32 features may move a mean by a test image
  across CPUs); a line ``...`` stands for lines not shown. A command is expected to exit 0 unless the block is
  preceded by ``<!-- exit: N -->``.
- ``python``: run as a script from the same folder (each block self-contained, as a reader copies it).
- ``toml`` whose first line is ``# file: PATH``: written to PATH, for the blocks after it; any other toml block must
  parse. ``yaml``: must parse.
- ``text``: output shown on its own, not run.

``<!-- skip: reason -->`` right before a block leaves it out (it needs a GPU or several machines); the reason is
required. A page's blocks run in order, in one folder, so a later block may use what an earlier one wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
NUMBER_TOLERANCE = 0.3  # points of top-1: one Imagenette test image moves a mean over 3 seeds by 0.01
LANGUAGES = {"console", "python", "toml", "yaml", "text"}
COPIED = ("benchmarks", "examples")  # written into by the blocks (out/ folders): copied, not linked
SETUP_MARKER = "<!-- setup:begin -->"
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    body: str
    skip: str | None = None
    exit_code: int = 0

    @property
    def where(self) -> str:
        page = self.page.resolve()
        return f"{page.relative_to(REPO) if page.is_relative_to(REPO) else page}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the directive comment just above each."""
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+)(.*)$", lines[i])
        if not fence:
            i += 1
            continue
        indent, ticks, language = fence.group(1), fence.group(2), fence.group(3).strip()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(ticks):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        above = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = re.match(r"<!--\s*skip:\s*(.*?)\s*-->", above)
        reason = skip.group(1) if skip else None
        if above == SETUP_MARKER:  # the set-up commands: .ci/run runs them in a fresh clone
            reason = "CI runs the set-up block (.ci/run)"
        exit_code = re.match(r"<!--\s*exit:\s*(\d+)\s*-->", above)
        found.append(Block(page, start + 1, language, "\n".join(body) + "\n", reason,
                           int(exit_code.group(1)) if exit_code else 0))
    return found


def commands_of(body: str) -> list[tuple[str, list[str]]]:
    """(command, expected stdout lines) for each ``$ `` line of a console block."""
    out: list[tuple[str, list[str]]] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            out.append((command, []))
        elif out:
            out[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"console block line before any '$ ' command: {line!r}")
        i += 1
    return out


def _skeleton(line: str) -> tuple[str, list[float]]:
    numbers = [float(n.replace(",", "")) for n in NUMBER.findall(line)]
    return " ".join(NUMBER.sub("#", line).split()), numbers


def check_output(expected: list[str], printed: str, where: str) -> None:
    """Each expected line (but ``...`` and blank ones) appears in ``printed``: same words, numbers within
    NUMBER_TOLERANCE."""
    actual = [_skeleton(line) for line in printed.splitlines()]
    for line in expected:
        if not line.strip() or line.strip() == "...":
            continue
        shape, numbers = _skeleton(line)
        if not any(shape == s and len(numbers) == len(n) and all(abs(a - b) <= NUMBER_TOLERANCE
                                                                 for a, b in zip(numbers, n, strict=True))
                   for s, n in actual):
            raise AssertionError(f"{where}: the docs show\n  {line}\nbut the command printed:\n{printed}")


def _clone(root: Path) -> Path:
    """A copy of the clone as a user has it (``lowshot/`` beside ``shared/``): folders the blocks write into are
    copied, the rest linked."""
    clone = root / "lowshot"
    clone.mkdir()
    for entry in REPO.iterdir():
        if entry.name in (".git", ".venv") or entry.name.startswith("."):
            continue
        if entry.name in COPIED:
            shutil.copytree(entry, clone / entry.name, ignore=shutil.ignore_patterns("out", "__pycache__"))
        else:
            (clone / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (root / "shared").symlink_to(SHARED, target_is_directory=True)
    return clone


def run_page(page: Path, root: Path, cache: Path) -> None:
    clone = _clone(root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOWSHOT_CACHE_DIR": str(cache), "COLUMNS": "80",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("FORCE_COLOR", None)
    for block in blocks_of(page):
        if block.skip is not None:
            assert block.skip, f"{block.where}: a skipped block must say why"
            continue
        if block.language == "console":
            for command, expected in commands_of(block.body):
                done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                                      timeout=1800)
                assert done.returncode == block.exit_code, (
                    f"{block.where}: `{command}` exited {done.returncode} (expected {block.exit_code})\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                check_output(expected, done.stdout, f"{block.where}: `{command}`")
        elif block.language == "python":
            done = subprocess.run([sys.executable, "-c", block.body], cwd=clone, env=env, capture_output=True,
                                  text=True, timeout=1800)
            assert done.returncode == 0, f"{block.where}: python block failed\n{done.stdout[-3000:]}\n" \
                                         f"{done.stderr[-3000:]}"
        elif block.language == "toml":
            first = block.body.splitlines()[0] if block.body.strip() else ""
            target = re.match(r"#\s*file:\s*(\S+)", first)
            tomllib.loads(block.body)
            if target:
                path = clone / target.group(1)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(block.body)
        elif block.language == "yaml":
            yaml.safe_load(block.body)


def test_every_block_declares_how_it_runs():
    for page in PAGES:
        for block in blocks_of(page):
            assert block.language in LANGUAGES, (
                f"{block.where}: fence language {block.language or '(none)'!r}; use one of {sorted(LANGUAGES)}")
            if block.language == "console":
                assert commands_of(block.body), f"{block.where}: a console block without a '$ ' command"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_page_blocks_run_as_written(page, tmp_path, imagenette_cache):
    # one cache for every page (and the other full-Imagenette tests): the same extraction twice is a cache hit
    run_page(page, tmp_path, imagenette_cache)


def test_check_output_accepts_rounding_and_rejects_a_stale_table():
    printed = "│ 1-shot  │ 84.52 ± 4.4 │ 3 │\n│ 2-shot  │ 95.4 ± 0.8 │ 3 │\n"
    check_output(["│ 1-shot  │ 84.6 ± 4.4 │ 3 │", "..."], printed, "here")
    with pytest.raises(AssertionError, match="the docs show"):
        check_output(["│ 1-shot  │ 86.5 ± 4.4 │ 3 │"], printed, "here")
    with pytest.raises(AssertionError, match="the docs show"):
        check_output(["│ 5-shot  │ 84.5 ± 4.4 │ 3 │"], printed, "here")


def test_blocks_of_reads_directives_and_commands_of_joins_continuations(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n\n<!-- skip: needs a GPU -->\n```console\n$ lowshot probe \\\n  --seeds 1\nout\n```\n"
                    "<!-- exit: 1 -->\n```console\n$ false\n```\n")
    first, second = blocks_of(page)
    assert first.skip == "needs a GPU" and second.exit_code == 1
    assert commands_of(first.body) == [("lowshot probe  --seeds 1", ["out"])]
