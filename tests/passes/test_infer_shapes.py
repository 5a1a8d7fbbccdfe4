from onnxmerge.graph import import_graph
from onnxmerge.pass_framework import PassContext
from onnxmerge.passes.infer_shapes import InferShapes

from conftest import GraphBuilder


def test_shapes_are_recorded_and_graph_is_not_reported_modified():
    g = GraphBuilder((1, 3, 8, 8))
    out = g.node("Relu", [g.conv("x", 3, 5, strides=[2, 2])])
    model = g.build(out)
    graph = import_graph(model)
    conv_out = graph.nodes[0].outputs[0]
    assert conv_out.shape is None
    result = InferShapes().run(graph, PassContext(template=model))
    assert result.modified is False
    assert list(conv_out.shape) == [1, 5, 3, 3]
