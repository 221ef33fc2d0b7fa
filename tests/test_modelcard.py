"""model-index YAML for Hugging Face model cards, and merging it into a card, checked through huggingface_hub."""

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from typer.testing import CliRunner

import lowshot
from lowshot.cli import app
from lowshot.results.modelcard import TASK_NAME, merge_into_card, model_index_yaml

from .synthetic import pair

runner = CliRunner()
BODY = "\n# My ViT\n\nSome text, a table:\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"


@pytest.fixture(scope="module")
def results_file(tmp_path_factory):
    train, test = pair(classes=4, per_class=10, test_per_class=10, signal=1.5, seed=0)
    results = lowshot.run_probe(train, test, shots=(1, 5), percents=(10,), seeds=3, classifiers=("logistic", "knn"),
                                meta={"label": "my-vit", "data": "frgfm/imagenette"})
    path = tmp_path_factory.mktemp("r") / "my-vit.json"
    results.save(path)
    return path


def test_model_index_yaml_round_trips_through_huggingface_hub(results_file):
    results = lowshot.Results.load(results_file)
    text = model_index_yaml(results, metrics=["top1", "mean-per-class"], source_url="https://ci.example/run/1")
    index = yaml.safe_load(text)["model-index"]
    name, evals = model_index_to_eval_results(index)
    assert name == "my-vit" and len(evals) == 2 * 3 * 2  # metrics x subsets x classifiers: one result each
    first = evals[0]
    assert (first.task_type, first.task_name) == ("image-classification", TASK_NAME)
    assert (first.dataset_type, first.dataset_name, first.dataset_split) == ("frgfm/imagenette",) * 2 + ("val",)
    summary = {(s["classifier"], s["subset"]): s for s in results.summary}
    assert first.metric_type == "accuracy" and first.metric_value == round(summary[("logistic", "1-shot")]["mean"], 2)
    assert first.metric_name == \
        f"1-shot logistic probe, top-1 (%), mean of 3 seeds (std {summary[('logistic', '1-shot')]['std']:.2f})"
    assert (first.source_name, first.source_url) == ("lowshot", "https://ci.example/run/1")
    assert [e.metric_name.split(", mean")[0] for e in evals[2:4]] == ["10% labels logistic probe, top-1 (%)",
                                                                       "1-shot k-NN (cosine), top-1 (%)"]
    assert {e.metric_type for e in evals[6:]} == {"balanced_accuracy"}
    card = ModelCard("---\n" + text + "---\n")  # huggingface_hub re-serialises it unchanged: nothing is merged away
    assert ModelCard(str(card)).data.eval_results == evals


def test_card_merge_keeps_body_and_other_metadata_and_replaces_its_own_entries(results_file, tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: apache-2.0\ntags:\n- vision\nmodel-index:\n- name: my-vit\n  results:\n"
                    "  - task:\n      type: image-classification\n    dataset:\n      type: imagenet-1k\n"
                    "      name: ImageNet\n    metrics:\n    - type: accuracy\n      value: 81.2\n---" + BODY)
    results = lowshot.Results.load(results_file)
    assert merge_into_card(card, results, metrics=["top1"]) == 6
    again = merge_into_card(card, results, metrics=["top1"], source_url="https://ci.example/2")  # replaces
    loaded = ModelCard.load(card)
    assert again == 6 and card.read_text().endswith("\n---" + BODY)  # the body byte for byte
    assert loaded.data.license == "apache-2.0" and loaded.data.tags == ["vision"]
    evals = loaded.data.eval_results
    assert len(evals) == 1 + 6 and evals[0].dataset_type == "imagenet-1k" and evals[0].metric_value == 81.2
    assert [e.source_name for e in evals[1:]] == ["lowshot"] * 6 and evals[0].source_name is None


def test_card_without_front_matter_gets_one_and_the_cli_prints_and_merges(results_file, tmp_path):
    card = tmp_path / "README.md"
    card.write_text(BODY)
    printed = runner.invoke(app, ["report", str(results_file), "--format", "model-index", "--metric", "top1,top5",
                                  "--card", str(card)])
    assert printed.exit_code == 0, printed.output
    assert printed.stdout.startswith("model-index:\n- name: my-vit\n") and "merged 12 result(s)" in printed.output
    loaded = ModelCard.load(card)
    assert card.read_text().endswith("\n---\n" + BODY) and len(loaded.data.eval_results) == 12
    assert card.read_text().startswith("---\nmodel-index:")


@pytest.mark.parametrize("args,message", [
    (["{r}", "{r}", "--format", "model-index"], "give one results file, not 2"),
    (["{r}", "--card", "{missing}"], "no such file"),
    (["{r}", "--format", "model-index", "--metric", "top3"], "--metric 'top3'"),
])
def test_bad_model_index_input_is_one_clear_line(results_file, tmp_path, args, message):
    argv = [a.replace("{r}", str(results_file)).replace("{missing}", str(tmp_path / "nope.md")) for a in args]
    result = runner.invoke(app, ["report", *argv])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
