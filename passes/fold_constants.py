"""Evaluate everything that does not depend on the model's inputs and store it as initializers.

Real exports carry a lot of arithmetic over constants: torch's legacy exporter computes TF-"same" pads
at run time (``ConstantOfShape``/``Concat``/``Reshape``/``Slice``/``Transpose``/``Cast`` feeding a
``Pad``), tf2onnx transposes and reshapes weights, and flatten heads read ``Shape`` of a tensor whose
dims are all static. Once folded, the other passes see plain constants (a constant zero ``Pad`` then
folds into the Conv's pads).

The evaluator is onnxscript's constant folder (over onnx-ir), a maintained one that also propagates
shapes symbolically: ``Shape`` of a tensor folds to a constant only when every dim it reads is static,
so a dim the user left dynamic stays dynamic and only what is constant for every value of it is folded.
This module owns the glue, the size cap and the refusal reasons:

* **Size cap.** A folded tensor larger than ``PassOptions.fold_size_limit_bytes`` is kept as the
  computation that makes it, unless storing it removes at least as much (its constant inputs are read
  by nothing else), the rule onnxsim and onnxscript apply so that a folded ``Expand``/``Tile`` cannot
  blow a 5 MB model up to 500 MB.
* **Never folded:** nondeterministic ops (``Random*``, ``Multinomial``), ops of other domains, and
  anything whose evaluation fails; the rest of the graph still folds.
* **I/O contract.** Graph input and output names, dtypes and declared dims are the template's; a graph
  output whose whole value is constant stays produced by a node (its name is the contract).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmerge.graph import (add_constant, constant_value, current_external_data_dir, detach, export_graph,
                             import_graph, is_graph_output, replace_uses, static_shape)
from onnxmerge.pass_framework import SHAPES, GraphPass, PassContext, PassResult, Refusal, Refused, register_pass

_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                               "Multinomial"})
# Inputs this large (elements) are still evaluated: folding a Transpose/Cast/Mul of a weight is what we
# want; the output cap below is what guards the model size.
_INPUT_ELEMENTS_LIMIT = 1 << 30


@register_pass
class FoldConstants(GraphPass):
    name = "fold_constants"
    description = ("Evaluate subgraphs that do not depend on the model's inputs (shape arithmetic over static "
                   "dims included) and store their results as initializers, under a size cap.")

    requires = frozenset({SHAPES})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        result.rewrites = _static_shape_reads(graph)
        if result.rewrites:
            graph.cleanup(remove_unused_graph_inputs=False)
            result.modified = True
        if not _candidates(graph):
            return result
        limit = max(1, ctx.options.fold_size_limit_bytes)
        folded = _fold(export_graph(graph, ctx.template), limit)
        if folded is not None:
            before = _signature(graph)
            new_graph = import_graph(folded)
            if _signature(new_graph) == before and len(new_graph.nodes) < len(graph.nodes):
                result.rewrites += len(graph.nodes) - len(new_graph.nodes)
                _replace_contents(graph, new_graph)
                result.modified = True
        result.refusals.extend(_refusals(self.name, graph, limit))
        return result


def _fold(model: onnx.ModelProto, limit_bytes: int) -> onnx.ModelProto | None:
    """The model with its constant subgraphs folded (None if nothing folded).

    Weights kept in external data stay references through the round trip (the export passes them through,
    onnx-ir reads one only when a node it evaluates needs it, from the model's folder, and writes the
    reference back), so the round trip costs kilobytes for them.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants

    ir_model = ir.serde.deserialize_model(model)
    base_dir = current_external_data_dir()
    if base_dir is not None:
        ir.external_data.set_base_dir(ir_model.graph, base_dir)

    def should_fold(node: "ir.Node") -> bool | None:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC:
            return False
        # onnxscript keeps ConstantOfShape by default to avoid growing the model; our size cap decides.
        return True if node.op_type == "ConstantOfShape" else None

    # onnxscript logs every node it declines at INFO/DEBUG; those reasons are reported by _refusals.
    logger = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        outcome = fold_constants(ir_model, onnx_shape_inference=True, input_size_limit=_INPUT_ELEMENTS_LIMIT,
                                 output_size_limit=_elements_for(limit_bytes), should_fold=should_fold)
    finally:
        logger.setLevel(level)
    if not outcome.modified:
        return None
    common.RemoveUnusedNodesPass()(ir_model)
    return ir.serde.serialize_model(ir_model)


def _static_shape_reads(graph: gs.Graph) -> int:
    """Replace ``Gather``/``Slice`` of a ``Shape`` by a constant when every dim they select is static.

    ``x.size(2)`` exports as ``Gather(Shape(x), 2)``; with a dynamic batch the ``Shape`` is not constant, but
    the dims read are. onnxscript's folder only propagates 1-D gathers of shapes, so this glue covers the
    scalar gathers and slices torch and tf2onnx emit. Dims come from ONNX shape inference (a symbolic or
    unknown dim is never read as a number).
    """
    folded = 0
    for node in list(graph.nodes):
        if node.op not in ("Gather", "Slice") or not node.inputs or not node.outputs:
            continue
        source = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if source is None or source.op != "Shape" or not source.inputs or source.inputs[0].shape is None:
            continue
        dims = list(source.inputs[0].shape)[source.attrs.get("start", 0):source.attrs.get("end", None)]
        values = np.array([d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in dims], dtype=object)
        selected = _select(node, values)
        if selected is None or any(v is None for v in np.ravel(selected)) or is_graph_output(graph, node.outputs[0]):
            continue
        constant = add_constant(graph, node.outputs[0].name + ".folded", np.asarray(selected, dtype=np.int64))
        replace_uses(node.outputs[0], constant)
        detach(node)
        folded += 1
    return folded


def _select(node: gs.Node, values: np.ndarray) -> np.ndarray | None:
    """What ``node`` (Gather on axis 0, or Slice) reads from the 1-D ``values``; None if its parameters are
    not constants."""
    if node.op == "Gather":
        indices = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if indices is None or node.attrs.get("axis", 0) not in (0, -1):
            return None
        indices = np.asarray(indices, dtype=np.int64)
        if np.any(indices >= len(values)) or np.any(indices < -len(values)):
            return None
        return values[indices]
    if "starts" in node.attrs:  # opset < 10
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes", [0]), [1]
    else:
        parts = [constant_value(t) if t.name else None for t in node.inputs[1:5]]
        if len(parts) < 2 or parts[0] is None or parts[1] is None:
            return None
        if any(p is None and t.name for p, t in zip(parts[2:], node.inputs[3:5])):
            return None
        starts, ends = parts[0], parts[1]
        axes = parts[2] if len(parts) > 2 and parts[2] is not None else [0]
        steps = parts[3] if len(parts) > 3 and parts[3] is not None else [1]
    if len(np.ravel(starts)) != 1 or list(np.ravel(axes)) not in ([0], [-1]):
        return None
    start, end, step = (int(np.ravel(v)[0]) for v in (starts, ends, steps))
    if step == 0:
        return None
    # ONNX clamps out-of-range bounds the way Python slicing does (INT64_MAX means "to the end").
    return values[slice(start, end, step)]


def _elements_for(limit_bytes: int) -> int:
    """onnxscript caps folded outputs by element count; take the widest common element (8 bytes) so that a
    tensor over ``limit_bytes`` is never stored, whatever its type."""
    return max(1, limit_bytes // 8)


def _candidates(graph: gs.Graph) -> bool:
    """Cheap test: could anything fold? (Saves a round trip through onnx-ir when the answer is no.)"""
    for node in graph.nodes:
        if node.op in ("Shape", "Size"):
            return True
        if node.op != "Constant" and node.inputs and all(_is_constant(t) for t in node.inputs if t.name):
            return True
    return False


def _is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) or (bool(tensor.inputs) and tensor.inputs[0].op == "Constant")


def _signature(graph: gs.Graph) -> tuple:
    return tuple(t.name for t in graph.inputs), tuple(t.name for t in graph.outputs)


def _replace_contents(graph: gs.Graph, new: gs.Graph) -> None:
    """Make ``graph`` (the object the pipeline holds) carry ``new``'s nodes and tensors."""
    graph.nodes = new.nodes
    graph.inputs = new.inputs
    graph.outputs = new.outputs
    graph.__dict__.pop("_onnxmerge_names", None)  # graph.unique_name's cache of taken names


def _refusals(pass_name: str, graph: gs.Graph, limit_bytes: int) -> list[Refusal]:
    """Why the nodes that look foldable (after folding) were left alone, one record per node."""
    found = []
    for index, node in enumerate(graph.nodes):
        try:
            _explain_unfolded(node, limit_bytes)
        except Refused as refused:
            found.append(Refusal.of(pass_name, node, refused, index))
    return found


def _explain_unfolded(node: gs.Node, limit_bytes: int) -> None:
    """For a node still in the graph after folding: raise :class:`Refused` saying why it was not folded if it
    looked foldable (a Shape/Size of dynamic dims, or a node whose inputs are all constants)."""
    if node.op in ("Shape", "Size"):
        shape = node.inputs[0].shape if node.inputs else None
        if static_shape(node.inputs[0]) is None:
            dynamic = [str(d) for d in (shape or []) if not isinstance(d, int) or d < 0]
            raise Refused("it reads dynamic dims (" + ", ".join(dynamic or ["unknown rank"]) + "); pin them "
                          "with overwrite_input_shapes to fold it")
        return
    if node.op == "Constant" or not node.inputs or not all(_is_constant(t) for t in node.inputs if t.name):
        return
    if node.op in _NONDETERMINISTIC:
        raise Refused("it is nondeterministic")
    if node.domain not in (None, "", "ai.onnx"):
        raise Refused(f"op domain '{node.domain}' is not evaluated")
    size = _output_bytes(node)
    if size is not None and size > limit_bytes:
        raise Refused(f"its result ({size / 2**20:.1f} MiB) is over the fold size limit "
                      f"({limit_bytes / 2**20:.1f} MiB)")
    raise Refused("the evaluator could not compute it (see onnxscript's constant folder)")


def _output_bytes(node: gs.Node) -> int | None:
    if not node.outputs:
        return None
    output = node.outputs[0]
    shape = static_shape(output)
    if shape is None or output.dtype is None:
        return None
    try:
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(output.dtype).itemsize
    except TypeError:
        return None
