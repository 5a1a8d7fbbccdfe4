"""What a graph pass is: a named, described rewrite that reports whether it changed the graph and why not.

Modelled on onnx-ir's pass infrastructure and onnxscript's rewrite rules: a pass declares what it
``requires`` (the pipeline provides it), returns a :class:`PassResult`, and records a :class:`Refusal`
(a human-readable reason) for every candidate node it left alone, so ``--explain`` can answer "why didn't
this fold?". Rewrites and the helpers they call refuse by raising :class:`Refused` (see
:mod:`onnxmerge.refusal`, re-exported here).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs

from onnxmerge.graph import bypass, infer_shapes
from onnxmerge.refusal import Refusal, Refused

__all__ = ["SHAPES", "GraphPass", "NodeRewritePass", "PASSES", "PassContext", "PassOptions", "PassResult",
           "Refusal", "Refused", "register_pass"]

SHAPES = "shapes"
_SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


@dataclass
class PassOptions:
    """Knobs that change what passes may do (not how they are scheduled)."""

    allow_costlier_merges: bool = False
    # fold_constants stores no folded tensor larger than this unless storing it frees at least as much.
    fold_size_limit_bytes: int = 1 << 20


@dataclass
class PassContext:
    """Shared state of one pipeline run: the model being rewritten and whether its shapes are current."""

    template: onnx.ModelProto
    options: PassOptions = field(default_factory=PassOptions)
    shapes_current: bool = False

    def ensure(self, graph: gs.Graph, requirements: frozenset[str]) -> None:
        if SHAPES in requirements and not self.shapes_current:
            infer_shapes(graph, self.template)
            self.shapes_current = True


@dataclass
class PassResult:
    modified: bool
    rewrites: int = 0
    # One record per refused candidate, in the order the pass met them (a node may appear more than once).
    refusals: list[Refusal] = field(default_factory=list)


class GraphPass(ABC):
    """A rewrite of a graph in place. Subclasses set ``name``, ``description`` and maybe ``requires``."""

    name: ClassVar[str]
    description: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()
    # True when the pass only removes nodes or rewires readers to tensors of the same shape and dtype, so the
    # shape annotations of the tensors left stay true and the pipeline need not infer them again.
    preserves_shapes: ClassVar[bool] = False

    @abstractmethod
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Rewrite ``graph`` in place."""


class NodeRewritePass(GraphPass):
    """A pass that looks at each node of some op types and either rewrites around it or says why not.

    ``rewrite`` returns None when it changed the graph and raises :class:`Refused` (before changing
    anything) when it cannot; each refusal becomes one :class:`Refusal` of the candidate node, labelled by
    its position in the graph when it has no name. Nodes detached by an earlier rewrite in the same sweep
    are skipped.
    """

    op_types: ClassVar[tuple[str, ...]]

    @abstractmethod
    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        """Rewrite around ``node``, or raise :class:`Refused` saying why it cannot."""

    def matches(self, node: gs.Node) -> bool:
        """Whether ``node`` (already of one of ``op_types``) is a candidate at all; non-candidates are
        skipped without a refusal, so ``--explain`` lists only nodes the pass could have rewritten."""
        return True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        for index, node in enumerate(list(graph.nodes)):
            if node.op not in self.op_types or not node.outputs or not self.matches(node):
                continue
            try:
                returned = self.rewrite(graph, node, ctx)
            except Refused as refused:
                result.refusals.append(Refusal.of(self.name, node, refused, index))
                continue
            if returned is not None:
                raise TypeError(f"pass {self.name!r}: rewrite() returned {returned!r}; it must return None when it "
                                "rewrote and raise Refused(reason) when it did not")
            result.rewrites += 1
        result.modified = result.rewrites > 0
        if result.modified:
            graph.cleanup(remove_unused_graph_inputs=False)
        return result


PASSES: dict[str, type[GraphPass]] = {}


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    """Add a pass to the registry under its stable snake_case name."""
    if not _SNAKE_CASE.match(cls.name):
        raise ValueError(f"pass name {cls.name!r} is not snake_case")
    if "\n" in cls.description.strip() or not cls.description.strip():
        raise ValueError(f"pass {cls.name!r} needs a one-line description")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    PASSES[cls.name] = cls
    return cls


class NoopRemovalPass(NodeRewritePass):
    """Removes nodes whose output always equals their first input (same values, dtype and shape); a subclass
    says, by raising :class:`Refused` from :meth:`check_noop`, when that is not proven."""

    requires = frozenset({SHAPES})
    preserves_shapes = True

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        self.check_noop(node)
        bypass(graph, node, node.inputs[0], node.outputs[0])

    @abstractmethod
    def check_noop(self, node: gs.Node) -> None:
        """Return when ``node`` provably copies its first input, else raise Refused."""

