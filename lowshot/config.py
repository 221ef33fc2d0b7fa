"""Protocol defaults and the two settings objects of a run (no heavy imports here, so ``lowshot --help`` is fast).

:class:`ExtractSettings` says how images become features, :class:`ProbeSettings` which labelled subsets are drawn and
how they are fitted. Each is frozen and validated once, when it is built; the CLI, a bench TOML file and the Python
API all build the same objects, and results record them as they are (``meta["settings"]``). A bad value raises
:class:`~lowshot.errors.SettingError` naming the parameter; each front end spells it its own way (``--shots``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from lowshot.errors import SettingError

DEFAULT_MODEL = "facebook/vit-msn-small"  # the MSN ViT-S/16 the product is built around
DEFAULT_READOUT = "auto"  # the family's default readout (models.readouts): cls-prenorm with a CLS token, else pooled
DEFAULT_MAX_PIXELS = 2 * 89_478_485  # images above this are refused as decompression bombs (PIL's own error level)
DEFAULT_LAMBDA = 0.0025  # MSN README, logistic_eval.py example for 5 images per class
# msn: MSN logistic_eval.py; msn-draft: the same with libjpeg's draft decode of big JPEGs (opt-in, faster);
# processor: the model's preprocessor_config.json
TRANSFORMS = ("msn", "msn-draft", "processor")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ("auto", "fast", "stock")  # auto: the fast path where it covers the model, else the stock transformers one
DEFAULT_BATCH_SIZE = 64
# MSN protocol (Assran et al. 2022, Tables 1-2): 1, 2 and 5 images per class and 1% of the labels, three seeds.
DEFAULT_SHOTS = (1, 2, 5)
DEFAULT_PERCENTS = (1.0,)
DEFAULT_SEEDS = 3
CLASSIFIERS = ("logistic", "knn", "ncm")  # the MSN probe, then the neighbour classifiers (lowshot.classify.neighbors)
BACKENDS = ("torch", "sklearn")
DEFAULT_N_BOOT = 1000  # bootstrap replicates (torchgeo-bench and most papers: 1,000)


@dataclass(frozen=True)
class ExtractSettings:
    """How images become features: everything ``lowshot extract`` needs besides the model, the data and the cache.

    ``transform``, ``readout``, ``dtype`` and ``device`` (as resolved) are part of the cache key; the others only
    change how the work is done. ``readout`` is checked against what the model offers when the model is read."""

    revision: str | None = None
    train_split: str = "train"
    test_split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    transform: str = "msn"
    readout: str = DEFAULT_READOUT
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    strict: bool = False
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    engine: str = "auto"

    def __post_init__(self) -> None:
        _choice("transform", self.transform, TRANSFORMS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("engine", self.engine, ENGINES)
        if not isinstance(self.readout, str) or not self.readout:  # which names a model offers: resolve_readout
            raise SettingError("readout", self.readout, "expected a readout name such as auto, cls-prenorm, pooled")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise SettingError("device", self.device, "expected auto, cpu, cuda or cuda:N")
        _integer("batch_size", self.batch_size, minimum=1, reason="must be at least 1")
        _integer("max_pixels", self.max_pixels, minimum=1, reason="must be positive")
        if self.workers is not None:
            _integer("workers", self.workers, minimum=1, reason="must be at least 1 (or unset: automatic)")
        if not self.train_split:
            raise SettingError("train_split", self.train_split, "must name a split")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProbeSettings:
    """Which labelled subsets are drawn from the train split, and how each is fitted and scored.

    ``shots``/``percents`` left as None take the MSN defaults (1, 2, 5 shots; 1%), unless ``split_files`` are given:
    then only what is asked for explicitly is drawn, so a published-split table holds no random rows. Values are
    normalised (sorted, without duplicates) so that equal protocols compare equal.

    ``limit`` (quick mode, not the protocol): at most ``limit`` images per class of the test split and of the train
    pool, each the first ``limit`` readable images of its class in the seeded order subsets are drawn in (the test
    split: seed 0's order; see ``lowshot.data.subsets.scored_indices``). k-shot subsets are then the same images as
    without it, so k must not exceed it; percent subsets take their share of the limited pool; split files are used as
    listed. It uses the cache entries of full runs and grows them; results record it, and the gate refuses them."""

    shots: tuple[int, ...] | None = None
    percents: tuple[float, ...] | None = None
    seeds: int = DEFAULT_SEEDS
    split_files: tuple[str, ...] = ()
    allow_fewer: bool = False
    lam: float | str = DEFAULT_LAMBDA
    backend: str = "torch"
    classifiers: tuple[str, ...] = ("logistic",)
    ci: bool = False
    n_boot: int = DEFAULT_N_BOOT
    ci_seed: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        split_files = tuple(str(p) for p in (self.split_files or ()))
        shots = (() if split_files else DEFAULT_SHOTS) if self.shots is None else tuple(self.shots)
        percents = (() if split_files else DEFAULT_PERCENTS) if self.percents is None else tuple(self.percents)
        for k in shots:
            _integer("shots", k, minimum=1, reason="must be a positive number of images per class")
        for p in percents:
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 100:
                raise SettingError("percents", p, "must be in (0, 100]")
        _integer("seeds", self.seeds, minimum=1, reason="need at least one seed")
        if not shots and not percents and not split_files:
            raise SettingError("shots", "", "nothing to probe: give shots, percents or split files")
        lam = self.lam
        if lam != "auto":
            if isinstance(lam, bool) or not isinstance(lam, int | float) or not lam > 0:
                raise SettingError("lam", lam, "expected a positive number or 'auto'")
            lam = float(lam)
        _choice("backend", self.backend, BACKENDS)
        classifiers = tuple(dict.fromkeys(self.classifiers))
        unknown = [c for c in classifiers if c not in CLASSIFIERS]
        if unknown or not classifiers:
            raise SettingError("classifiers", ",".join(unknown) or "(none)",
                               f"expected some of {', '.join(CLASSIFIERS)}")
        if self.ci:
            _integer("n_boot", self.n_boot, minimum=1, reason="need at least one bootstrap replicate")
        _integer("ci_seed", self.ci_seed, minimum=0, reason="must be a non-negative integer")
        if self.limit is not None:
            _integer("limit", self.limit, minimum=1, reason="must be a positive number of images per class")
            if shots and max(shots) > self.limit:
                raise SettingError("shots", max(shots), f"a {max(shots)}-shot subset needs {max(shots)} train images "
                                   f"per class and the limit keeps {self.limit}; raise the limit to {max(shots)} or "
                                   "lower the shots")
        set_ = object.__setattr__  # frozen: normalise in place once, here
        set_(self, "shots", tuple(sorted(set(shots))))
        set_(self, "percents", tuple(sorted({float(p) for p in percents})))
        set_(self, "split_files", split_files)
        set_(self, "lam", lam)
        set_(self, "classifiers", classifiers)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def split_file_paths(self) -> list[Path]:
        return [Path(p) for p in self.split_files]


def _choice(param: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingError(param, value, f"expected one of {', '.join(allowed)}")


def _integer(param: str, value: object, *, minimum: int, reason: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(param, value, "expected an integer")
    if value < minimum:
        raise SettingError(param, value, reason)
