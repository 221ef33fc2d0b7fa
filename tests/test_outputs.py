"""Output paths: checked by a real write before any work (``os.access`` says yes for /proc and /sys), the table
printed before any file is written, and a file that still fails at the end kept elsewhere, named in one line."""

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowshot.cli import app
from lowshot.errors import BadInputError, OutputError
from lowshot.io import check_folder, check_writable, save_text

from .test_report import BASE, make_results, write

runner = CliRunner()
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and /sys are Linux's")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@linux_only
@pytest.mark.parametrize("path", ["/proc/x.json", "/sys/x.json", "/sys/kernel/new-folder/x.json"])
def test_a_path_in_proc_or_sys_is_refused_up_front_although_os_access_allows_it(path):
    with pytest.raises(BadInputError, match="cannot create a file in"):
        check_writable(path)
    with pytest.raises(BadInputError, match="cannot create"):
        check_folder(Path(path).parent)


def test_the_up_front_check_leaves_no_file_behind_and_refuses_devices_and_folders(tmp_path):
    check_writable(tmp_path / "new" / "r.json")
    assert list(tmp_path.iterdir()) == []  # the probe file is removed, the missing folder not yet created
    with pytest.raises(BadInputError, match="is not a regular file"):
        check_writable("/dev/null")
    with pytest.raises(BadInputError, match="is a folder"):
        check_writable(tmp_path)


@linux_only
def test_probe_output_in_proc_fails_before_any_work(monkeypatch):
    import lowshot.features.extract

    def never(*args, **kwargs):
        raise AssertionError("features were loaded before --output was checked")

    monkeypatch.setattr(lowshot.features.extract, "load_features", never)
    result = invoke("probe", "--output", "/proc/x.json")
    assert result.exit_code == 2 and "--output /proc/x.json: cannot create a file in /proc" in result.output


def test_probe_output_that_is_a_folder_says_so_and_names_a_file_to_give(tmp_path):
    result = invoke("probe", "--output", tmp_path)
    assert result.exit_code == 2
    assert f"--output {tmp_path}: is a folder; give a file name such as {tmp_path / 'results.json'}" in result.output
    assert "unknown extension" not in result.output


def test_a_save_that_fails_at_the_end_keeps_the_content_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gone").write_text("a file where the folder was")
    with pytest.raises(OutputError, match=r"--output gone/r\.md: cannot write \(.*\); its content was saved to "
                                          r".*r-\d{8}-\d{6}\.md instead") as caught:
        save_text(Path("gone") / "r.md", "the results")
    kept = Path(str(caught.value).split("saved to ")[1].split(" instead")[0])
    assert kept.parent == tmp_path and kept.read_text() == "the results"


def test_report_prints_the_table_first_and_keeps_the_output_when_its_folder_vanishes(tmp_path, monkeypatch):
    import lowshot.results.compare

    monkeypatch.chdir(tmp_path)
    a = write(tmp_path, "a.json", make_results("vit-a", BASE))
    out = tmp_path / "out" / "report.json"
    real = lowshot.results.compare.build_report

    def build_then_lose_the_folder(*args, **kwargs):  # the folder becomes a file while the work runs
        (tmp_path / "out").write_text("")
        return real(*args, **kwargs)

    monkeypatch.setattr(lowshot.results.compare, "build_report", build_then_lose_the_folder)
    result = invoke("report", a, "--output", out)
    assert result.exit_code == 1, result.output
    assert "vit-a" in result.stdout  # the table was printed although the file could not be written
    assert f"error: --output {out}: cannot write" in result.output and "Traceback" not in result.output
    kept = list(tmp_path.glob("report-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())  # the report, whole, in the current folder
    assert str(kept[0].name) in result.output


def test_probe_prints_the_table_and_keeps_the_results_when_the_output_cannot_be_written_at_the_end(
        tiny_model, image_data, cache_dir, tmp_path, monkeypatch):
    import lowshot.protocol

    monkeypatch.chdir(tmp_path)
    real = lowshot.protocol.run_probe

    def probe_then_lose_the_folder(*args, **kwargs):
        results = real(*args, **kwargs)
        (tmp_path / "out").rmdir()
        (tmp_path / "out").write_text("")  # a file where the output folder was: nothing can be created in it
        return results

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(lowshot.protocol, "run_probe", probe_then_lose_the_folder)
    result = invoke("probe", "--model", tiny_model, "--data", image_data, "--device", "cpu", "--shots", "1",
                    "--percent", "0", "--seeds", "1", "--output", tmp_path / "out" / "r.json")
    assert result.exit_code == 1, result.output
    assert "1-shot" in result.stdout
    kept = list(tmp_path.glob("r-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["rows"][0]["subset"] == "1-shot"
    assert f"its content was saved to {kept[0]} instead" in result.output


@pytest.mark.parametrize(("name", "magic"), [("p.png", b"\x89PNG"), ("p.jpg", b"\xff\xd8\xff"),
                                             ("p.pdf", b"%PDF"), ("p.svg", b"<?xml")])
def test_report_plot_is_written_in_the_format_its_extension_names(tmp_path, name, magic):
    a = write(tmp_path, "a.json", make_results("vit-a", BASE))
    result = invoke("report", a, "--plot", tmp_path / name)
    assert result.exit_code == 0, result.output
    assert (tmp_path / name).read_bytes().startswith(magic)


def test_report_plot_with_an_extension_no_format_has_is_refused_before_reading_results(tmp_path):
    result = invoke("report", tmp_path / "missing.json", "--plot", tmp_path / "p.gif")
    assert result.exit_code == 2 and "--plot" in result.output and "unknown extension '.gif'" in result.output
    assert not (tmp_path / "p.gif").exists()
