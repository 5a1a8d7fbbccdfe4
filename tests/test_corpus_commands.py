"""Every command on the real-model corpus: fold is exact and leaves no more nodes than onnxslim, and no
command ends in an internal error (fold, profile, compress --inspect, batch)."""

from __future__ import annotations

import json
import shutil
import warnings

import onnx
import pytest

import onnxmerge
from models.corpus import CORPUS
from onnxmerge.cli import main as cli_main

EXIT_INTERNAL = 3


@pytest.fixture(scope="module")
def folded(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("folded")
    return {name: onnxmerge.fold(str(path), out / f"{name}.onnx") for name, path in corpus.items()}


@pytest.mark.parametrize("name", list(CORPUS))
def test_fold_is_exact_and_never_behind_onnxslim(corpus, folded, name):
    import onnxslim

    result = folded[name]
    assert result.verified
    assert result.report["verification"]["max_abs_error"] <= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slimmed = onnxslim.slim(onnx.load(str(corpus[name])))
    assert result.report["after"]["nodes"] <= len(slimmed.graph.node)
    original = onnx.load(str(corpus[name]), load_external_data=False)
    assert [o.name for o in result.proto.graph.output] == [o.name for o in original.graph.output]
    assert result.proto.opset_import == original.opset_import


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite0_dynamic"])
def test_raw_efficientnet_export_loses_its_padding_machinery(folded, name):
    after = folded[name].report["after"]
    assert set(after["ops"]) == {"Conv", "Clip", "Add", "GlobalAveragePool", "Reshape", "Gemm"}
    assert after["ops"]["Conv"] == 49 and after["nodes"] == 94
    assert after["macs"] is not None and after["macs"] > 300e6  # ~0.4 GMACs, known now that pads are constants
    conv_pads = [list(a.ints) for node in folded[name].proto.graph.node if node.op_type == "Conv"
                 for a in node.attribute if a.name == "pads"]
    assert any(p[:2] != p[2:] for p in conv_pads)  # TF-"same" padding of stride-2 convs is asymmetric


def test_dynamic_batch_stays_dynamic(folded):
    result = folded["efficientnet_lite0_dynamic"]
    assert result.proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "Shape" not in result.report["after"]["ops"]  # the flatten's target became [0, 1280]-style constant


@pytest.mark.parametrize("name", list(CORPUS))
def test_profile_and_inspect_never_fail_internally(corpus, name, tmp_path, capsys):
    report = tmp_path / "profile.json"
    assert cli_main(["profile", str(corpus[name]), "--runs", "2", "--warmup", "1", "--per-node",
                     "--json", str(report)]) == 0
    assert json.loads(report.read_text())["latency"]["median_ms"] > 0
    code = cli_main(["compress", str(corpus[name]), "--inspect"])
    # Every CNN has a chain to show; magika (not a CNN) is refused with a one-line reason, exit 2.
    assert code == (0 if CORPUS[name].kind == "cnn" else 2), capsys.readouterr()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite0_dynamic"])
def test_compress_inspect_finds_the_chain_of_a_raw_export(corpus, name):
    from onnxmerge.layermerge.api import inspect

    tables = inspect(str(corpus[name]), input_shapes={"input": (1, 3, 224, 224)})
    caption = tables[-1].caption
    segments = int(caption.split()[0])
    assert segments >= 150, caption


def test_batch_over_the_corpus(corpus, tmp_path):
    from onnxmerge.batch.runner import run_batch

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name, path in corpus.items():
        shutil.copy(path, zoo / f"{name}.onnx")
    report = run_batch(zoo, tmp_path / "out", jobs=2)
    statuses = {result.model: result.status for result in report.models}
    assert statuses == {f"{name}.onnx": "ok" for name in CORPUS}, [r.reason for r in report.models]
    assert report.exit_code == 0
