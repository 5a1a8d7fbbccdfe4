"""Build a > 2 GB ONNX model with external data without ever holding its weights in memory at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

WIDTH = 4096
# Layer i's weight is the window of a shared random sequence starting STRIDE * i elements in: every layer
# differs (rows shifted by a non-multiple of WIDTH) and none costs more than a view to make.
STRIDE = 7919


def build_large_model(folder: Path, layers: int = 33, seed: int = 0) -> tuple[Path, int]:
    """Conv → BatchNorm → Flatten → ``layers`` × (MatMul 4096×4096 → Relu), written as ``big.onnx`` plus
    ``big.onnx.data``; returns the path and the bytes of weights. The BatchNorm is there to be folded; the
    MatMul weights (64 MiB each) are what makes the model large. Weights are written one at a time, straight
    from views of one random sequence (a fresh normal sample per layer would take most of the build time)."""
    rng = np.random.default_rng(seed)
    path = folder / "big.onnx"
    data_name = "big.onnx.data"
    initializers, offset = [], 0
    with open(folder / data_name, "wb") as data:
        def external(name: str, array: np.ndarray) -> str:
            nonlocal offset
            array = np.ascontiguousarray(array)
            tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                 dims=array.shape, data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                tensor.external_data.add(key=key, value=value)
            data.write(memoryview(array).cast("B"))
            offset += array.nbytes
            initializers.append(tensor)
            return name

        conv_weight = rng.standard_normal((64, 16, 3, 3), np.float32) * np.float32(0.1)
        nodes = [helper.make_node("Conv", ["x", external("conv.w", conv_weight),
                                           external("conv.b", np.zeros(64, np.float32))], ["c"], pads=[1, 1, 1, 1]),
                 helper.make_node("BatchNormalization",
                                  ["c"] + [external(f"bn.{k}", v) for k, v in (
                                      ("scale", rng.uniform(0.5, 1.5, 64).astype(np.float32)),
                                      ("bias", rng.standard_normal(64).astype(np.float32)),
                                      ("mean", rng.standard_normal(64).astype(np.float32)),
                                      ("var", rng.uniform(0.5, 2, 64).astype(np.float32)))], ["b"]),
                 helper.make_node("Flatten", ["b"], ["h0"])]
        sequence = rng.standard_normal(WIDTH * WIDTH + STRIDE * layers, np.float32)
        sequence *= np.float32(1.5 / np.sqrt(WIDTH))
        for i in range(layers):
            weight = sequence[STRIDE * i:STRIDE * i + WIDTH * WIDTH].reshape(WIDTH, WIDTH)
            nodes += [helper.make_node("MatMul", [f"h{i}", external(f"w{i}", weight)], [f"m{i}"]),
                      helper.make_node("Relu", [f"m{i}"], [f"h{i + 1}"])]
        del sequence
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, [1, WIDTH])],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path, offset
