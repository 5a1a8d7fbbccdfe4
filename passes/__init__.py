"""The exact graph passes, one per module (installed as ``onnxmerge.passes``).

Importing this package registers every pass; ``DEFAULT_PIPELINE`` is the order ``onnxmerge fold`` runs
them in, round after round, until none changes the graph.
"""

from onnxmerge.passes import (  # noqa: F401  (imported to register the passes)
    cleanup,
    constant_to_initializer,
    eliminate_identity,
    explicit_pads,
    fold_affine,
    fold_batchnorm,
    fold_pad,
    infer_shapes,
    merge_conv_chain,
    reparam_branches,
)

DEFAULT_PIPELINE = [
    "constant_to_initializer",
    "eliminate_identity",
    "infer_shapes",
    "explicit_pads",
    "fold_batchnorm",
    "fold_affine",
    "fold_pad",
    "reparam_branches",
    "merge_conv_chain",
    "cleanup",
]
