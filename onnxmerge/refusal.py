"""How a pass says "not this node, and why": helpers raise :class:`Refused`, passes record :class:`Refusal`.

Modelled on onnxscript's rewriter (a match fails with a reason) and onnx-ir's pass infrastructure. A helper
that cannot do what it was asked raises ``Refused(reason, nodes)``; the pass lets it propagate out of its
``rewrite``, and the pass framework turns it into one :class:`Refusal` record per refused candidate node.
Records are kept in a list, never keyed by node name: a node refused twice, or several unnamed nodes of
one op type, each keep their own record.

This module imports nothing of onnxmerge, so :mod:`onnxmerge.graph` can raise ``Refused`` without an import
cycle (:mod:`onnxmerge.pass_framework` imports graph and re-exports both names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


class Refused(Exception):
    """A rewrite (or a helper it called) left the graph alone.

    ``reason`` is the human-readable why; ``nodes`` are the names of the nodes involved (empty names, i.e.
    unnamed nodes, are left out; may be empty). Raise it before changing the graph: a refused rewrite must
    leave the graph as it found it.
    """

    def __init__(self, reason: str, nodes: Iterable[str] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.nodes: tuple[str, ...] = _names(nodes)

    def __str__(self) -> str:
        return self.reason

    def within(self, context: str, nodes: Iterable[str] = ()) -> Refused:
        """This refusal as part of a larger one: reason ``"<context>: <reason>"``, ``nodes`` added first.

        ``raise exc.within(f"cannot read Conv '{conv.name}'", [conv.name]) from exc``.
        """
        return Refused(f"{context}: {self.reason}" if context else self.reason, (*nodes, *self.nodes))


@dataclass(frozen=True)
class Refusal:
    """One candidate node a pass left alone, and why.

    ``node`` is the node's name ("" when it has none), ``index`` its position in the graph's node list when
    the pass looked at it (None when unknown), so unnamed nodes stay told apart in :attr:`label`.
    ``nodes`` are the names of the nodes involved, as the :class:`Refused` that caused it named them.
    """

    pass_name: str
    node: str
    op_type: str
    reason: str
    nodes: tuple[str, ...] = ()
    index: int | None = None

    @classmethod
    def of(cls, pass_name: str, node: Any, refused: Refused, index: int | None = None) -> Refusal:
        """The record of ``node`` (a graphsurgeon node, or anything with ``name`` and ``op``) being refused."""
        return cls(pass_name=pass_name, node=node.name or "", op_type=node.op, reason=refused.reason,
                   nodes=refused.nodes, index=index)

    @property
    def label(self) -> str:
        """The node's name, or ``<unnamed Op #index>`` for a node without one."""
        if self.node:
            return self.node
        return f"<unnamed {self.op_type}>" if self.index is None else f"<unnamed {self.op_type} #{self.index}>"

    def to_dict(self) -> dict:
        return {"pass": self.pass_name, "node": self.node, "label": self.label, "op_type": self.op_type,
                "reason": self.reason, "nodes": list(self.nodes), "index": self.index}


def _names(nodes: Iterable[str]) -> tuple[str, ...]:
    """Non-empty names, first occurrence kept, order kept."""
    seen: dict[str, None] = {}
    for name in nodes:
        if name:
            seen.setdefault(str(name), None)
    return tuple(seen)
