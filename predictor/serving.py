"""ONNX graphs and onnxruntime sessions for routers: what a saved router runs on.

Every estimator exports ONE graph with input "X" float32 (n, F) and output "P" float32 (n, S),
the probability of a correct answer at each scale, so loading needs no estimator code and no
pickle. The router folder holds `router.json` (scales, feature spec, policy, knob, estimator
parameters, the ONNX file's sha256) and `model.onnx`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "INPUT",
    "OUTPUT",
    "OPSET",
    "RouterFileError",
    "OnnxProbabilityModel",
    "default_providers",
    "linear_sigmoid_graph",
    "stack_binary_graphs",
    "finalize_graph",
    "sha256_file",
]

INPUT, OUTPUT, OPSET = "X", "P", 15


class RouterFileError(ValueError):
    """A router folder file is missing or malformed; the message names the file."""


def _io(name: str, width: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", width])


def finalize_graph(model: onnx.ModelProto, width: int, n_scales: int) -> onnx.ModelProto:
    """Name the batch dim symbolically (onnxruntime warns on every batch otherwise) and check."""
    g = model.graph
    del g.input[:]
    g.input.append(_io(INPUT, width))
    del g.output[:]
    g.output.append(_io(OUTPUT, n_scales))
    model.producer_name = "adaptive-m3.predictor"
    onnx.checker.check_model(model)
    return model


def _make_model(graph: onnx.GraphProto, opsets: dict[str, int]) -> onnx.ModelProto:
    """Oldest IR version that supports the opsets: onnx writes its newest by default, which a
    released onnxruntime may not read yet."""
    ids = [helper.make_opsetid(d, v) for d, v in sorted(opsets.items())]
    return helper.make_model(
        graph, opset_imports=ids, ir_version=helper.find_min_ir_version_for(ids)
    )


def linear_sigmoid_graph(
    mean: np.ndarray, std: np.ndarray, W: np.ndarray, b: np.ndarray
) -> onnx.ModelProto:
    """P = sigmoid(((X - mean) / std) @ W + b): per-scale logistic regressions in one graph."""
    inits = [
        numpy_helper.from_array(np.asarray(mean, np.float32), "mean"),
        numpy_helper.from_array(np.asarray(std, np.float32), "std"),
        numpy_helper.from_array(np.asarray(W, np.float32), "W"),
        numpy_helper.from_array(np.asarray(b, np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Sub", [INPUT, "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["z"]),
        helper.make_node("MatMul", ["z", "W"], ["zw"]),
        helper.make_node("Add", ["zw", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT]),
    ]
    width, S = np.shape(W)
    graph = helper.make_graph(nodes, "logreg_router", [_io(INPUT, width)], [_io(OUTPUT, S)], inits)
    return finalize_graph(_make_model(graph, {"": OPSET}), width, S)


def stack_binary_graphs(
    parts: Sequence[onnx.ModelProto | float], width: int, prob_output: str = "probabilities"
) -> onnx.ModelProto:
    """One graph from S binary classifiers (column 1 of each `prob_output`) or constants.

    A float part stands for a scale whose training labels were all equal: its probability is
    that constant for every row.
    """
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = [
        numpy_helper.from_array(np.array([1], np.int64), "col1"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    opsets: dict[str, int] = {"": OPSET}
    columns = []
    need_shape = any(not isinstance(p, onnx.ModelProto) for p in parts)
    if need_shape:
        nodes += [
            helper.make_node("Shape", [INPUT], ["x_shape"]),
            helper.make_node("Slice", ["x_shape", "zero", "one"], ["n_rows"]),
            helper.make_node("Concat", ["n_rows", "one"], ["col_shape"], axis=0),
        ]
    for s, part in enumerate(parts):
        col = f"p{s}"
        if isinstance(part, onnx.ModelProto):
            prefixed = onnx.compose.add_prefix(part, prefix=f"s{s}_")
            inner_in = prefixed.graph.input[0].name
            nodes.append(helper.make_node("Identity", [INPUT], [inner_in]))
            nodes += list(prefixed.graph.node)
            inits += list(prefixed.graph.initializer)
            nodes.append(helper.make_node("Gather", [f"s{s}_{prob_output}", "col1"], [col], axis=1))
            for op in part.opset_import:
                if op.domain not in ("", "ai.onnx"):
                    opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
        else:
            value = helper.make_tensor(f"v{s}", TensorProto.FLOAT, [1], [float(part)])
            nodes.append(helper.make_node("ConstantOfShape", ["col_shape"], [col], value=value))
        columns.append(col)
    nodes.append(helper.make_node("Concat", columns, [OUTPUT], axis=1))
    graph = helper.make_graph(
        nodes, "stacked_router", [_io(INPUT, width)], [_io(OUTPUT, len(parts))], inits
    )
    return finalize_graph(_make_model(graph, opsets), width, len(parts))


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it and a GPU is visible, else CPU only."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and _gpu_visible():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _gpu_visible() -> bool:
    # onnxruntime-gpu lists CUDA even without a GPU and then logs an error per session.
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _dims(v: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param
        for d in v.type.tensor_type.shape.dim
    ]


class OnnxProbabilityModel:
    """predict_proba through an onnxruntime session; checks the graph's I/O before use."""

    def __init__(
        self,
        path: Path,
        width: int,
        n_scales: int,
        providers: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise RouterFileError(f"{path}: ONNX model file is missing")
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
        except Exception as exc:  # onnx raises several unrelated types for a broken file
            raise RouterFileError(f"{path}: not a valid ONNX model ({exc})") from exc
        ins, outs = list(model.graph.input), list(model.graph.output)
        if [v.name for v in ins] != [INPUT] or OUTPUT not in [v.name for v in outs]:
            raise RouterFileError(
                f"{path}: expected input {INPUT!r} and output {OUTPUT!r}, found inputs "
                f"{[v.name for v in ins]} and outputs {[v.name for v in outs]}"
            )
        in_dims = _dims(ins[0])
        out_dims = _dims(next(v for v in outs if v.name == OUTPUT))
        if len(in_dims) != 2 or in_dims[1] != width:
            raise RouterFileError(f"{path}: input shape {in_dims}, router.json says width {width}")
        if len(out_dims) != 2 or out_dims[1] != n_scales:
            raise RouterFileError(
                f"{path}: output shape {out_dims}, router.json lists {n_scales} scales"
            )
        self.model_bytes = model.SerializeToString()
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                self.model_bytes,
                sess_options=opts,
                providers=list(providers) if providers else default_providers(),
            )
        except Exception as exc:
            raise RouterFileError(f"{path}: onnxruntime cannot load it ({exc})") from exc
        self.path = path

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        return self.session.run([OUTPUT], {INPUT: X})[0].astype(np.float64)
