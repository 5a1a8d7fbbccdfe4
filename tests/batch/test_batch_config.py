"""The batch config: sizes, glob matching, precedence, and one-line errors for every kind of mistake."""

import numpy as np
import pytest

from onnxmerge.batch.config import BatchConfig, ModelSettings, load_config, matches, parse_size
from onnxmerge.batch.pipelines import get_pipeline
from onnxmerge.errors import BadInputError

FOLD = get_pipeline("fold")
BASE = ModelSettings(options={}, timeout=60.0, memory_limit=2**30)


@pytest.mark.parametrize("text, size", [("4GiB", 4 * 2**30), ("512M", 512 * 2**20), ("1.5g", 3 * 2**29),
                                        (1024, 1024), ("none", None), (0, None), ("0", None)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12XB", "-1", "lots", True])
def test_parse_size_refuses(text):
    with pytest.raises(BadInputError, match="memory size"):
        parse_size(text)


def test_matching_is_on_the_name_without_slash_and_on_the_path_with_one():
    assert matches("resnet*.onnx", "zoo/vision/resnet18.onnx")
    assert not matches("vision/*.onnx", "resnet18.onnx")
    assert matches("vision/*", "vision/deep/resnet18.onnx")  # "*" crosses "/"
    assert not matches("vision/*", "other/vision/resnet18.onnx")


def test_later_tables_win_over_defaults_and_the_command_line(tmp_path):
    config = tmp_path / "batch.toml"
    config.write_text("""
[defaults]
check_n = 2
timeout = 30
[models."*.onnx"]
rtol = 1e-3
[models."big/*"]
check_n = 1
memory_limit = "8GiB"
input_shapes = { input = [2, 3, 64, 64] }
""")
    loaded = load_config(config, FOLD)
    small = loaded.settings_for("small.onnx", BASE)
    assert small == ModelSettings(options={"check_n": 2, "rtol": 1e-3}, timeout=30.0, memory_limit=2**30)
    big = loaded.settings_for("big/x.onnx", BASE)
    assert big.options == {"check_n": 1, "rtol": 1e-3, "input_shapes": {"input": [2, 3, 64, 64]}}
    assert (big.timeout, big.memory_limit) == (30.0, 8 * 2**30)
    assert BatchConfig().settings_for("any.onnx", BASE) == BASE


@pytest.mark.parametrize("text, needle", [
    ("[defaults\n", "not valid TOML"),
    ("check_n = 2\n", "unknown table"),
    ("[defaults]\nchekc_n = 2\n", "unknown option 'chekc_n'"),
    ("[defaults]\ncheck_n = true\n", "check_n must be int"),
    ("[defaults]\ntimeout = -1\n", "timeout must be a positive number"),
    ("[defaults]\nskip = \"fold_batchnorm\"\n", "skip must be a list of strings"),
    ("[defaults]\nskip = [\"no_such_pass\"]\n", "unknown pass 'no_such_pass'"),
    ("[defaults]\ncalibration = \"calib.npz\"\n", "unknown option 'calibration' for the fold pipeline"),
    ('[models."a.onnx"]\ninput_shapes = { input = [1, 0] }\n', "positive dims"),
    ("models = 3\n", "models must be tables"),
])
def test_config_mistakes_are_one_line_errors(tmp_path, text, needle):
    config = tmp_path / "batch.toml"
    config.write_text(text)
    with pytest.raises(BadInputError, match=needle) as error:
        load_config(config, FOLD)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options,match", [
    ({}, "needs a 'calibration'"),
    ({"calibration": "c.npz"}, "exactly one of 'speedup' and 'latency_budget_ms'"),
    ({"calibration": "c.npz", "speedup": 1.5, "latency_budget_ms": 3.0}, "exactly one"),
])
def test_compress_pipeline_needs_calibration_and_one_target(options, match):
    with pytest.raises(BadInputError, match=match):
        get_pipeline("compress").check(options)
    get_pipeline("compress").check({"calibration": "c.npz", "speedup": 1.5})




def test_compress_pipeline_end_to_end(tmp_path, trained_digits):
    """A batch of one digits net under the compress pipeline: per-model calibration and target from the config."""
    from onnxmerge.batch import run_batch
    from onnxmerge.io import save_model

    digits = trained_digits("resnet")
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    save_model(digits.model, zoo / "digits.onnx")
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input=digits.x_calib)
    config = tmp_path / "batch.toml"
    config.write_text(f'[defaults]\ncalibration = "{calibration}"\nspeedup = 1.1\nrecover_steps = 40\nruns = 5\n')
    report = run_batch(zoo, tmp_path / "out", pipeline="compress", config=config, jobs=1)
    (result,) = report.models
    assert result.status == "ok", result.reason
    row = result.row()
    assert row["speedup"] is not None and row["verified"] == "n/a"  # compress does not check equivalence
    assert row["nodes_after"] < row["nodes_before"]
    assert (tmp_path / "out" / "digits.onnx").is_file()
