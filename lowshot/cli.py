"""The ``lowshot`` command: parse options, call the library, render. No protocol logic lives here."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperGroup, TyperOption

from lowshot.config import DEFAULT_LAMBDA, DEFAULT_MODEL, ExtractSettings
from lowshot.errors import BadInputError, LowshotError, SettingError
from lowshot.features.hostmem import keep_host_memory

# typer raises click's exceptions (from its own copy of click since 0.2x): reached through a public name.
_UsageError = typer.BadParameter.__mro__[1]


class _Root(TyperGroup):
    """The ``lowshot`` group: a usage error that click finds (a value of the wrong type, an unknown option or
    command, a missing argument) becomes one ``error:`` line and exit 2, as lowshot's own errors do, not a panel."""

    def make_context(self, *args, **kwargs):
        with _usage_errors_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_errors_in_one_line():
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_errors_in_one_line():
    try:
        yield
    except _UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # no arguments: typer prints the help
            raise
        text = exc.format_message().rstrip(".")
        text = text[:1].lower() + text[1:]
        where = getattr(exc, "ctx", None)
        hint = f"; see '{where.command_path} --help'" if where is not None else ""
        err.print(f"[bold red]error:[/] {escape(text)}{escape(hint)}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_Root, context_settings={"help_option_names": ["-h", "--help"]},
    name="lowshot",
    help="Low-shot evaluation of frozen vision backbones (MSN protocol): 1, 2, 5 images per class and 1% of "
         "the labels, 3 seeds, a logistic probe on frozen features, mean ± std top-1.\n\n"
         "lowshot probe --model MODEL --data DIR      encode what it needs, fit, table\n\n"
         "lowshot report A.json B.json --plot a.png   compare, gate, plot\n\n"
         "lowshot bench CONFIG.toml                   all of it from one file, for CI\n\n"
         "Each command explains itself: lowshot probe -h.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich",
)
cache_app = typer.Typer(help="Inspect, check and clean the feature cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

# Plain text by default: file names, keys ("[key 3f2a…]") and user data are printed as they are, never read as rich
# markup. The few styled lines pass markup=True and escape what they interpolate.
err = Console(stderr=True, soft_wrap=True, markup=False)
out = Console(markup=False)
_state = {"debug": False}


def _option(*names: str, help: str | None = None, **kwargs):
    """``typer.Option`` whose help is taken literally: rich would otherwise eat ``[default: …]`` or
    ``'lowshot[plot]'`` as markup. An option named in :data:`METAVARS` shows that word for its value."""
    if names and names[0] in METAVARS:
        kwargs.setdefault("metavar", METAVARS[names[0]])
    return typer.Option(*names, help=escape(help) if help else help, **kwargs)


# The value's name in the help of options that several commands share (the others: a metavar of their own, else
# a word for their type, see _plain_placeholders).
METAVARS = {"--model": "MODEL", "--data": "DATA", "--output": "FILE", "--baseline": "RESULTS.json",
            "--card": "README.md", "--cache-dir": "FOLDER"}


def _argument(*names: str, help: str | None = None, **kwargs):
    return typer.Argument(*names, help=escape(help) if help else help, **kwargs)


# What an option's value is, in words, where it declares no metavar of its own (typer would show a Python type).
PLACEHOLDERS = {"int": "N", "float": "NUMBER", "str": "TEXT", "path": "PATH", "Path": "PATH"}


def _plain_placeholders() -> None:
    """typer shows a Python type beside each option (``<int>``, ``<list[Path]>``), also beside on/off flags, which
    take no value, and wraps a required argument in braces in the usage line: show a word (an option's metavar,
    else :data:`PLACEHOLDERS`), nothing for flags, and an argument by its metavar, as click does."""
    shown = TyperOption.display_type_rich
    if getattr(shown, "_lowshot", False):
        return

    def option_placeholder(self, ctx):
        if self.is_flag:
            return None
        if self.metavar is not None:
            return self.metavar
        text = str(shown(self, ctx) or "")
        many = text.endswith("...")
        name = re.sub(r"^list\[(.*)\]$", r"\1", text.removesuffix("...").strip("<>"))
        return PLACEHOLDERS.get(name, name.upper()) + ("..." if many else "")

    option_placeholder._lowshot = True
    TyperOption.display_type_rich = option_placeholder
    TyperArgument.display_type_rich = lambda self, ctx: None  # the argument's own column shows its metavar
    if hasattr(TyperArgument, "_usage_display_name"):
        def usage_name(self):
            name = self.display_name_raw + ("..." if self.nargs != 1 else "")
            return name if self.required else f"[{name}]"

        TyperArgument._usage_display_name = usage_name


_plain_placeholders()


def _paragraphs(doc: str | None) -> str | None:
    """A command's docstring with each paragraph on one line: typer keeps the line breaks of every paragraph after
    the first, so a docstring's wrapping would show in the help as lines cut short."""
    if not doc:
        return doc
    return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", inspect.cleandoc(doc)))


# The core names a bad setting by its parameter (ExtractSettings / ProbeSettings field); the CLI says its flag: the
# field's name with dashes (batch_size: --batch-size), but for these.
FLAGS = {"percents": "--percent", "split_files": "--split-file", "lam": "--lambda", "classifiers": "--classifier"}


def _flag(param: str) -> str:
    return FLAGS.get(param, "--" + param.replace("_", "-"))


# Protocol options shared by extract (which images to encode) and probe (which subsets to fit): same defaults.
Shots = Annotated[str | None, _option(
    metavar="LIST", show_default=False,
    help="Images per class, comma-separated (nested within a seed); an empty string: none. Default: 1,2,5, or "
         "none when --split-file is given.")]
Percent = Annotated[str | None, _option(
    metavar="LIST", show_default=False,
    help="Percent of the train labels, stratified (round half up, at least 1 per class), comma-separated; 0 skips. "
         "Default: 1, or none when --split-file is given.")]
Seeds = Annotated[int, _option(help="Number of seeds (0 … N−1) for k-shot and percent subsets.")]
SplitFile = Annotated[list[Path] | None, _option(
    "--split-file", metavar="FILE", help="A published split file (one image name per line), repeatable; files "
                                         "with the same content label (e.g. 5-shot) become seeds of one row.")]
AllowFewer = Annotated[bool, _option(
    help="Let a class with fewer than k train images contribute all it has instead of failing.")]
Limit = Annotated[int | None, _option(
    "--limit", metavar="N", show_default=False,
    help="Quick mode, not the protocol: at most N images per class of the test split (the first N of each class "
         "in seed 0's order) and of the train pool (the first N in each seed's order; k-shot subsets stay the "
         "same, k ≤ N). Uses and grows the same cache entries as a full run; results say so; the gate refuses them.")]

Data = Annotated[str | None, _option(
    "--data", "-d", help="Folder with train/ and val/ (or test/) ImageFolder splits, a datasets.save_to_disk folder, "
                         "or a Hugging Face dataset id. val/ may also be ImageNet's flat validation folder, labelled "
                         "by Kaggle's LOC_val_solution.csv or the devkit's ground truth and meta.mat (looked for in "
                         "val/, the folder, its devkit folder and up to 3 folders above). [default: a tiny bundled "
                         "Imagenette demo sample — a smoke test, not a benchmark]")]
MODEL_HELP = ("Hugging Face hub id, local folder (config.json + weights) or raw MSN checkpoint (.pth.tar): ViT, "
              "ViTMSN, DeiT, DINOv2, CLIP/SigLIP (vision tower), BEiT, Data2Vec, ViTMAE, Swin, ConvNeXt, or any "
              "vision model's pooled output.")
Model = Annotated[str, _option("--model", "-m", help=MODEL_HELP)]

# How images become features: one option per ExtractSettings field, declared here only. A command takes them all
# (minus any it names) through @_extraction_options, which builds the one ExtractSettings they make; their
# defaults are the settings object's own.
EXTRACT_OPTIONS = {
    "revision": Annotated[str | None, _option(help="Hub revision (branch, tag or commit).")],
    "train_split": Annotated[str, _option(help="Split to draw the labelled shots from.")],
    "test_split": Annotated[str | None, _option(
        help="Split to evaluate on. [default: the first of val, validation, test]", show_default=False)],
    "image_column": Annotated[str | None, _option(help="HF datasets: image column [default: detected].")],
    "label_column": Annotated[str | None, _option(help="HF datasets: label column [default: detected].")],
    "transform": Annotated[str, _option(
        help="msn: full decode, shorter side 256 (bilinear), center crop 224, ImageNet mean/std (the MSN protocol). "
             "msn-draft: the same, but big JPEGs are decoded at 1/2-1/8 scale first (faster, slightly different "
             "pixels). processor: the model's preprocessor_config.json (HF ViT: resize straight to 224x224).")],
    "readout": Annotated[str, _option(
        help="Which vector is the feature. auto: the family's default (cls-prenorm with a CLS token, "
                          "else pooled); cls-prenorm: CLS before the final norm (MSN); cls-postnorm; avgpool: mean "
                          "of the normed patch tokens; cls+avgpool; last4-cls: normed CLS of the last 4 blocks "
                          "(DINOv2); pooled: the model's own pooled output.")],
    "batch_size": Annotated[int, _option(
        "--batch-size", "-b", help="Images decoded per batch; a forward pass takes at most this many (fewer on the "
                                   "CPU and for large-token models, to stay in cache and memory).")],
    "device": Annotated[str, _option(help="auto, cpu, cuda or cuda:N.")],
    "dtype": Annotated[str, _option(
        help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, float16.")],
    "strict": Annotated[bool, _option(
        help="Fail on the first unreadable image instead of skipping and reporting it.")],
    "max_pixels": Annotated[int, _option(
        help="Refuse (skip and report) images with more pixels than this: a guard against decompression bombs.")],
    "engine": Annotated[str, _option(
        help="auto: lowshot's fast forward where it covers the model (ViT, ViTMSN, DeiT, DINOv2, CLIP vision), else "
             "the stock transformers one; fast; stock. Same features up to float rounding (not in the cache "
             "key).")],
}


def _extraction_options(*, without: tuple[str, ...] = ()):
    """Give a command the options of :data:`EXTRACT_OPTIONS` (but ``without``) in place of its ``extract``
    parameter, and call it with the ExtractSettings they build (validated there, once)."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        defaults = ExtractSettings()
        options = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                     default=getattr(defaults, name))
                   for name, kind in EXTRACT_OPTIONS.items() if name not in without]
        params = [q for p in signature.parameters.values()
                  for q in (options if p.name == "extract" else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)])]

        @functools.wraps(command)
        def with_settings(**kwargs):
            given = {option.name: kwargs.pop(option.name) for option in options}
            return command(**kwargs, extract=ExtractSettings(**given))

        with_settings.__signature__ = signature.replace(parameters=params)  # what typer reads
        with_settings.__annotations__ = {p.name: p.annotation for p in params}
        return with_settings

    return decorate


CacheDir = Annotated[Path | None, _option(
    "--cache-dir", envvar="LOWSHOT_CACHE_DIR", show_envvar=True,
    help="Feature cache folder [default: the platform's user cache dir, e.g. ~/.cache/lowshot].")]
Wide = Annotated[bool, _option(
    "--wide", help="Show every column and whole names, however wide (tables fit the terminal by default).")]


def _friendly(command):
    """Turn lowshot's own errors into one line on stderr and a non-zero exit (tracebacks only with --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LowshotError as exc:
            if _state["debug"]:
                raise
            text = exc.spelled(_flag(exc.param)) if isinstance(exc, SettingError) else str(exc)
            err.print(f"[bold red]error:[/] {escape(text)}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # an I/O failure the core did not anticipate: still one line, never a traceback
            if _state["debug"]:
                raise
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            err.print(f"[bold red]error:[/] {exc.strerror or exc}{where}", markup=True, highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:  # during an extraction: what the cache keeps (extract.ExtractionInterrupted)
            err.print(f"interrupted: {exc}" if str(exc) else "interrupted", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    wrapper.__doc__ = _paragraphs(command.__doc__)  # the help typer shows
    return wrapper


def _print_version(value: bool) -> None:
    if value:
        from lowshot import __version__

        out.print(f"lowshot {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, _option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, _option("--version", help="Print the version and exit.", is_eager=True,
                                     callback=_print_version)] = False,
) -> None:
    _state["debug"] = debug


@app.command()
@_friendly
@_extraction_options()
def extract(
    model: Model = DEFAULT_MODEL,
    data: Data = None,
    extract: ExtractSettings | None = None,
    shots: Shots = None,
    percent: Percent = None,
    seeds: Seeds = 3,
    split_file: SplitFile = None,
    allow_fewer: AllowFewer = False,
    limit: Limit = None,
    all_images: Annotated[bool, _option(
        "--all", help="Encode the whole train split, not only the images the protocol options draw.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Encode the whole test split and the train images the protocol uses (same options and defaults as probe;
    --all: every train image) and store their CLS features in the cache.

    Images already in the cache are never encoded again: a request that needs more (more shots or seeds, another
    split file, --all) encodes only what is missing. A request the cache covers decodes no image and loads no
    model. An interrupted run resumes from its finished shards.
    """
    from lowshot.features.distributed import launched_rank
    from lowshot.features.extract import extract_features
    from lowshot.render import progress_callback

    subsets = _probe_settings(shots, percent, seeds, split_file, allow_fewer, limit=limit)
    main_rank = launched_rank() == 0  # under torchrun / accelerate, only rank 0 draws and reports
    if data is None and main_rank:
        from lowshot.data.datasets import DEMO_DATA

        err.print(f"no --data given: using the bundled demo sample {DEMO_DATA} (a smoke test, not a benchmark)",
                  highlight=False)
    with progress_callback(err if main_rank else Console(quiet=True)) as progress:
        run = extract_features(model, data, extract, subsets=subsets, all_images=all_images, cache_dir=cache_dir,
                               progress=progress)
    if not main_rank:
        return
    _report_extraction(run)
    err.print("next: lowshot probe" + ("" if all_images else " (same protocol options)"), style="dim")


def _report_extraction(run) -> None:
    """What an extraction did, on stderr: settings, then per split what it holds and what was encoded."""
    s = run.settings
    ranks = f" · {s['world_size']} processes" if s.get("world_size", 1) > 1 else ""
    err.print(f"model {run.model} · {s['readout']['name']} · {s['dtype']} ({s['dtype_reason']}) · {s['device']} · "
              f"engine {s['engine']} ({s['engine_reason']}) · transform {s['transform']['name']}{ranks}",
              highlight=False)
    _readout_notes(s.get("readout"))
    for split in run.splits():
        f = split.features
        if split.cached:
            what = "cache hit, nothing decoded"
        else:
            rate = split.images / split.seconds if split.seconds else 0.0
            what = f"extracted {split.images:,} images in {split.seconds:.1f} s ({rate:.1f} img/s)"
        listed = len(f.listing())
        held = f"{len(f):,} x {f.dim}" if len(f) + len(split.skipped) == listed else \
            f"{len(f):,} of {listed:,} images x {f.dim} (this protocol uses {split.needed:,})"
        err.print(f"{split.split}: {held} features, {len(f.classes)} classes — {what} [key {f.key[:12]}]",
                  highlight=False)
        if split.skipped:
            err.print(f"  skipped {len(split.skipped)} unreadable file(s) in {split.split}:", highlight=False)
            for name, reason in list(split.skipped.items())[:20]:
                err.print(f"    {name}: {reason}", highlight=False)
            if len(split.skipped) > 20:
                err.print(f"    … {len(split.skipped) - 20} more (all listed in the cache manifest)")


def _probe_settings(shots: str | None, percent: str | None, seeds: int, split_file: list[Path] | None,
                    allow_fewer: bool, **fit):
    """The one ProbeSettings both commands build from their protocol options (None: the option was not given)."""
    from lowshot.config import ProbeSettings

    shot_list = _parse_list(shots, int, "--shots") if shots is not None else None
    percent_list = [p for p in _parse_list(percent, float, "--percent") if p != 0] if percent is not None else None
    return ProbeSettings(shots=shot_list, percents=percent_list, seeds=seeds,
                         split_files=tuple(str(p) for p in split_file or ()), allow_fewer=allow_fewer, **fit)


def _protocol_flags(settings) -> str:
    """The protocol options that rebuild ``settings`` on the command line."""
    parts = [f"--shots {','.join(map(str, settings.shots)) or chr(39) * 2}",
             f"--percent {','.join(f'{p:g}' for p in settings.percents) or 0}", f"--seeds {settings.seeds}"]
    parts += [f"--split-file {p}" for p in settings.split_files]
    parts += [f"--limit {settings.limit}"] if settings.limit is not None else []
    return " ".join(parts + (["--allow-fewer"] if settings.allow_fewer else []))


def _readout_notes(readout: dict | None) -> None:
    """Say what the readout resolved to where it is not the plain case: equal to another, interpolated, unmasked."""
    readout = readout or {}
    if readout.get("same_as"):
        err.print(f"note: readout {readout['name']} equals {readout['same_as']} for this model", highlight=False)
    if readout.get("position_embeddings", "native") not in ("native", "any size"):
        err.print(f"note: {readout['family']} trained at {readout['native_size']} px runs at {readout['input_size']} "
                  f"px, position embeddings {readout['position_embeddings']}", highlight=False)
    if readout.get("masking", "none") != "none":
        err.print(f"note: {readout['family']} random masking {readout['masking']}", highlight=False)


@app.command()
@_friendly
@_extraction_options(without=("train_split", "test_split"))
def export(
    model: Model = DEFAULT_MODEL,
    data: Data = None,
    split: Annotated[str, _option(help="The split to export (train, val, test, …).")] = "val",
    output: Annotated[Path, _option(
        "--output", "-o", help="feats.npz (ids, labels, classes, features float32, meta) or feats.parquet.",
        show_default=False)] = ...,
    extract: ExtractSettings | None = None,
    cache_dir: CacheDir = None,
) -> None:
    """Write one split's features (from the cache; every image of the split extracted first if missing) to .npz or
    .parquet for use elsewhere: ids, labels, class names, float32 features and the settings that made them."""
    from lowshot.features.export import export_features
    from lowshot.render import progress_callback

    with progress_callback(err) as progress:
        done = export_features(model, data, extract, split=split, output=output, cache_dir=cache_dir,
                               progress=progress)
    state = "from the cache" if done.cached else "extracted"
    err.print(f"wrote {done.path}: {done.split}, {done.n:,} x {done.dim} float32 features ({state})", highlight=False)


def _report_if_encoded(run) -> None:
    """What ``lowshot probe --model`` says of its extraction: all of it when it encoded images, else only the readout
    notes (a cache hit is the quiet case)."""
    if all(split.cached for split in run.splits()):
        _readout_notes(run.train.features.manifest.get("readout"))
    else:
        _report_extraction(run)  # with the readout notes


def _probe_cached(settings, *, cache_dir):
    """``lowshot probe`` without --model/--data: the most recent extraction's features, nothing encoded."""
    from lowshot.errors import MissingFeaturesError
    from lowshot.features.extract import load_features
    from lowshot.protocol import run_probe
    from lowshot.render import progress_callback

    train, test, run = load_features(cache_dir=cache_dir)
    err.print(f"using the most recent extraction: {run['model']} on {run['data']} "
              f"({run['train_split']} {len(train):,} of {len(train.listing()):,} / {run['test_split']} "
              f"{len(test):,})", highlight=False)
    _readout_notes(train.manifest.get("readout"))
    try:
        with progress_callback(err, unit="fit") as progress:
            return run_probe(train, test, settings, progress=progress)  # model and data: the features' origin
    except MissingFeaturesError as exc:
        recorded = run.get("extract_settings") or {}
        extra = "".join(f" {_flag(name)} {recorded[name]}" for name in ("transform", "readout", "dtype")
                        if recorded.get(name) not in (None, getattr(ExtractSettings(), name)))
        raise MissingFeaturesError(f"{exc}; encode them with: lowshot probe --model {run['model']} --data "
                                   f"{run['data']}{extra} {_protocol_flags(settings)}", model=exc.model,
                                   data=exc.data, missing=exc.missing) from None


def _parse_list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise BadInputError(f"{flag} {text!r}: expected a comma-separated list of numbers, e.g. 1,2,5") from None
    return values


@app.command()
@_friendly
@_extraction_options()
def probe(
    shots: Shots = None,
    percent: Percent = None,
    seeds: Seeds = 3,
    lam: Annotated[str, _option(
        "--lambda", help="L2 penalty λ (objective: summed log-loss + λ/2‖W‖², as MSN; default from MSN's README), "
                         "or 'auto': cross-validation inside the labelled shots only, the one-standard-error "
                         "choice nearest the default (under 3 images per class: the default, as the table says).",
    )] = str(DEFAULT_LAMBDA),
    split_file: SplitFile = None,
    allow_fewer: AllowFewer = False,
    limit: Limit = None,
    model: Annotated[list[str] | None, _option(
        "--model", "-m", help="Probe this model's features, encoding the images the protocol needs that are not "
                              "cached yet (default: the most recent extraction, nothing encoded). Repeatable, or a "
                              "quoted glob ('run/checkpoint-*'): every model on one protocol, one table of models x "
                              "subsets, in training-step order where their names give it (checkpoint-5000, "
                              "step_5000, epoch-10). " + MODEL_HELP)] = None,
    data: Data = None,
    extract: ExtractSettings | None = None,
    backend: Annotated[str, _option(help="Solver: torch (full-batch L-BFGS) or sklearn (reference).")] = "torch",
    classifier: Annotated[str, _option(
        "--classifier", help="Comma-separated: logistic (the MSN probe), knn (cosine k-NN, k by leave-one-out on "
                             "the labelled shots), ncm (nearest class mean). The neighbour classifiers show what "
                             "the probe adds.")] = "logistic",
    ci: Annotated[bool, _option(
        "--ci", help="Add seeded bootstrap 95% confidence intervals over the test images to rows and "
                     "summary.")] = False,
    n_boot: Annotated[int, _option("--n-boot", help="Bootstrap replicates for --ci.")] = 1000,
    ci_seed: Annotated[int, _option("--ci-seed", help="Seed of the bootstrap for --ci.")] = 0,
    fmt: Annotated[str, _option("--format", "-f", help="table, json, csv or markdown (to stdout).")] = "table",
    output: Annotated[Path | None, _option(
        "--output", "-o", help="Also write the results: .json (full: meta, rows, summary), .csv or .md. With several "
                               "models, a folder: one <model folder's name>.json each.")] = None,
    plot: Annotated[Path | None, _option(
        "--plot", metavar="PLOT.png", help="Save a plot (.png, .svg, .pdf or .jpg; needs 'lowshot[plot]'): for a "
                                           "run's checkpoints, top-1 per subset against the training step; else "
                                           "accuracy against labels per class.")] = None,
    log: Annotated[list[str] | None, _option(
        "--log", metavar="TARGET", help="Also log each model's results into an experiment tracker at its training "
                                        "step (read from its name, else 0): tensorboard:DIR, mlflow, mlflow:URI "
                                        "(a tracking URI, e.g. sqlite:///mlflow.db), wandb or wandb:PROJECT. "
                                        "Repeatable; checked before any work, logged once the table is out and the "
                                        "files are written.")] = None,
    wide: Wide = False,
    cache_dir: CacheDir = None,
) -> None:
    """Fit the MSN logistic probe on k-shot / percent subsets of the train features and report top-1 on the whole
    test split, mean ± std over seeds. With --model/--data, first encode whatever the protocol needs that is not
    cached yet (one command from images to the table; the extraction options are extract's and apply only
    then). Several --model (a training run's checkpoints): each on the same protocol, one table, one curve.

    Exit status: 0, or 1 when an output could not be written (its content is kept in a file the error names), or
    2 for bad input.
    """
    from lowshot.io import RESULT_SUFFIXES, check_folder, check_writable, output_format
    from lowshot.render import progress_callback, results_table
    from lowshot.results.rows import FORMATS

    if fmt not in FORMATS:
        raise BadInputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if lam == "auto":
        lam_value: float | str = "auto"
    else:
        try:
            lam_value = float(lam)
        except ValueError:
            raise BadInputError(f"--lambda {lam!r}: expected a positive number or 'auto'") from None
    classifiers = tuple(c for c in classifier.replace(" ", "").split(",") if c)
    settings = _probe_settings(shots, percent, seeds, split_file, allow_fewer, lam=lam_value, backend=backend,
                               classifiers=classifiers, ci=ci, n_boot=n_boot, ci_seed=ci_seed, limit=limit)
    models = _expand_models(model or [])
    targets = _log_targets(log or [])  # every check before any work: nothing is extracted for a bad option
    if output is not None:
        if len(models) > 1:
            _file_names(models, check_folder(output, flag="--output"))
        else:
            output_format(output, RESULT_SUFFIXES)
            check_writable(output)
    if plot is not None:
        _check_plot(plot)
    if models or data is not None:
        from lowshot.protocol import evaluate

        results = []
        for name in models or [DEFAULT_MODEL]:
            with progress_callback(err, unit="it") as progress:
                results.append(evaluate(name, data, extract=extract, probe=settings, cache_dir=cache_dir,
                                        progress=progress, extracted=_report_if_encoded))
    else:
        results = [_probe_cached(settings, cache_dir=cache_dir)]
    for one in results:
        for row in one.rows:
            if row.get("missing"):
                err.print(f"{row['split_file']}: {row['missing']} listed file(s) are not in the train split or "
                          f"unreadable (used {row['n_train']})", highlight=False)
    comparison = _comparison(results, models) if len(results) > 1 or plot is not None else None
    if len(results) > 1:
        _print_comparisons([comparison], fmt, wide=wide)
    elif fmt == "table":  # the table first: a file that fails to write must not take it down too
        out.print(results_table(results[0], width=out.width, wide=wide), crop=False)
    else:
        sys.stdout.write(results[0].render(fmt))
    unsaved = []
    if output is not None:
        paths = [output] if len(results) == 1 else _file_names(models, output)
        for one, path in zip(results, paths, strict=True):
            unsaved += _save(lambda one=one, path=path: one.save(path))
    if plot is not None:
        from lowshot.results.plot import plot_comparison

        unsaved += _save(lambda: plot_comparison(comparison, plot))
    _log_all(results, models, targets)
    _gate_verdict([], unsaved)


def _comparison(results: list, models: list[str]):
    """Several models' results in one table (a series, in step order, where their names give steps)."""
    from lowshot.results.compare import build_report

    return build_report(results, sources=models[:len(results)])


def _expand_models(values: list[str]) -> list[str]:
    """--model values with each glob pattern (a value with * ? or [ that names no file) replaced by what it matches,
    in training-step order (names without a step after, by name); the same model once."""
    import glob

    from lowshot.results.series import step_of

    models: list[str] = []
    for value in values:
        if any(c in value for c in "*?[") and not Path(value).expanduser().exists():
            found = glob.glob(os.path.expanduser(value))
            if not found:
                raise BadInputError(f"--model {value!r}: the pattern matches nothing")
            models += sorted(found, key=lambda m: (step_of(m) is None, step_of(m) or 0, m))
        else:
            models.append(value)
    return list(dict.fromkeys(models))


def _file_names(models: list[str], folder: Path) -> list[Path]:
    """``<folder>/<name>.json`` for each model (a folder's or checkpoint's own name, a hub id with -- for its
    slash), refused up front when two models share a name."""
    names = [Path(m).expanduser().name if Path(m).expanduser().exists() else m.strip("/").replace("/", "--")
             for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BadInputError(f"--output {folder}: several models are named {twice[0]} (one <name>.json each); "
                            "probe them in separate commands")
    return [folder / f"{n}.json" for n in names]


def _check_plot(plot: Path) -> None:
    from lowshot.io import check_writable, output_format
    from lowshot.results.plot import PLOT_SUFFIXES, require_matplotlib

    output_format(plot, PLOT_SUFFIXES, flag="--plot")
    require_matplotlib()
    check_writable(plot, flag="--plot")


def _log_targets(specs: list[str]) -> list:
    """Each --log target checked (its form, its tracker's package) before any work."""
    if not specs:
        return []
    from lowshot.results.tracking import parse_log_target

    return [parse_log_target(spec) for spec in specs]


def _log_all(results: list, models: list[str], targets: list) -> None:
    """Log every model's results into each target, one tracker run per target, at the model's training step: each
    result's step as the series reads it, else the step its model's name gives, else the results' own (0)."""
    if not targets:
        return
    from lowshot.results.series import find_steps, step_of
    from lowshot.results.tracking import open_tracker

    series = find_steps(results, sources=models[:len(results)]) if len(results) > 1 else None
    steps = [s.value for s in series] if series else [step_of(m) for m in models[:len(results)]]
    steps += [None] * (len(results) - len(steps))
    for target in targets:
        with open_tracker(target) as tracker:
            for one, step in zip(results, steps, strict=True):
                tracker.log(one, step=step)
        err.print(f"logged {len(results)} result(s) to {target}", highlight=False)


@app.command()
@_friendly
def report(
    results: Annotated[list[Path], _argument(
        metavar="RESULTS.json", show_default=False,
        help="Results JSON files (lowshot probe --output X.json): different models or checkpoints.")],
    fmt: Annotated[str, _option(
        "--format", "-f", help="table, markdown (pastes into a job summary or PR comment), csv, json, or "
                               "model-index (YAML for a Hugging Face model card; one results file).")] = "table",
    output: Annotated[Path | None, _option(
        "--output", "-o", help="Also write the report: .md, .csv or .json.")] = None,
    label: Annotated[list[str] | None, _option(
        "--label", metavar="NAME",
        help="Row name for each results file, in order (repeatable) [default: meta label or the model folder's "
             "name].")] = None,
    step: Annotated[list[int] | None, _option(
        "--step", metavar="N",
        help="Training step of each results file, in order (repeatable): the files are a run's checkpoints, shown in "
             "step order with each against the step before, and --plot draws top-1 against the step [default: "
             "read from the names, e.g. checkpoint-5000, when every file has one].")] = None,
    published: Annotated[bool, _option(
        "--published", help="Add the MSN paper's rows (Tables 1 and 2; ImageNet-1k, labelled as published) as a "
                            "reference.")] = False,
    baseline: Annotated[Path | None, _option(
        "--baseline", help="Regression gate: a results JSON to compare each RESULTS file against.")] = None,
    max_drop: Annotated[float, _option(
        "--max-drop", help="With --baseline: fail (exit 1) when a subset's mean (of each --metric) is more than "
                           "this many points below the baseline.")] = 1.0,
    force: Annotated[bool, _option(
        "--force", help="Compare results measured under different protocols (test set, feature, transform, λ, "
                        "seeds …) instead of refusing.")] = False,
    plot: Annotated[Path | None, _option(
        "--plot", metavar="PLOT.png", help="Save accuracy vs labels per class (log x, ± std bands), one panel "
                                           "per metric: .png, .svg, .pdf or .jpg (needs 'lowshot[plot]').")] = None,
    metric: Annotated[str, _option(
        "--metric", help="Comma-separated: top1 (the MSN protocol's number), top5, mean-per-class (balanced "
                         "accuracy). Each gets its table, paired differences and gate.")] = "top1",
    significant: Annotated[bool, _option(
        "--significant", help="With --baseline: a subset fails only when its drop exceeds --max-drop AND its paired "
                              "95% interval excludes 0 (needs per-image predictions in both files).")] = False,
    n_boot: Annotated[int, _option(
        "--n-boot", help="Bootstrap replicates of the paired 95% intervals.")] = 1000,
    card: Annotated[Path | None, _option(
        "--card", help="Merge the model-index results into this model card's YAML front matter (README.md), "
                       "keeping the rest of the card.")] = None,
    source_url: Annotated[str | None, _option(
        "--source-url", help="model-index source url (the CI run or paper the numbers come from).")] = None,
    wide: Wide = False,
) -> None:
    """Compare results files in one table (rows = models, columns = subsets, best per column marked), with the
    paired differences of each file to the first; gate them against a baseline; plot them; write model-index
    metadata for a Hugging Face model card.

    Exit status: 0, or 1 when a subset dropped more than --max-drop points below --baseline or an output could
    not be written (its content is kept in a file the error names), or 2 when the protocols differ (without
    --force) or an input is bad.
    """
    from lowshot.io import REPORT_SUFFIXES, check_writable, output_format
    from lowshot.results.compare import REPORT_FORMATS, build_report, load_all
    from lowshot.results.rows import Results
    from lowshot.results.stats import parse_metrics

    if fmt not in REPORT_FORMATS:
        raise BadInputError(f"--format {fmt!r}: expected one of {', '.join(REPORT_FORMATS)}")
    metrics = parse_metrics(metric)
    if n_boot < 1:
        raise BadInputError(f"--n-boot {n_boot}: need at least one bootstrap replicate")
    if output is not None:
        output_format(output, REPORT_SUFFIXES)
        check_writable(output)
    if plot is not None:
        _check_plot(plot)
    loaded = load_all(results)
    if fmt == "model-index" or card is not None:
        _model_index(loaded, results, fmt=fmt, card=card, metrics=metrics, label=label, source_url=source_url)
        if fmt == "model-index":
            return
    base = Results.load(baseline) if baseline is not None else None
    comparisons = [build_report(loaded, labels=label, sources=[str(p) for p in results], published=published,
                                baseline=base, baseline_name=str(baseline), max_drop=max_drop, force=force,
                                metric=m, significant=significant, n_boot=n_boot, steps=step) for m in metrics]
    _print_comparisons(comparisons, fmt, wide=wide)  # first: a file that fails to write must not take them down
    unsaved = []
    if output is not None:
        from lowshot.results.compare import save_comparisons

        unsaved += _save(lambda: save_comparisons(comparisons, output))
    if plot is not None:
        from lowshot.results.plot import plot_comparison

        unsaved += _save(lambda: plot_comparison(comparisons, plot))
    _gate_verdict(comparisons, unsaved)


def _print_comparisons(comparisons, fmt: str, *, wide: bool) -> None:
    """Comparisons on stdout: each table with its notes and paired differences, or one document in ``fmt``."""
    if fmt == "table":
        from lowshot.render import comparison_table, paired_table

        for comparison in comparisons:
            out.print(comparison_table(comparison, width=out.width, wide=wide), crop=False)
            for note in comparison.notes:
                out.print(f"note: {note}", highlight=False)
            if comparison.paired:
                out.print(paired_table(comparison, width=out.width, wide=wide), crop=False)
            for name, reason in comparison.unpaired.items():
                out.print(f"no paired differences for {name}: {reason}", highlight=False)
    else:
        from lowshot.results.compare import render_comparisons

        sys.stdout.write(render_comparisons(comparisons, fmt))


def _save(write) -> list:
    """Run one save at the end of a command: "wrote PATH", or the OutputError (the content kept elsewhere) to
    report once the other outputs and the gate's verdict are out."""
    from lowshot.errors import OutputError

    try:
        err.print(f"wrote {write()}", highlight=False)
    except OutputError as exc:
        return [exc]
    return []


def _model_index(loaded, paths, *, fmt, card, metrics, label, source_url) -> None:
    """--format model-index (stdout) and --card (merge into a model card): one results file, one model."""
    from lowshot.results.modelcard import merge_into_card, model_index_yaml

    if len(loaded) != 1:
        raise BadInputError(f"--format model-index / --card describe one model: give one results file, not "
                            f"{len(loaded)}")
    name = label[0] if label else None
    if fmt == "model-index":
        sys.stdout.write(model_index_yaml(loaded[0], metrics=metrics, name=name, source_url=source_url))
    if card is not None:
        n = merge_into_card(card, loaded[0], metrics=metrics, name=name, source_url=source_url)
        err.print(f"merged {n} result(s) from {paths[0]} into {card}", highlight=False)


def _gate_verdict(comparisons, unsaved=()) -> None:
    """Say what the regression gates found (stderr) and exit 1 when one failed or an output (``unsaved``, its
    OutputErrors) could not be written."""
    from lowshot.errors import OutputError, RegressionError

    comparisons = comparisons if isinstance(comparisons, list) else [comparisons]
    for comparison in comparisons:
        for result in comparison.gates:
            for text in result.differences:
                err.print(f"protocol differs (compared anyway, --force): {text}", highlight=False)
            if result.passed:
                err.print(f"gate passed: {result.summary()}", highlight=False)
    failed = [g for comparison in comparisons for g in comparison.failed]
    if failed or unsaved:
        problems = [g.summary() for g in failed] + [str(exc) for exc in unsaved]
        raise (RegressionError if failed else OutputError)("; ".join(problems))


@app.command()
@_friendly
def bench(
    config: Annotated[Path, _argument(metavar="CONFIG.toml", help="Benchmark config (TOML): models, data, splits, "
                                      "seeds, λ, classifiers, baseline results to gate against; paths relative to it.",
                                      show_default=False)],
    output: Annotated[Path | None, _option(
        "--output", "-o", metavar="FOLDER",
        help="Output folder [default: the config's 'output', else out/<config name> beside it].")] = None,
    force: Annotated[bool, _option(
        "--force", help="Gate against a baseline measured under a different protocol instead of refusing.")] = False,
    update_baseline: Annotated[bool, _option(
        "--update-baseline", help="Write this run's results over the models' baseline files instead of "
                                  "gating.")] = False,
    wide: Wide = False,
    cache_dir: CacheDir = None,
) -> None:
    """Run a benchmark from a config file: extract (cached) and probe each model, write <model>.json,
    report.md (comparison + regression gate, for a CI job summary) and plot.png, then gate.

    Exit status: 0, or 1 when a model dropped more than max_drop points below its baseline, or 2 when a
    baseline's protocol differs (without --force) or the config is bad.
    """
    from lowshot.bench import load_config, run_bench
    from lowshot.render import comparison_table, progress_callback

    cfg = load_config(config)
    with progress_callback(err, unit="it") as progress:
        outcome = run_bench(cfg, cache_dir=cache_dir, output=output, force=force, update_baseline=update_baseline,
                            progress=progress, log=lambda message: err.print(message, highlight=False))
    for path in outcome.written:
        err.print(f"wrote {path}", highlight=False)
    out.print(comparison_table(outcome.comparison, width=out.width, wide=wide), crop=False)
    for note in outcome.comparison.notes:
        out.print(f"note: {note}", highlight=False)
    _gate_verdict(outcome.comparison, outcome.unsaved)


@cache_app.command("list")
@_friendly
def cache_list(wide: Wide = False, cache_dir: CacheDir = None) -> None:
    """List cached feature entries: model, data, split, size, date."""
    from lowshot.features.store import FeatureCache
    from lowshot.render import cache_table

    cache = FeatureCache(cache_dir)
    out.print(f"cache dir: {cache.root}", highlight=False, soft_wrap=True)  # first, also when empty
    manifests = cache.manifests()
    if not manifests:
        out.print("no cached features yet", highlight=False)
        return
    out.print(cache_table(manifests, width=out.width, wide=wide), crop=False)


@cache_app.command("rm")
@_friendly
def cache_rm(
    keys: Annotated[list[str] | None, _argument(
        metavar="KEY", help="Keys or key prefixes (see 'lowshot cache list').")] = None,
    all_entries: Annotated[bool, _option("--all", help="Remove every entry.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Remove cached entries (finished and partial) by key prefix, or all of them."""
    from lowshot.features.store import FeatureCache

    cache = FeatureCache(cache_dir)
    if all_entries:
        keys = [m["key"] for m in cache.manifests()] + [p.name for p in (cache.root / "partial").glob("*")]
    if not keys:
        raise BadInputError("give one or more keys (or --all); see 'lowshot cache list'")
    unknown = [key for key in keys if not cache.matching(key)]
    if unknown:  # checked for every key before anything is removed
        raise BadInputError(f"no cache entry matches {', '.join(map(repr, unknown))}; see 'lowshot cache list' "
                            f"(nothing removed)")
    removed = [key for prefix in keys for key in cache.remove(prefix)]
    err.print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from {cache.root}")


@cache_app.command("verify")
@_friendly
def cache_verify(cache_dir: CacheDir = None) -> None:
    """Check every entry's files against the checksums in its manifest (exit 1 if any is damaged)."""
    from lowshot.errors import CacheError
    from lowshot.features.store import FeatureCache

    cache = FeatureCache(cache_dir)
    problems = cache.verify()
    stale = cache.stale()
    n = len(cache.manifests()) - len(stale)
    for key, note in stale:
        err.print(f"{key[:12]}: {note}", highlight=False)
    for key, problem in problems:
        err.print(f"{key[:12]}: {problem}", highlight=False)
    if problems:
        raise CacheError(f"{len(problems)} problem(s) in {cache.root}; remove damaged entries with "
                         "'lowshot cache rm KEY' and extract again")
    err.print(f"{n} entr{'y' if n == 1 else 'ies'} OK in {cache.root}"
              + (f" ({len(stale)} of an older format, not checked)" if stale else ""))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_host_memory()
    app()


if __name__ == "__main__":
    main()
