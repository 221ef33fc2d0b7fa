"""The ``lowshot`` command: parse options, call the library, render. No protocol logic lives here."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .backbones import DEFAULT_MODEL, FEATURE_PRENORM
from .errors import BadInputError, LowshotError

app = typer.Typer(
    name="lowshot",
    help="Low-shot evaluation of frozen vision backbones (MSN protocol).\n\n"
         "1. lowshot extract --model facebook/vit-msn-small --data DIR   (features into the cache, once)\n\n"
         "2. lowshot probe --shots 1,2,5 --percent 1                      (mean ± std top-1 tables)",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich",
)
cache_app = typer.Typer(help="Inspect, check and clean the feature cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

err = Console(stderr=True, soft_wrap=True)
out = Console()
_state = {"debug": False}

CacheDir = Annotated[Path | None, typer.Option(
    "--cache-dir", envvar="LOWSHOT_CACHE_DIR", show_envvar=True,
    help="Feature cache folder [default: the platform's user cache dir, e.g. ~/.cache/lowshot].")]


def _friendly(command):
    """Turn lowshot's own errors into one line on stderr and a non-zero exit (tracebacks only with --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LowshotError as exc:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted: finished shards are kept in the cache; rerun the same command to resume")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug
    if version:
        from . import __version__

        out.print(f"lowshot {__version__}")
        raise typer.Exit()


@app.command()
@_friendly
def extract(
    model: Annotated[str, typer.Option(
        "--model", "-m", help="Hugging Face hub id or local folder (config.json + weights); any ViT-family "
                              "backbone with a CLS token (ViTMSN, ViT, DeiT).")] = DEFAULT_MODEL,
    data: Annotated[str | None, typer.Option(
        "--data", "-d", help="Folder with train/ and val/ (or test/) ImageFolder splits, a datasets.save_to_disk "
                             "folder, or a Hugging Face dataset id. [default: a tiny bundled Imagenette demo "
                             "sample — a smoke test, not a benchmark]")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    train_split: Annotated[str, typer.Option(help="Split to draw the labelled shots from.")] = "train",
    test_split: Annotated[str | None, typer.Option(
        help="Split to evaluate on. [default: the first of val, validation, test]")] = None,
    image_column: Annotated[str | None, typer.Option(help="HF datasets: image column [default: detected].")] = None,
    label_column: Annotated[str | None, typer.Option(help="HF datasets: label column [default: detected].")] = None,
    transform: Annotated[str, typer.Option(
        help="msn: shorter side 256 (bilinear), center crop 224, ImageNet mean/std (the MSN protocol). "
             "processor: the model's preprocessor_config.json (HF ViT: resize straight to 224x224).")] = "msn",
    feature: Annotated[str, typer.Option(
        help="cls-prenorm: CLS of the last block before the final LayerNorm (MSN). "
             "cls-postnorm: last_hidden_state[:, 0].")] = FEATURE_PRENORM,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", help="Images decoded per batch; a forward pass takes at most this many (fewer on "
                                   "the CPU and for large-token models, to stay in cache and memory).")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(
        help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, "
             "float16.")] = "auto",
    strict: Annotated[bool, typer.Option(
        help="Fail on the first unreadable image instead of skipping and reporting it.")] = False,
    engine: Annotated[str, typer.Option(
        help="auto: lowshot's fast forward where it covers the model (ViT, ViTMSN, DeiT), else the stock "
             "transformers one; fast; stock. Same features up to float rounding (not in the cache key).")] = "auto",
    cache_dir: CacheDir = None,
) -> None:
    """Run every train and test image through the backbone once and store the CLS features in the cache.

    A rerun with the same model, data and settings is a cache hit: no image is decoded, no model is loaded.
    An interrupted run resumes from its last finished shard.
    """
    from .extract import extract_features
    from .render import progress_callback

    with progress_callback(err) as progress:
        run = extract_features(model, data, revision=revision, train_split=train_split, test_split=test_split,
                               image_column=image_column, label_column=label_column, transform=transform,
                               feature=feature, batch_size=batch_size, device=device, dtype=dtype,
                               cache_dir=cache_dir, strict=strict, engine=engine, progress=progress)
    s = run.settings
    err.print(f"model {run.model} · {s['feature']} · {s['dtype']} ({s['dtype_reason']}) · {s['device']} · "
              f"engine {s['engine']} ({s['engine_reason']}) · transform {s['transform']['name']}", highlight=False)
    for split in run.splits():
        f = split.features
        if split.cached:
            what = "cache hit, nothing decoded"
        else:
            rate = split.images / split.seconds if split.seconds else 0.0
            what = f"extracted {split.images:,} images in {split.seconds:.1f} s ({rate:.1f} img/s)"
        err.print(f"{split.split}: {len(f):,} x {f.dim} features, {len(f.classes)} classes — {what} "
                  f"[key {f.key[:12]}]", highlight=False)
        if split.skipped:
            err.print(f"  skipped {len(split.skipped)} unreadable file(s) in {split.split}:", highlight=False)
            for name, reason in list(split.skipped.items())[:20]:
                err.print(f"    {name}: {reason}", highlight=False)
            if len(split.skipped) > 20:
                err.print(f"    … {len(split.skipped) - 20} more (all listed in the cache manifest)")
    err.print("next: lowshot probe --shots 1,2,5 --percent 1", style="dim")


def _parse_list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise BadInputError(f"{flag} {text!r}: expected a comma-separated list of numbers, e.g. 1,2,5") from None
    return values


@app.command()
@_friendly
def probe(
    shots: Annotated[str, typer.Option(
        help="Images per class, comma-separated (nested within a seed). Empty string: none.")] = "1,2,5",
    percent: Annotated[str, typer.Option(
        help="Percent of the train labels, stratified (round half up, at least 1 per class), comma-separated; "
             "0 skips.")] = "1",
    seeds: Annotated[int, typer.Option(help="Number of seeds (0 … N−1) for k-shot and percent subsets.")] = 3,
    lam: Annotated[str, typer.Option(
        "--lambda", help="L2 penalty λ (objective: summed log-loss + λ/2‖W‖², as MSN), or 'auto': "
                         "cross-validation inside the labelled shots only (1-shot: the default λ).")] = "0.0025",
    split_file: Annotated[list[Path] | None, typer.Option(
        "--split-file", help="A published split file (one image name per line), repeatable; files with the "
                             "same content label (e.g. 5-shot) become seeds of one row.")] = None,
    allow_fewer: Annotated[bool, typer.Option(
        help="Let a class with fewer than k train images contribute all it has instead of failing.")] = False,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Pick the features of this model … [default: the most recent extraction]")] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="… on this data.")] = None,
    transform: Annotated[str, typer.Option(help="With --model/--data: the extraction's --transform.")] = "msn",
    feature: Annotated[str, typer.Option(help="With --model/--data: the extraction's --feature.")] = FEATURE_PRENORM,
    dtype: Annotated[str, typer.Option(help="With --model/--data: the extraction's --dtype.")] = "auto",
    device: Annotated[str, typer.Option(help="With --model/--data: the extraction's --device.")] = "auto",
    backend: Annotated[str, typer.Option(help="Solver: torch (full-batch L-BFGS) or sklearn (reference).")] = "torch",
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, json, csv or markdown (to stdout).")] = "table",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Also write the results: .json (full: meta, rows, summary), .csv or .md.")] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Fit the MSN logistic probe on k-shot / percent subsets of the cached train features and report top-1 on
    the whole test split, mean ± std over seeds."""
    from .experiment import run_probe
    from .extract import load_features
    from .render import progress_callback, results_table
    from .results import FORMATS

    if fmt not in FORMATS:
        raise BadInputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    shot_list = _parse_list(shots, int, "--shots")
    percent_list = [p for p in _parse_list(percent, float, "--percent") if p != 0]
    if lam == "auto":
        lam_value: float | str = "auto"
    else:
        try:
            lam_value = float(lam)
        except ValueError:
            raise BadInputError(f"--lambda {lam!r}: expected a positive number or 'auto'") from None
    if not shot_list and not percent_list and not split_file:
        raise BadInputError("nothing to probe: give --shots, --percent or --split-file")
    options = {}
    if model is not None or data is not None:
        options = {"transform": transform, "feature": feature, "dtype": dtype, "device": device}
    train, test, run = load_features(model, data, cache_dir=cache_dir, **options)
    if model is None and data is None:
        err.print(f"using the most recent extraction: {run['model']} on {run['data']} "
                  f"({run['train_split']} {len(train):,} / {run['test_split']} {len(test):,})", highlight=False)
    with progress_callback(err, unit="fit") as progress:
        results = run_probe(train, test, shots=shot_list, percents=percent_list, seeds=seeds, lam=lam_value,
                            split_files=split_file or (), allow_fewer=allow_fewer, backend=backend,
                            meta={"model": run["model"], "data": run["data"]}, progress=progress)
    for row in results.rows:
        if row.get("missing"):
            err.print(f"{row['split_file']}: {row['missing']} listed file(s) are not in the train split "
                      f"(used {row['n_train']})", highlight=False)
    if output is not None:
        try:
            results.save(output)
        except OSError as exc:
            raise BadInputError(f"--output {output}: cannot write ({exc.strerror})") from None
        err.print(f"wrote {output}", highlight=False)
    if fmt == "table":
        out.print(results_table(results))
    else:
        sys.stdout.write(results.render(fmt))


@cache_app.command("list")
@_friendly
def cache_list(cache_dir: CacheDir = None) -> None:
    """List cached feature entries: model, data, split, size, date."""
    from .cache import FeatureCache
    from .render import cache_table

    cache = FeatureCache(cache_dir)
    manifests = cache.manifests()
    if not manifests:
        err.print(f"no cached features in {cache.root}")
        return
    out.print(cache_table(manifests))
    out.print(f"cache dir: {cache.root}", highlight=False)


@cache_app.command("rm")
@_friendly
def cache_rm(
    keys: Annotated[list[str] | None, typer.Argument(help="Keys or key prefixes (see 'lowshot cache list').")] = None,
    all_entries: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Remove cached entries (finished and partial) by key prefix, or all of them."""
    from .cache import FeatureCache

    cache = FeatureCache(cache_dir)
    if all_entries:
        keys = [m["key"] for m in cache.manifests()] + [p.name for p in (cache.root / "partial").glob("*")]
    if not keys:
        raise BadInputError("give one or more keys (or --all); see 'lowshot cache list'")
    removed = [key for prefix in keys for key in cache.remove(prefix)]
    err.print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from {cache.root}")


@cache_app.command("verify")
@_friendly
def cache_verify(cache_dir: CacheDir = None) -> None:
    """Check every entry's files against the checksums in its manifest (exit 1 if any is damaged)."""
    from .cache import FeatureCache
    from .errors import CacheError

    cache = FeatureCache(cache_dir)
    problems = cache.verify()
    n = len(cache.manifests())
    for key, problem in problems:
        err.print(f"{key[:12]}: {problem}", highlight=False)
    if problems:
        raise CacheError(f"{len(problems)} problem(s) in {cache.root}; remove damaged entries with "
                         "'lowshot cache rm KEY' and extract again")
    err.print(f"{n} entr{'y' if n == 1 else 'ies'} OK in {cache.root}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
