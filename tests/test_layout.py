"""The package's folders are the pipeline's stages, in the order data flows, and no import runs back up.

data -> models -> features -> classify -> results, over a base (errors, config, io) every stage may use; the
orchestrators at the top (protocol, bench, cli, render) may use them all. Read from the source, lazy imports
inside functions included, so an arrow added anywhere fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowshot"
BASE = {"errors": 0, "config": 1, "io": 1}  # errors imports nothing of lowshot; config and io may use errors
STAGES = ("data", "models", "features", "classify", "results")
SKIN = ("cli", "render", "__main__")  # the only modules that may import typer or rich


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def lowshot_imports(path: Path, source: str | None = None) -> set[str]:
    """Every lowshot module ``path`` imports (its text, or ``source`` as if it sat there), at the top or inside a
    function."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if base != "lowshot" and not base.startswith("lowshot."):
                continue
            for alias in node.names:  # ``from lowshot.models import backbones`` names a module
                target = f"{base}.{alias.name}"
                found.add(target if is_module(target) else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("lowshot."))
    found.discard("lowshot")  # the package itself: its __version__
    return found


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def third_party(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
    return roots


def rank(module: str) -> tuple[int, str]:
    """(level, group): lower levels may be imported by higher ones; one group's modules may import each other."""
    parts = module.split(".")[1:]
    if not parts or parts[0] not in (*BASE, *STAGES):
        return 100, "top"
    if parts[0] in BASE:
        return BASE[parts[0]], parts[0]
    return 10 + STAGES.index(parts[0]), parts[0]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_sits_in_a_stage_folder_or_at_the_top_on_purpose():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {"__init__", "__main__", "errors", "config", "io", "protocol", "bench", "cli", "render",
                   "evaluator"}
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(STAGES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_run_down_the_pipeline_only(path):
    importer = module_name(path)
    level, group = rank(importer)
    upward = [target for target in lowshot_imports(path)
              if rank(target)[1] != group and rank(target)[0] >= level and target != "lowshot"]
    assert not upward, f"{importer} imports {upward}: an arrow back up the pipeline"


def test_the_rules_catch_an_upward_arrow():
    """The checker itself: a data module that imports the feature store is flagged."""
    source = "def f():\n    from lowshot.features.store import Features\nfrom ..models import backbones\n"
    imports = lowshot_imports(PACKAGE / "data" / "subsets.py", source)
    assert imports == {"lowshot.features.store", "lowshot.models.backbones"}
    assert all(rank(t)[0] > rank("lowshot.data.subsets")[0] for t in imports)


@pytest.mark.parametrize("path", [p for p in MODULES if p.stem not in SKIN], ids=lambda p: module_name(p))
def test_the_core_never_imports_typer_or_rich(path):
    assert not third_party(path) & {"typer", "rich", "click"}
