"""Help and usage errors read like the rest of lowshot: paragraphs that reflow, words (not Python types) for
values, -h as --help everywhere, and a usage error as one ``error:`` line with exit 2."""

import re

import pytest
import typer
from typer.testing import CliRunner

from lowshot.cli import app

runner = CliRunner()
WIDTH = {"COLUMNS": "80"}


def all_commands() -> list[list[str]]:
    found = [[]]

    def walk(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            found.append([*path, name])
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = all_commands()


def help_of(*path: str, flag: str = "--help") -> str:
    result = runner.invoke(app, [*path, flag], env=WIDTH, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_listed():
    assert {" ".join(p) for p in COMMANDS} >= {"", "extract", "probe", "report", "bench", "export", "cache",
                                                "cache list", "cache rm", "cache verify"}


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "lowshot")
def test_dash_h_is_help_for_the_app_and_every_command(path):
    assert help_of(*path, flag="-h") == help_of(*path)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "lowshot")
def test_help_paragraphs_reflow_at_80_columns_instead_of_keeping_the_docstring_line_breaks(path):
    text = help_of(*path)
    description = text.split("╭")[0].splitlines()
    paragraph: list[str] = []
    for line in [*description, ""]:
        if line.strip():
            paragraph.append(line.strip())
            continue
        for cut in paragraph[:-1]:  # every line but a paragraph's last runs to near the right margin
            if not cut.startswith(("Usage:", "1.", "2.", "3.", "lowshot")):
                assert len(cut) > 55, (path, cut)
        paragraph = []


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "lowshot")
def test_values_are_shown_as_words_not_python_types(path):
    text = help_of(*path)
    assert not re.search(r"<(int|str|float|bool|path|list\[[^\]]*\])>", text, re.I), text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and not re.search(r" [a-z_]+\.\.\.", usage), usage  # not {results}...


def test_the_words_chosen_for_the_main_values():
    assert "Usage: lowshot report [OPTIONS] RESULTS.json..." in help_of("report")
    assert "Usage: lowshot bench [OPTIONS] CONFIG.toml" in help_of("bench")
    probe = help_of("probe")
    for shown in (r"--shots\s+LIST", r"--seeds\s+N\b", r"--output\s+-o\s+FILE", r"--model\s+-m\s+MODEL"):
        assert re.search(shown, probe), shown


@pytest.mark.parametrize(("args", "message"), [
    (["probe", "--seeds", "abc"], "error: invalid value for '--seeds'"),
    (["probe", "--xyzzy"], "error: no such option: --xyzzy; see 'lowshot probe --help'"),  # near no option's name
    (["report"], "error: missing argument 'RESULTS.json'; see 'lowshot report --help'"),
    (["frobnicate"], "error: no such command 'frobnicate'"),
    (["cache", "rm", "--bogus"], "error: no such option: --bogus; see 'lowshot cache rm --help'"),
])
def test_a_usage_error_is_one_error_line_and_exit_2(args, message):
    result = runner.invoke(app, args, env=WIDTH, terminal_width=80)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()], result.output  # one line, no box
    assert result.output.startswith(message), result.output
