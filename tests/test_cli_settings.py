"""One declaration per setting at the CLI: the extraction options are declared once and offered, with the same
help, by every command that encodes images; a bad value is refused by the settings object in one line naming the
flag; --readout has no second name; probe --model and bench run the protocol through one library function."""

import re

import pytest
from typer.testing import CliRunner

from lowshot import protocol
from lowshot.cli import EXTRACT_OPTIONS, app
from lowshot.config import ExtractSettings, ProbeSettings

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def flag_of(field: str) -> str:
    return "--" + field.replace("_", "-")


def test_every_extraction_setting_is_one_option_with_one_help_in_extract_probe_and_export():
    settings = set(ExtractSettings.__dataclass_fields__) - {"workers"}  # workers: automatic, no option
    assert set(EXTRACT_OPTIONS) == settings
    helps = {command: flat(invoke(command, "--help").output) for command in ("extract", "probe", "export")}
    for field, declared in EXTRACT_OPTIONS.items():
        text = " ".join(declared.__metadata__[0].help.replace("\\[", "[").split())  # as shown: markup escaped
        for command, shown in helps.items():
            if command == "export" and field in ("train_split", "test_split"):  # export has --split
                continue
            assert f"{flag_of(field)} " in shown, (command, field)
            assert text[:60] in shown, (command, field)  # the same words, not "as for extract"


def test_feature_is_no_longer_a_second_name_for_readout(tiny_model, image_data, cache_dir):
    result = invoke("extract", "--model", tiny_model, "--data", image_data, "--feature", "cls-postnorm")
    assert result.exit_code == 2 and "no such option: --feature" in result.output


@pytest.mark.parametrize(("command", "args", "message"), [
    ("export", ["--output", "x.npz", "--max-pixels", "0"], "--max-pixels 0: must be positive"),
    ("export", ["--output", "x.npz", "--strict", "--dtype", "int3"], "--dtype 'int3'"),
    ("probe", ["--max-pixels", "0"], "--max-pixels 0: must be positive"),
    ("probe", ["--readout", ""], "--readout '': expected a readout name"),
    ("extract", ["--batch-size", "0"], "--batch-size 0: must be at least 1"),
])
def test_a_bad_extraction_option_is_one_line_naming_its_flag_from_every_command(tiny_model, image_data, cache_dir,
                                                                                command, args, message):
    result = invoke(command, "--model", tiny_model, "--data", image_data, *args)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {message}" or result.output.startswith(f"error: {message}"), \
        result.output
    assert not (cache_dir / "entries").exists() or not any((cache_dir / "entries").iterdir())


def test_probe_with_a_model_and_bench_both_run_protocol_evaluate(tiny_model, image_data, cache_dir, tmp_path,
                                                                 monkeypatch):
    calls = []
    real = protocol.evaluate

    def spy(model, data, **kwargs):
        calls.append((model, kwargs["extract"], kwargs["probe"]))
        return real(model, data, **kwargs)

    monkeypatch.setattr(protocol, "evaluate", spy)
    monkeypatch.setattr("lowshot.bench.evaluate", spy)
    probed = invoke("probe", "--model", tiny_model, "--data", image_data, "--device", "cpu", "--dtype", "float32",
                    "--shots", "1", "--percent", "0", "--seeds", "1")
    assert probed.exit_code == 0, probed.output
    config = tmp_path / "b.toml"
    config.write_text(f'data = "{image_data}"\nshots = [1]\npercents = []\nseeds = 1\nplot = false\n'
                      f'[extract]\ndevice = "cpu"\ndtype = "float32"\n'
                      f'[[models]]\nname = "tiny"\npath = "{tiny_model}"\n')
    benched = invoke("bench", config, "--output", tmp_path / "out")
    assert benched.exit_code == 0, benched.output
    assert [str(model) for model, _, _ in calls] == [str(tiny_model)] * 2
    (_, probe_extract, probe_settings), (_, bench_extract, bench_settings) = calls
    assert probe_extract == ExtractSettings(device="cpu", dtype="float32") == bench_extract
    assert probe_settings.shots == bench_settings.shots == (1,) and isinstance(bench_settings, ProbeSettings)


def test_evaluate_is_extract_features_then_run_probe(tiny_model, image_data, cache_dir):
    from lowshot.features.extract import extract_features

    extract = ExtractSettings(device="cpu", dtype="float32")
    probe = ProbeSettings(shots=(1, 2), percents=(), seeds=2)
    seen = []
    results = protocol.evaluate(str(tiny_model), str(image_data), extract=extract, probe=probe, cache_dir=cache_dir,
                                extracted=seen.append)
    run = extract_features(str(tiny_model), str(image_data), extract, subsets=probe, cache_dir=cache_dir)
    again = protocol.run_probe(run.train.features, run.test.features, probe)
    assert len(seen) == 1 and not seen[0].train.cached and run.train.cached  # encoded once, then a cache hit
    assert [r["top1"] for r in results.rows] == [r["top1"] for r in again.rows]
    assert sorted(r["subset"] for r in results.rows) == ["1-shot", "1-shot", "2-shot", "2-shot"]
