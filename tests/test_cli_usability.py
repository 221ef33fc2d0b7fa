"""What a new user meets first: --version, help texts that say what they mean, output paths checked up front, the
demo data announced, plain text never read as markup, and the quickstart example running to the end."""

import os
import re
import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

import lowshot
from lowshot.cli import app

from .conftest import REPO

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def flat(text: str) -> str:
    """Help output without the panel borders and line wrapping, for substring checks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def commands() -> list[tuple[list[str], click.Command]]:
    root = typer.main.get_command(app)
    found = []
    for name, command in root.commands.items():
        if isinstance(command, click.Group):
            found += [([name, sub], c) for sub, c in command.commands.items()]
        else:
            found.append(([name], command))
    return found


def test_version_alone_prints_the_version_and_exits_zero():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"lowshot {lowshot.__version__}"


@pytest.mark.parametrize(("path", "command"), commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_help_keeps_square_brackets_and_shows_no_value_for_flags(path, command):
    result = invoke(*path, "--help", terminal_width=100, env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    shown = flat(result.output)
    for param in command.params:
        for bracketed in re.findall(r"\[[^\]]*\]", getattr(param, "help", None) or ""):
            assert flat(bracketed) in shown, (param.name, bracketed)
    assert "<bool>" not in result.output


@pytest.mark.parametrize(("output", "message"), [("results.txt", "unknown extension '.txt'"),
                                                 ("results", "unknown extension '(none)'"),
                                                 ("a-file/results.json", "is not a folder")])
def test_a_bad_probe_output_fails_before_any_work(tmp_path, monkeypatch, output, message):
    (tmp_path / "a-file").write_text("not a folder")
    import lowshot.extract

    def never(*args, **kwargs):
        raise AssertionError("features were loaded before --output was checked")

    monkeypatch.setattr(lowshot.extract, "load_features", never)
    result = invoke("probe", "--output", tmp_path / output)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_bad_report_output_or_plot_fails_before_reading_results(tmp_path):
    missing = tmp_path / "does-not-exist.json"
    result = invoke("report", missing, "--output", tmp_path / "report.html")
    assert result.exit_code == 2 and "unknown extension '.html'" in result.output
    (tmp_path / "f").write_text("")
    result = invoke("report", missing, "--plot", tmp_path / "f" / "plot.png")
    assert result.exit_code != 0 and "--plot" in result.output and "is not a folder" in result.output


def test_results_are_saved_atomically_into_new_folders_and_refuse_unknown_extensions(tmp_path):
    from lowshot.errors import BadInputError
    from lowshot.results import Results

    results = Results({"model": "m"}, [{"subset": "1-shot", "seed": 0, "top1": 50.0, "n_train": 2}])
    saved = results.save(tmp_path / "new" / "deeper" / "r.json")
    assert Results.load(saved).rows == results.rows
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0o600
    with pytest.raises(BadInputError, match="unknown extension '.txt'"):
        results.save(tmp_path / "r.txt")


@pytest.mark.slow
def test_extract_without_data_says_it_uses_the_bundled_demo_and_prints_keys_literally(tiny_model, cache_dir):
    result = invoke("extract", "--model", tiny_model, "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "no --data given: using the bundled demo sample" in result.output
    assert re.search(r"\[key [0-9a-f]{12}\]", result.output)  # was swallowed as rich markup


@pytest.mark.slow
def test_quickstart_example_runs_to_the_end(tiny_model, image_data, tmp_path):
    env = {**os.environ, "LOWSHOT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), str(tiny_model), str(image_data)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 5-shot |" in done.stdout and "5-shot probe, seed 0" in done.stdout
    assert (tmp_path / "quickstart-results.json").is_file()
