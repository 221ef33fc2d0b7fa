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
    import lowshot.features.extract

    def never(*args, **kwargs):
        raise AssertionError("features were loaded before --output was checked")

    monkeypatch.setattr(lowshot.features.extract, "load_features", never)
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
    from lowshot.results.rows import Results

    results = Results({"model": "m"}, [{"subset": "1-shot", "classifier": "logistic", "seed": 0, "top1": 50.0,
                                          "n_train": 2}])
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


def test_a_model_that_is_an_ordinary_file_says_what_it_is_and_what_is_expected(tmp_path):
    from lowshot.errors import ModelLoadError
    from lowshot.models.backbones import resolve_model_folder

    readme = tmp_path / "README.md"
    readme.write_text("# not a model")
    with pytest.raises(ModelLoadError, match=r"is a file, not a model; give a folder with config.json and the "
                                             r"weights, a raw MSN checkpoint \(\.pth\.tar"):
        resolve_model_folder(str(readme))
    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_model_folder(str(tmp_path / "missing"))


def no_network(*args, **kwargs):
    """What huggingface_hub raises when the hub cannot be reached and the model is not in its cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        raise ConnectionError("[Errno -2] Name or service not known")
    except ConnectionError as cause:
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub, and we "
                                      "cannot find the appropriate snapshot folder") from cause


def test_an_unreachable_hub_says_there_is_no_network_and_how_to_pass_a_folder(monkeypatch, image_data, cache_dir):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    result = invoke("extract", "--model", "someuser/some-model", "--data", image_data)
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert line.startswith("error: cannot load model 'someuser/some-model': no network connection to the Hugging "
                           "Face hub") and "--model /path/to/folder" in line, line
    assert "Error" not in line.replace("error:", "")  # no exception class named to the user


@pytest.mark.parametrize(("name", "message"), [("RepositoryNotFoundError", "no such model on the Hugging Face hub"),
                                               ("GatedRepoError", "a gated model")])
def test_other_hub_failures_are_said_in_words(monkeypatch, name, message):
    import huggingface_hub
    from huggingface_hub import errors

    from lowshot.errors import ModelLoadError
    from lowshot.models.backbones import resolve_model_folder

    def refuse(*args, **kwargs):
        cls = getattr(errors, name)
        exc = cls.__new__(cls)  # as raised for a 401/404 (its constructor wants a live HTTP response)
        Exception.__init__(exc, "401 Client Error")
        raise exc

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(ModelLoadError, match=message) as caught:
        resolve_model_folder("someuser/some-model")
    assert name not in str(caught.value)


def test_merging_into_a_card_without_front_matter_logs_no_hub_warning(tmp_path):
    import logging

    from .test_report import BASE, make_results, write

    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("huggingface_hub.repocard")
    logger.addHandler(handler)
    try:
        card = tmp_path / "README.md"
        card.write_text("# My model\n\nSome text.\n")
        result = invoke("report", write(tmp_path, "a.json", make_results("vit-a", BASE)), "--card", card)
    finally:
        logger.removeHandler(handler)
    assert result.exit_code == 0, result.output
    assert not [r.getMessage() for r in records], records  # "Repo card metadata block was not found"
    assert card.read_text().startswith("---\nmodel-index:") and "Some text." in card.read_text()


def test_make_random_model_draws_no_progress_bar(tiny_model, tmp_path, capfd, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    from make_random_model import make_random_model

    make_random_model(tiny_model, tmp_path / "random")
    assert (tmp_path / "random" / "config.json").is_file()
    assert "Writing model shards" not in capfd.readouterr().err


def test_an_error_before_any_progress_is_the_first_line_not_after_an_empty_progress_line(tmp_path):
    result = runner.invoke(app, ["probe", "--model", str(tmp_path), "--data", str(tmp_path / "missing")])
    assert result.exit_code != 0
    assert result.output.startswith("error:"), repr(result.output[:80])
