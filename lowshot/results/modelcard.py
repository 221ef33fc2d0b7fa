"""Hugging Face model cards: lowshot results as a ``model-index`` block, merged into a card's YAML front matter.

One metric entry per (subset, classifier, metric): ``task`` {type: image-classification, name: "low-shot
classification on frozen features (MSN protocol)"}, ``dataset`` {type, name, split}, ``metrics`` [{type, value (%),
name: "5-shot logistic probe, top-1 (%), mean of 3 seeds (std 0.30)"}], ``source`` {name: lowshot, url}.

Why the subset is in the metric name and not in the task name: ``huggingface_hub`` keys a result on (task type,
dataset type, config, split, revision) and merges results that share them under the *first* one's task name
(``eval_results_to_model_index``), so per-subset task names would be silently relabelled the next time any tool
rewrites the card. The YAML is produced and read back by ``huggingface_hub`` (``ModelCard``, ``EvalResult``,
``model_index_to_eval_results``), so what we write is what the Hub parses; nothing here touches the network.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lowshot.errors import BadInputError
from lowshot.results.compare import label_of, subset_order
from lowshot.results.rows import Results, name_of, require_full_run
from lowshot.results.stats import METRIC_LABELS

TASK_TYPE = "image-classification"
SOURCE_NAME = "lowshot"
# huggingface_hub requires a url with a source name. lowshot has no public home yet: set this once it has one, and
# every card names lowshot as its source; until then ``source`` is written only with --source-url (e.g. a CI run).
PROJECT_URL: str | None = None
# The model-index metric "type" of each metric. top-1 and top-5 are both "accuracy" with a name telling them apart
# (as ultralytics' cards do); mean-per-class is scikit-learn's "balanced_accuracy", another quantity.
METRIC_TYPES = {"top1": "accuracy", "top5": "accuracy", "mean-per-class": "balanced_accuracy"}
MEAN_OF = ", mean of "  # what follows in a metric name (seeds, std) may change between runs of the same entry
TASK_NAME = "low-shot classification on frozen features (MSN protocol)"
CLASSIFIER_NAMES = {"logistic": "logistic probe", "knn": "k-NN (cosine)", "ncm": "nearest class mean"}


def eval_results(results: Results, *, metrics: list[str], source_url: str | None = None) -> list:
    """``huggingface_hub.EvalResult`` objects for every (classifier, subset, metric) of ``results``."""
    from huggingface_hub import EvalResult

    meta = results.meta
    require_full_run(results, label_of(results), refused_by="a model card takes only full runs")
    dataset = name_of(meta.get("data")) or "unknown"
    out = []
    for metric in metrics:
        summary = sorted(results.summary_of(metric), key=lambda s: subset_order(s["subset"]))
        for s in sorted(summary, key=lambda s: results.classifiers.index(s["classifier"])):
            subset = s["subset"] if s["subset"].endswith("-shot") else f"{s['subset']} labels"
            what = f"{subset} {CLASSIFIER_NAMES.get(s['classifier'], s['classifier'])}, {METRIC_LABELS[metric]} (%)"
            out.append(EvalResult(
                task_type=TASK_TYPE, task_name=TASK_NAME,
                dataset_type=dataset, dataset_name=dataset, dataset_split=meta.get("test_split"),
                metric_type=METRIC_TYPES[metric], metric_value=round(s["mean"], 2),
                metric_name=f"{what}{MEAN_OF}{s['n_seeds']} seed{'s' if s['n_seeds'] != 1 else ''}"
                            + ("" if s["std"] is None else f" (std {s['std']:.2f})"),
                **({"source_name": SOURCE_NAME, "source_url": url} if (url := source_url or PROJECT_URL) else {})))
    return out


def model_index_yaml(results: Results, *, metrics: list[str], name: str | None = None,
                     source_url: str | None = None) -> str:
    """The ``model-index:`` YAML block (no ``---`` fences) for one results file."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(model_name=name or label_of(results),
                         eval_results=eval_results(results, metrics=metrics, source_url=source_url))
    return data.to_yaml() + "\n"


def merge_into_card(path: str | Path, results: Results, *, metrics: list[str], name: str | None = None,
                    source_url: str | None = None) -> int:
    """Merge the results into the model card at ``path``: lowshot's earlier entries for the same task, dataset,
    split and metric are replaced, every other entry, front-matter key and the whole Markdown body are kept (the
    front matter is re-serialised by ``huggingface_hub``). A card without front matter gets one. Returns the
    number of results written."""
    from huggingface_hub import ModelCard

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"--card {path}: no such file (create an empty one to start a new card)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"--card {path}: cannot read ({exc})") from None
    hub_log = logging.getLogger("huggingface_hub.repocard")  # warns of a card without front matter: one gets made
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        card = ModelCard(text)
    except Exception as exc:  # noqa: BLE001 - yaml and huggingface_hub raise several types for a bad front matter
        raise BadInputError(f"--card {path}: its YAML front matter cannot be parsed ({exc})") from None
    finally:
        hub_log.setLevel(level)
    new = eval_results(results, metrics=metrics, source_url=source_url)
    mine = {_identity(r) for r in new}
    kept = [r for r in card.data.eval_results or [] if _identity(r) not in mine]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or name or label_of(results)
    from lowshot.io import save_text

    save_text(path, str(card), flag="--card")
    return len(new)


def _identity(result) -> tuple:
    """What makes two entries the same measurement (a rerun replaces it): the task, dataset, split, metric type and
    the metric name up to ", mean of" (subset, classifier, metric)."""
    return (result.task_type, result.task_name, result.dataset_type, result.dataset_split, result.metric_type,
            (result.metric_name or "").split(MEAN_OF)[0])

