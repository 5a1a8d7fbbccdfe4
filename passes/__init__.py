"""The exact graph passes, one per module (installed as ``onnxmerge.passes``).

Importing this package registers every pass; ``DEFAULT_PIPELINE`` is the order ``onnxmerge fold`` runs
them in, round after round, until none changes the graph.
"""

from onnxmerge.passes import (  # noqa: F401  (imported to register the passes)
    cleanup,
    constant_reshape_target,
    constant_to_initializer,
    eliminate_common_subexpressions,
    eliminate_identity,
    eliminate_noop_cast,
    eliminate_noop_expand,
    eliminate_noop_reshape,
    eliminate_noop_slice,
    eliminate_noop_transpose,
    eliminate_unsqueeze_squeeze,
    explicit_pads,
    fold_affine,
    fold_batchnorm,
    fold_constants,
    fold_pad,
    infer_shapes,
    merge_conv_chain,
    reparam_branches,
)

DEFAULT_PIPELINE = [
    "fold_constants",
    "constant_to_initializer",
    "eliminate_identity",
    "infer_shapes",
    "eliminate_noop_reshape",
    "eliminate_noop_transpose",
    "eliminate_noop_cast",
    "eliminate_noop_slice",
    "eliminate_noop_expand",
    "eliminate_unsqueeze_squeeze",
    "eliminate_common_subexpressions",
    "constant_reshape_target",
    "explicit_pads",
    "fold_batchnorm",
    "fold_affine",
    "fold_pad",
    "reparam_branches",
    "merge_conv_chain",
    "cleanup",
]
