"""lowshot probe over a training run's checkpoints: --model repeatable or a glob, each model on one protocol, one
results file per model in an --output folder, one table in step order, the curve (--plot), and --log into an
experiment tracker, every target checked before any work."""

import json

import pytest
from typer.testing import CliRunner

from lowshot.cli import app

from .conftest import save_random_msn

runner = CliRunner()
QUICK = ["--device", "cpu", "--dtype", "float32", "--shots", "1", "--percent", "0", "--seeds", "2"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A training run's three checkpoints, saved out of step order (the names say the order)."""
    run = tmp_path_factory.mktemp("run")
    for seed, step in enumerate((300, 100, 200)):
        save_random_msn(run / f"checkpoint-{step}", seed=seed, hidden=16, layers=1)
    return run


def test_a_glob_of_checkpoints_gives_one_file_each_one_table_in_step_order_the_curve_and_tensorboard_scalars(
        run_folder, image_data, cache_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from .test_tracking import read_tensorboard

    out, plot, board = tmp_path / "out", tmp_path / "curve.png", tmp_path / "tb"
    monkeypatch.chdir(run_folder.parent)  # a relative pattern, as typed: run/checkpoint-*, files named checkpoint-…
    result = invoke("probe", "--model", f"{run_folder.name}/checkpoint-*", "--data", image_data, *QUICK,
                    "--output", out, "--plot", plot, "--log", f"tensorboard:{board}")
    assert result.exit_code == 0, result.output
    names = ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.json" for n in names]
    table = [line for line in result.output.splitlines() if line.startswith("checkpoint-") and "±" in line]
    assert [next(n for n in names if n in line) for line in table[:3]] == names  # rows in step order
    assert plot.stat().st_size > 0 and "logged 3 result(s) to tensorboard:" in result.output
    scalars = read_tensorboard(board)
    top1 = {event.step: event.value for event in scalars["lowshot/1-shot/top1"]}
    for name in names:
        summary = json.loads((out / f"{name}.json").read_text())["summary"]
        assert top1[int(name.split("-")[1])] == pytest.approx(summary[0]["mean"], abs=1e-4)


def test_one_checkpoint_is_logged_at_the_step_its_name_gives(run_folder, image_data, cache_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from .test_tracking import read_tensorboard

    board = tmp_path / "tb"
    result = invoke("probe", "--model", run_folder / "checkpoint-200", "--data", image_data, *QUICK,
                    "--log", f"tensorboard:{board}")
    assert result.exit_code == 0, result.output
    assert [event.step for event in read_tensorboard(board)["lowshot/1-shot/top1"]] == [200]


def test_repeated_models_are_one_table_and_the_single_model_output_stays_a_file(run_folder, image_data, cache_dir,
                                                                                tmp_path):
    first, last = run_folder / "checkpoint-300", run_folder / "checkpoint-100"
    result = invoke("probe", "--model", first, "--model", last, "--data", image_data, *QUICK, "--format", "json")
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    assert [row["label"] for row in table["rows"]] == ["checkpoint-100", "checkpoint-300"]
    single = invoke("probe", "--model", first, "--data", image_data, *QUICK, "--output", tmp_path / "one.json")
    assert single.exit_code == 0 and json.loads((tmp_path / "one.json").read_text())["meta"]["model"] == str(first)


@pytest.mark.parametrize(("args", "message"), [
    (["--log", "nowhere"], "log target 'nowhere': unknown tracker 'nowhere'"),
    (["--log", "tensorboard"], "TensorBoard needs a folder"),
    (["--model", "{run}/nothing-*"], "the pattern matches nothing"),
    (["--model", "{run}/checkpoint-*", "--output", "{tmp}/a-file/out"], "--output"),
])
def test_a_bad_series_option_is_one_line_before_any_extraction(run_folder, image_data, cache_dir, tmp_path, args,
                                                               message):
    (tmp_path / "a-file").write_text("")  # no folder can be made inside it
    args = [a.format(run=run_folder, tmp=tmp_path) for a in args]
    if "--model" not in args:
        args = ["--model", str(run_folder / "checkpoint-100"), *args]
    result = invoke("probe", *args, "--data", image_data, *QUICK)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert not (cache_dir / "entries").exists() or not any((cache_dir / "entries").iterdir())


def test_two_checkpoints_with_one_name_are_refused_before_any_work_with_an_output_folder(image_data, cache_dir,
                                                                                         tmp_path):
    a = save_random_msn(tmp_path / "a" / "final", hidden=16, layers=1)
    b = save_random_msn(tmp_path / "b" / "final", seed=1, hidden=16, layers=1)
    result = invoke("probe", "--model", a, "--model", b, "--data", image_data, *QUICK, "--output", tmp_path / "o")
    assert result.exit_code == 2 and "several models are named final" in result.output
    assert not (cache_dir / "entries").exists()


def test_report_takes_the_steps_of_files_whose_names_give_none_and_orders_them(tmp_path):
    from .test_report import BASE, make_results, write

    files = [write(tmp_path, f"{name}.json", make_results(name, {k: v + i for k, v in BASE.items()}))
             for i, name in enumerate(("late", "early", "middle"))]
    result = invoke("report", *files, "--step", 3000, "--step", 1000, "--step", 2000, "--format", "markdown")
    assert result.exit_code == 0, result.output
    rows = [line.split("|")[1].strip() for line in result.stdout.splitlines() if line.startswith("| ")][2:5]
    assert rows == ["early", "middle", "late"]  # in step order, not the order given
    assert "each step vs the step before" in result.stdout
    wrong = invoke("report", *files, "--step", 1000)
    assert wrong.exit_code == 2 and "--step given 1 time(s) for 3 results" in wrong.output
