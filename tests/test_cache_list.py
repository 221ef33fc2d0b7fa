"""``lowshot cache list`` says where the cache is on its first line, also when the cache is empty."""

from typer.testing import CliRunner

from lowshot.cli import app


def test_cache_list_prints_the_cache_folder_first_even_when_empty(tmp_path):
    folder = tmp_path / ("a long folder name, so that a wrapped line would show " * 2).strip()
    result = CliRunner().invoke(app, ["cache", "list", "--cache-dir", str(folder)])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"cache dir: {folder}" and "no cached features" in lines[1]
