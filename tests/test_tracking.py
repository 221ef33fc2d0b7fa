"""Results into experiment trackers, read back offline through each tracker's own reader: TensorBoard event files
through TensorBoard's EventAccumulator, an MLflow SQLite store through MlflowClient, W&B through a stand-in module
(its package is not a test dependency). Every value must equal the results JSON's summary."""

import json
import sys
import types

import pytest

from lowshot.errors import BadInputError, LowshotError, MissingDependencyError, ProtocolMismatchError
from lowshot.results.rows import RESULTS_FORMAT, Results
from lowshot.results.tracking import LogTarget, open_tracker, params_of, parse_log_target, scalars_of

from .test_report import BASE, make_results

FLOAT32 = 1e-6  # TensorBoard stores scalars as float32: equal to the JSON's numbers within float32 rounding


def results_file(tmp_path, *, name="vit-a", means=BASE, seeds=3, classifiers=("logistic", "knn"), **meta) -> Results:
    """A results JSON with top-1, top-5 and mean-per-class per row, written and loaded back as a user's file is."""
    data = make_results(name, means, classifiers=classifiers, seeds=seeds)
    for row in data["rows"]:
        row["top5"], row["mean_per_class"] = min(100.0, row["top1"] + 3.5), row["top1"] - 0.25
    data["meta"].update(meta)
    path = tmp_path / f"{name}.json"
    Results.load(_write(path, data)).save(path)  # the file holds the summary Results computes
    return Results.load(path)


def _write(path, data):
    path.write_text(json.dumps({"format": RESULTS_FORMAT, **data}))
    return path


def expected_from_json(results: Results) -> dict[str, float]:
    """The documented names, built from the JSON's summary alone (not through scalars_of)."""
    out = {}
    for entry in json.loads(results.to_json())["summary"]:
        subset = entry["subset"].replace("%", "pct")
        base = f"lowshot/{subset}" if entry["classifier"] == "logistic" else f"lowshot/{entry['classifier']}/{subset}"
        stats = {"top1": entry, **{m.replace("-", "_"): v for m, v in entry.get("metrics", {}).items()}}
        for metric, value in stats.items():
            out[f"{base}/{metric}"] = value["mean"]
            if value["std"] is not None:
                out[f"{base}/{metric}_std"] = value["std"]
    return out


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite store for the module: MLflow's import and its schema migration take seconds."""
    pytest.importorskip("mlflow")
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def read_tensorboard(folder) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_tensorboard_event_files_read_back_equal_to_the_results_json(tmp_path):
    pytest.importorskip("tensorboard")
    results = results_file(tmp_path)
    results.log_to(f"tensorboard:{tmp_path / 'tb'}", step=2000)
    logged = read_tensorboard(tmp_path / "tb")
    expected = expected_from_json(results)
    assert "lowshot/5-shot/top1" in expected and "lowshot/knn/1pct/mean_per_class_std" in expected
    assert set(logged) == set(expected)
    for name, value in expected.items():
        (event,) = logged[name]
        assert event.step == 2000
        assert event.value == pytest.approx(value, rel=FLOAT32), name


def test_mlflow_sqlite_store_reads_back_a_series_of_steps_equal_to_each_results_json(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    early = results_file(tmp_path, name="step-1000", means={"1-shot": 40.0, "5-shot": 55.0, "1%": 60.0})
    late = results_file(tmp_path, name="step-2000", means={"1-shot": 45.5, "5-shot": 61.25, "1%": 66.0})
    with open_tracker(f"mlflow:{mlflow_uri}") as tracker:
        tracker.log(early, step=1000)
        tracker.log(late, step=2000)
        run_id = tracker.run_id
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "step-1000"
    assert client.get_experiment(run.info.experiment_id).name == "lowshot"
    assert set(run.data.metrics) == set(expected_from_json(late))
    for step, results in ((1000, early), (2000, late)):
        for name, value in expected_from_json(results).items():
            history = {m.step: m.value for m in client.get_metric_history(run_id, name)}
            assert history[step] == value, (name, step)
    assert run.data.params["lowshot/seeds"] == "3" and run.data.params["lowshot/lambda"] == "0.0025"
    assert run.data.params["lowshot/classifiers"] == "logistic,knn"
    assert "lowshot/model" not in run.data.params  # checkpoints of one training run share its params


def test_mlflow_refuses_results_of_another_protocol_in_the_same_run_and_logs_none_of_them(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    first = results_file(tmp_path, name="a")
    other = results_file(tmp_path, name="b", means={"1-shot": 1.0, "5-shot": 2.0, "1%": 3.0},
                         test_fingerprint="another test set")
    with open_tracker(f"mlflow:{mlflow_uri}") as tracker:
        tracker.log(first, step=1)
        with pytest.raises(ProtocolMismatchError, match="lowshot/test_fingerprint=abc here, another test set"):
            tracker.log(other, step=2)
    history = MlflowClient(tracking_uri=mlflow_uri).get_metric_history(tracker.run_id, "lowshot/1-shot/top1")
    assert [m.step for m in history] == [1]


def test_a_run_whose_work_fails_after_logging_is_ended_as_failed_not_finished(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    results = results_file(tmp_path, name="step-100")
    with pytest.raises(RuntimeError, match="the training step crashed"), \
            open_tracker(f"mlflow:{mlflow_uri}") as tracker:
        tracker.log(results, step=100)
        raise RuntimeError("the training step crashed")
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and "lowshot/1-shot/top1" in run.data.metrics


def test_mlflow_logs_into_the_active_run_and_leaves_it_open(tmp_path, mlflow_uri, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    results = results_file(tmp_path, seeds=1, classifiers=("logistic",))
    with mlflow.start_run() as run:
        results.log_to("mlflow", step=7)
        results.log_to(run, step=8)
        assert mlflow.active_run().info.run_id == run.info.run_id
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "lowshot/5-shot/top1")
    assert [(m.step, m.value) for m in history] == [(7, 94.0), (8, 94.0)]


def test_one_seed_logs_means_without_std_and_the_step_the_results_carry(tmp_path):
    pytest.importorskip("tensorboard")
    results = results_file(tmp_path, seeds=1, classifiers=("logistic",), step=500)
    assert not any(name.endswith("_std") for name in scalars_of(results))
    results.log_to(f"tensorboard:{tmp_path / 'tb'}")
    assert {e.step for events in read_tensorboard(tmp_path / "tb").values() for e in events} == {500}


def test_bootstrap_intervals_are_logged_beside_the_mean(tmp_path):
    results = results_file(tmp_path, classifiers=("logistic",))
    results.intervals["logistic/5-shot"] = {"ci_low": 93.25, "ci_high": 96.5}
    scalars = scalars_of(results)
    assert (scalars["lowshot/5-shot/top1_ci_low"], scalars["lowshot/5-shot/top1_ci_high"]) == (93.25, 96.5)
    assert "lowshot/1-shot/top1_ci_low" not in scalars


def test_a_callers_summary_writer_is_flushed_not_closed(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    results_file(tmp_path).log_to(writer, step=3)
    assert read_tensorboard(tmp_path / "tb")["lowshot/5-shot/top1"][0].value == pytest.approx(95.0, rel=FLOAT32)
    writer.add_scalar("train/loss", 0.5, 4)  # still open: the caller's training loop goes on writing to it
    writer.close()
    assert "train/loss" in read_tensorboard(tmp_path / "tb")


def test_wandb_opens_a_run_logs_the_scalars_and_settings_at_the_step_and_finishes_it(tmp_path, monkeypatch):
    calls = []

    class Run:
        __module__ = "wandb.sdk.wandb_run"
        config = types.SimpleNamespace(update=lambda values, **kw: calls.append(("config", values)))

        def log(self, values, *, step):
            calls.append(("log", values, step))

        def finish(self, exit_code=0):
            calls.append(("finish", exit_code))

    fake = types.ModuleType("wandb")
    fake.run = None
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    results = results_file(tmp_path)
    results.log_to("wandb:my-project", step=12)
    assert calls[0] == ("init", {"project": "my-project", "name": "vit-a"})
    assert calls[1] == ("config", params_of(results))
    assert calls[2] == ("log", expected_from_json(results), 12)
    assert calls[3:] == [("finish", 0)]
    calls.clear()
    results.log_to(Run(), step=13)  # a caller's run: logged into, never finished
    assert [c[0] for c in calls] == ["config", "log"]


@pytest.mark.parametrize(("spec", "message"), [
    ("neptune:runs", "log target 'neptune:runs': unknown tracker 'neptune'; expected tensorboard:DIR, mlflow"),
    ("tensorboard:", "log target 'tensorboard:': nothing after ':'"),
    ("tensorboard", "log target 'tensorboard': TensorBoard needs a folder for its event files: tensorboard:DIR"),
    ("mlflow:sqlite:///no/such/folder/mlflow.db", "no folder no/such/folder for the SQLite file"),
])
def test_a_bad_log_target_is_one_line_naming_it(spec, message):
    with pytest.raises(BadInputError) as error:
        parse_log_target(spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_tensorboard_folder_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "runs").write_text("")
    with pytest.raises(BadInputError, match="is a file, not a folder"):
        parse_log_target(f"tensorboard:{tmp_path / 'runs'}")


@pytest.mark.parametrize(("spec", "module", "install"), [
    ("tensorboard:runs", "tensorboard", 'pip install "lowshot[tensorboard]"'),
    ("mlflow", "mlflow", 'pip install "lowshot[mlflow]"'),
    ("wandb", "wandb", "pip install wandb"),
])
def test_a_missing_extra_is_one_line_naming_the_pip_command(tmp_path, monkeypatch, spec, module, install):
    monkeypatch.setitem(sys.modules, module, None)  # import and find_spec both fail, as when it is not installed
    with pytest.raises(MissingDependencyError) as error:
        parse_log_target(spec)
    assert str(error.value).endswith(f"not installed: {install}") and "\n" not in str(error.value)
    with pytest.raises(MissingDependencyError, match="not installed"):
        open_tracker(LogTarget(*spec.partition(":")[::2])).log(results_file(tmp_path))


def test_valid_targets_parse_to_their_tracker_and_place():
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    assert parse_log_target("tensorboard:runs/x") == LogTarget("tensorboard", "runs/x")
    assert parse_log_target("mlflow") == LogTarget("mlflow", None)
    assert parse_log_target("mlflow:sqlite:///mlflow.db") == LogTarget("mlflow", "sqlite:///mlflow.db")
    assert str(parse_log_target("mlflow:http://localhost:5000")) == "mlflow:http://localhost:5000"


@pytest.mark.parametrize("step", [-1, 1.5, True, "10"])
def test_a_bad_step_is_one_line(tmp_path, step):
    with pytest.raises(BadInputError, match=r"step .*: expected a whole number >= 0"):
        results_file(tmp_path).log_to(f"tensorboard:{tmp_path / 'tb'}", step=step)


def test_an_unknown_target_object_is_one_line_naming_its_type(tmp_path):
    with pytest.raises(BadInputError, match="log target of type dict: expected a string"):
        results_file(tmp_path).log_to({"dir": "runs"})


def test_a_folder_as_mlflow_store_is_refused_up_front_where_mlflow_would_refuse_it_after_the_run(monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setattr("lowshot.results.tracking._mlflow_refuses_file_store", lambda: True)
    for spec in ("mlflow:./mlruns", "mlflow:file:///tmp/mlruns"):
        with pytest.raises(BadInputError, match="MLFLOW_ALLOW_FILE_STORE=true; use a database, e.g. mlflow:sqlite"):
            parse_log_target(spec)
    assert parse_log_target("mlflow:http://localhost:5000").where == "http://localhost:5000"


def test_a_store_mlflow_refuses_while_logging_is_one_line_naming_it(tmp_path, mlflow_uri, monkeypatch):
    from lowshot.results.tracking import _mlflow_refuses_file_store

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    if not _mlflow_refuses_file_store():
        pytest.skip("this MLflow still opens a folder store")
    with pytest.raises(LowshotError, match=rf"^logging to MLflow at {tmp_path}/mlruns: .*maintenance mode") as error:
        results_file(tmp_path).log_to(LogTarget("mlflow", str(tmp_path / "mlruns")))  # past parse_log_target's check
    assert "\n" not in str(error.value)
