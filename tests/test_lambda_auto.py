"""``--lambda auto`` through the protocol: rows record how λ was chosen and the table says when it is the default."""

from lowshot.config import DEFAULT_LAMBDA
from lowshot.protocol import run_probe
from lowshot.results.rows import setting

from .synthetic import pair


def test_auto_rows_and_table_say_when_lambda_fell_back_to_the_default():
    train, test = pair(classes=4, per_class=8, test_per_class=5, signal=3.0)
    results = run_probe(train, test, shots=(1, 2, 5), percents=(), seeds=1, lam="auto")
    source = {r["subset"]: r["lambda_source"] for r in results.rows}
    assert source == {"1-shot": "default (CV needs 2+ images per class)",
                      "2-shot": "default (2 images per class, too few for CV)", "5-shot": "cv"}
    assert all(r["lambda"] == DEFAULT_LAMBDA for r in results.rows if r["subset"] != "5-shot")
    summary = {s["subset"]: s for s in results.summary}
    assert summary["2-shot"]["lambda_source"] == "default (2 images per class, too few for CV)"
    cells = {line.split("|")[1].strip(): line.split("|")[-2].strip()
             for line in results.to_markdown().splitlines() if "-shot" in line}
    assert cells["1-shot"] == cells["2-shot"] == f"{DEFAULT_LAMBDA:g} (default)"
    assert "default" not in cells["5-shot"]


def test_lambda_cell_is_plain_for_a_fixed_lambda_and_flags_a_fallback_in_some_seeds():
    fixed = run_probe(*pair(classes=3, per_class=4, test_per_class=3), shots=(2,), percents=(), seeds=1)
    assert fixed.rows[0]["lambda_source"] == "fixed" and "lambda_source" not in fixed.summary[0]
    assert setting(fixed.summary[0]) == f"{DEFAULT_LAMBDA:g}"
    mixed = {"lambda": [0.00025, 0.0025], "lambda_source": ["cv", "default (2 images per class, too few for CV)"]}
    assert setting(mixed) == "0.00025/0.0025 (default in some seeds)"
    assert setting({"lambda": 0.0079, "lambda_source": "cv"}) == "0.0079"
