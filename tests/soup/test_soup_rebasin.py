"""Permutation groups derived from the graph, and aligned models that compute exactly what the original does."""

import numpy as np
import onnx
import pytest

from onnxmerge.io import save_model
from onnxmerge.merging import align
from onnxmerge.merging.compat import model_structure
from onnxmerge.merging.rebasin import permutation_groups

from conftest import GraphBuilder, run_model
from models.export import export
from soup_helpers import small_cnn


def named_groups(model: onnx.ModelProto) -> list[set[tuple[str, int, int]]]:
    structure = model_structure(model)
    return [{(structure.slots[slot].tensor.name, axis, offset) for slot, axis, offset in group.members}
            for group in permutation_groups(model, structure)]


def test_residual_add_unifies_spaces_and_the_pooled_flatten_reaches_the_head():
    model = small_cnn(0)
    names = [t.name for t in model.graph.initializer]  # conv1 W, b, BN x4, conv2 W, b, Gemm W, b
    conv1_w, conv1_b, *bn, conv2_w, conv2_b, gemm_w, _ = names
    assert named_groups(model) == [{(conv1_w, 0, 0), (conv1_b, 0, 0), *((p, 0, 0) for p in bn),
                                    (conv2_w, 1, 0), (conv2_w, 0, 0), (conv2_b, 0, 0), (gemm_w, 1, 0)}]


def test_grouped_conv_and_flatten_of_a_spatial_map_pin_the_channels():
    assert named_groups(small_cnn(0, group=2)) == []
    g = GraphBuilder((1, 3, 4, 4))
    flat = g.node("Flatten", [g.node("Relu", [g.conv("x", 3, 4, pads=[1, 1, 1, 1])])], axis=1)
    assert named_groups(g.build(g.node("Gemm", [flat, g.const(np.ones((5, 64), np.float32))], transB=1))) == []


def test_depthwise_conv_carries_and_concat_places_blocks_side_by_side():
    g = GraphBuilder((1, 3, 6, 6))
    left = g.conv("x", 3, 4, k=1)
    right = g.conv("x", 3, 2, k=1)
    joined = g.node("Concat", [left, right], axis=1)
    depthwise = g.conv(joined, 6, 6, groups=6, pads=[1, 1, 1, 1])
    model = g.build(g.conv(g.node("Relu", [depthwise]), 6, 3, k=1))
    left_w, left_b, right_w, right_b, dw_w, dw_b, last_w, _ = [t.name for t in model.graph.initializer]
    groups = sorted(named_groups(model), key=len)
    assert groups == sorted([
        {(left_w, 0, 0), (left_b, 0, 0), (dw_w, 0, 0), (dw_b, 0, 0), (last_w, 1, 0)},
        {(right_w, 0, 0), (right_b, 0, 0), (dw_w, 0, 4), (dw_b, 0, 4), (last_w, 1, 4)},
    ], key=len)


@pytest.mark.parametrize("name", ["digits_mobilenet", "unet"])
def test_aligned_exports_are_output_identical_and_closer_to_the_reference(tmp_path, name):
    a, b = (export(name, tmp_path / f"{name}{seed}.onnx", keep_bn=True, seed=seed) for seed in (0, 1))
    result = align(a, b, tmp_path / "aligned.onnx")
    report = result.report
    assert report["verification"]["passed"] and report["moved_channels"] > 0
    assert report["cosine_after"] > report["cosine_before"] + 0.1
    original, aligned = onnx.load(b), onnx.load(result.model)
    shape = [d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim]
    feeds = {"input": np.random.default_rng(5).standard_normal(shape).astype(np.float32)}
    np.testing.assert_allclose(run_model(aligned, feeds)[0], run_model(original, feeds)[0], rtol=1e-4, atol=1e-4)
    changed = sum(x.raw_data != y.raw_data for x, y in zip(original.graph.initializer, aligned.graph.initializer))
    assert changed > len(original.graph.initializer) // 2


def test_align_refuses_overwriting_and_leaves_inputs_untouched(tmp_path):
    a, b = (save_model(small_cnn(seed), tmp_path / f"m{seed}.onnx") for seed in (0, 1))
    before = b.read_bytes()
    from onnxmerge.errors import BadInputError
    with pytest.raises(BadInputError, match="refusing to overwrite"):
        align(a, b, b)
    assert b.read_bytes() == before
