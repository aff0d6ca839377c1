"""ONNX classifier → an equivalent torch module, so a bring-your-own model can take the litert-torch int8 path.

A small converter of our own rather than onnx2torch: onnx2torch imports torchvision at import time, and the
torchvision wheel that pip resolves next to the pinned CPU torch fails to load its operators here. The ops
covered are what image classifiers from common exporters use (Conv with BatchNorm folded in, the ReLU family,
HardSwish/HardSigmoid, element-wise arithmetic, pooling, Flatten/Reshape with shapes computed from `Shape`,
Gemm/MatMul, Softmax); anything else is refused up front with the op's name.

The module runs the graph's nodes in order as plain torch functions (`F.conv2d`, `F.linear`, `torch.add`, …)
with the weights as parameters, which is what torch.export and the PT2E quantizer expect. Shape arithmetic
(`Shape` → `Slice`/`Gather`/`Concat` → `Reshape`) runs on Python ints, so a dynamic batch stays symbolic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecv.tools.errors import ExportError

if TYPE_CHECKING:
    import onnx
    import torch

log = logging.getLogger(__name__)

SUPPORTED_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "Conv", "Div", "Dropout",
    "Flatten", "Gather", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity",
    "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad", "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid", "Slice",
    "Softmax", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
})


@dataclass(frozen=True)
class Step:
    """One ONNX node to run: op type, input and output value names, and its attributes (Python values)."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    name: str


def onnx_to_torch(model: onnx.ModelProto | Path | str) -> torch.nn.Module:
    """An eval-mode torch module computing the same function as the ONNX classifier `model` (one input).

    Raises ExportError naming every unsupported op, or what else stops the conversion.
    """
    import onnx

    proto = onnx.load(str(model)) if isinstance(model, str | Path) else model
    default_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = proto.graph
    unsupported = sorted({n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")
                          or n.op_type not in SUPPORTED_OPS})
    if unsupported:
        raise ExportError(f"The ONNX → PyTorch converter does not support op(s) {', '.join(unsupported)}; "
                          "the int8 TFLite artifact cannot be built for this model (ship the ONNX artifacts only)")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    names = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in names]
    if len(inputs) != 1 or len(graph.output) < 1:
        raise ExportError(f"The model has {len(inputs)} inputs and {len(graph.output)} outputs; the converter "
                          "needs one image input and a classifier output")
    steps = [Step(n.op_type, tuple(n.input), tuple(n.output),
                  {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}, n.name or n.op_type)
             for n in graph.node]
    for st in steps:  # tensors stored as attributes (Constant) become numpy values
        for key, value in list(st.attrs.items()):
            if isinstance(value, onnx.TensorProto):
                st.attrs[key] = onnx.numpy_helper.to_array(value)
    steps = _fold_batchnorm(steps, inits)
    module: torch.nn.Module = _module_class()(steps, inits, inputs[0], graph.output[0].name, default_opset)
    return module


def _fold_batchnorm(steps: list[Step], inits: dict[str, np.ndarray]) -> list[Step]:
    """Conv → BatchNormalization (inference mode, the conv's only consumer) becomes one Conv with new weights:
    what the PT2E quantizer and LiteRT see for a torch model after fusion."""
    consumers: dict[str, int] = {}
    for st in steps:
        for name in st.inputs:
            consumers[name] = consumers.get(name, 0) + 1
    producer = {out: i for i, st in enumerate(steps) for out in st.outputs}
    drop: set[int] = set()
    out = list(steps)
    for i, st in enumerate(steps):
        if st.op != "BatchNormalization" or st.inputs[0] not in producer:
            continue
        j = producer[st.inputs[0]]
        conv = out[j]
        if conv.op != "Conv" or consumers.get(st.inputs[0], 0) != 1 or conv.inputs[1] not in inits \
                or not all(name in inits for name in st.inputs[1:5]) or len(st.outputs) != 1:
            continue
        gamma, beta, mean, var = (inits[name].astype(np.float64) for name in st.inputs[1:5])
        eps = float(st.attrs.get("epsilon", 1e-5))
        w = inits[conv.inputs[1]].astype(np.float64)
        b = inits[conv.inputs[2]].astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2] else 0.0
        k = gamma / np.sqrt(var + eps)
        w_name, b_name = f"{conv.name}.folded_weight", f"{conv.name}.folded_bias"
        inits[w_name] = (w * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        inits[b_name] = ((b - mean) * k + beta).astype(np.float32)
        out[j] = Step("Conv", (conv.inputs[0], w_name, b_name), st.outputs, conv.attrs, conv.name)
        drop.add(i)
    return [st for i, st in enumerate(out) if i not in drop]


def _param_key(name: str, index: int) -> str:
    """A parameter attribute name for an ONNX tensor name (which may hold dots, slashes, colons)."""
    return f"p{index}_" + "".join(c if c.isalnum() else "_" for c in name)[:60]


class _ShapeValue(list):  # type: ignore[type-arg]
    """A 1-D integer tensor known as Python (sym)ints: the output of `Shape` and the arithmetic on it."""


def _as_ints(value: Any) -> list[Any]:
    if isinstance(value, _ShapeValue):
        return list(value)
    return [int(v) for v in np.asarray(value).reshape(-1)]


_MODULE_CLASS: type | None = None


def _module_class() -> type:
    global _MODULE_CLASS
    if _MODULE_CLASS is not None:
        return _MODULE_CLASS
    import torch
    import torch.nn.functional as F

    class GraphModule(torch.nn.Module):
        """Runs converted ONNX steps in order; float initializers are parameters, integer ones stay constants."""

        def __init__(self, steps: list[Step], inits: dict[str, np.ndarray], input_name: str, output_name: str,
                     opset: int) -> None:
            super().__init__()
            self.steps = steps
            self.input_name, self.output_name, self.opset = input_name, output_name, opset
            self.param_of: dict[str, str] = {}
            self.consts: dict[str, np.ndarray] = {}
            used = {name for st in steps for name in st.inputs}
            for i, (name, value) in enumerate(inits.items()):
                if name not in used:
                    continue
                if value.dtype.kind == "f" and value.ndim > 0:
                    key = _param_key(name, i)
                    self.register_parameter(key, torch.nn.Parameter(
                        torch.from_numpy(np.array(value, dtype=np.float32)), requires_grad=False))
                    self.param_of[name] = key
                else:
                    self.consts[name] = value
            self.eval()

        def _get(self, env: dict[str, Any], name: str) -> Any:
            if name in env:
                return env[name]
            if name in self.param_of:
                return getattr(self, self.param_of[name])
            if name in self.consts:
                return self.consts[name]
            raise ExportError(f"ONNX value {name!r} is used before it is computed")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            env: dict[str, Any] = {self.input_name: x, "": None}
            for st in self.steps:
                args = [self._get(env, n) if n else None for n in st.inputs]
                result = _run(st, args, self.opset, torch, F)
                if isinstance(result, tuple):
                    for name, value in zip(st.outputs, result, strict=False):
                        env[name] = value
                else:
                    env[st.outputs[0]] = result
            return env[self.output_name]  # type: ignore[no-any-return]

    _MODULE_CLASS = GraphModule
    return GraphModule


def _tensor(value: Any, torch: Any) -> Any:
    """A float constant (numpy scalar or array) as a tensor; tensors pass through."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(np.asarray(value, dtype=np.float32))


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    arr = np.asarray(value)
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _pads(attrs: dict[str, Any], ndim: int) -> tuple[list[int], bool]:
    """ONNX pads [b1, b2, …, e1, e2, …] → (torch symmetric padding, or asymmetric F.pad list; whether asym)."""
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ExportError(f"auto_pad={attrs['auto_pad']!r} is not supported by the converter; re-export the "
                          "model with explicit pads")
    pads = list(attrs.get("pads", [0] * (2 * ndim)))
    begin, end = pads[:ndim], pads[ndim:]
    if begin == end:
        return begin, False
    flat: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        flat += [b, e]
    return flat, True


def _run(st: Step, a: list[Any], opset: int, torch: Any, F: Any) -> Any:
    op, at = st.op, st.attrs
    if op in ("Identity", "Dropout"):
        return a[0]
    if op == "Constant":
        if "value" not in at:
            raise ExportError(f"Constant node {st.name} has no tensor 'value'; the converter supports only that")
        value = np.asarray(at["value"])
        return value if value.dtype.kind in "iub" else _tensor(value, torch)
    if op == "Cast":
        return a[0]  # shape and float arithmetic only: the classifier graph's casts are no-ops here
    if op == "Conv":
        w = a[1]
        nd = w.dim() - 2
        if nd != 2:
            raise ExportError(f"Conv {st.name} is {nd}-D; the converter supports 2-D convolutions")
        pads, asym = _pads(at, nd)
        x = F.pad(a[0], pads) if asym else a[0]
        return F.conv2d(x, w, a[2] if len(a) > 2 else None, stride=list(at.get("strides", [1, 1])),
                        padding=[0, 0] if asym else pads, dilation=list(at.get("dilations", [1, 1])),
                        groups=int(at.get("group", 1)))
    if op == "BatchNormalization":
        return F.batch_norm(a[0], a[3], a[4], a[1], a[2], False, 0.0, float(at.get("epsilon", 1e-5)))
    if op == "Relu":
        return F.relu(a[0])
    if op == "LeakyRelu":
        return F.leaky_relu(a[0], float(at.get("alpha", 0.01)))
    if op == "Sigmoid":
        return torch.sigmoid(a[0])
    if op == "Tanh":
        return torch.tanh(a[0])
    if op == "HardSwish":
        return F.hardswish(a[0])
    if op == "HardSigmoid":
        alpha, beta = float(at.get("alpha", 0.2)), float(at.get("beta", 0.5))
        if abs(alpha - 1 / 6) < 1e-6 and abs(beta - 0.5) < 1e-6:
            return F.hardsigmoid(a[0])
        return torch.clamp(a[0] * alpha + beta, 0.0, 1.0)
    if op == "Clip":
        lo = _scalar(a[1]) if len(a) > 1 and a[1] is not None else at.get("min")
        hi = _scalar(a[2]) if len(a) > 2 and a[2] is not None else at.get("max")
        if lo == 0.0 and hi == 6.0:
            return F.relu6(a[0])
        if lo == 0.0 and hi is None:
            return F.relu(a[0])
        if lo is not None and hi is not None:
            return F.hardtanh(a[0], float(lo), float(hi))
        return torch.clamp(a[0], lo, hi)
    if op in ("Add", "Sub", "Mul", "Div"):
        x, y = a
        if isinstance(x, _ShapeValue) or isinstance(y, _ShapeValue) or (
                isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            return _shape_arith(op, x, y)
        x, y = _tensor(x, torch), _tensor(y, torch)
        return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](x, y)
    if op == "GlobalAveragePool":
        return F.adaptive_avg_pool2d(a[0], 1)
    if op == "GlobalMaxPool":
        return F.adaptive_max_pool2d(a[0], 1)
    if op in ("AveragePool", "MaxPool"):
        kernel = list(at["kernel_shape"])
        pads, asym = _pads(at, len(kernel))
        x = F.pad(a[0], pads) if asym else a[0]
        strides = list(at.get("strides", kernel))
        ceil = bool(at.get("ceil_mode", 0))
        if op == "MaxPool":
            if len(st.outputs) > 1 and st.outputs[1]:
                raise ExportError(f"MaxPool {st.name} returns indices; the converter does not support that")
            return F.max_pool2d(x, kernel, strides, [0, 0] if asym else pads, list(at.get("dilations", [1, 1])),
                                ceil_mode=ceil)
        return F.avg_pool2d(x, kernel, strides, [0, 0] if asym else pads, ceil_mode=ceil,
                            count_include_pad=bool(at.get("count_include_pad", 0)))
    if op == "ReduceMean":
        axes = at.get("axes")
        if axes is None and len(a) > 1 and a[1] is not None:
            axes = _as_ints(a[1])
        keep = bool(at.get("keepdims", 1))
        if axes is None:
            return torch.mean(a[0]) if not keep else torch.mean(a[0], dim=list(range(a[0].dim())), keepdim=True)
        axes = [int(v) for v in axes]
        if sorted(v % a[0].dim() for v in axes) == [2, 3] and a[0].dim() == 4:
            pooled = F.adaptive_avg_pool2d(a[0], 1)  # what the quantizers know as a pattern
            return pooled if keep else torch.flatten(pooled, 1)
        return torch.mean(a[0], dim=axes, keepdim=keep)
    if op == "Flatten":
        axis = int(at.get("axis", 1))
        if axis == 1:
            return torch.flatten(a[0], 1)
        return torch.reshape(a[0], (int(np.prod(a[0].shape[:axis])) if axis else 1, -1))
    if op == "Reshape":
        target = _as_ints(a[1])
        if not at.get("allowzero", 0):
            target = [a[0].shape[i] if v == 0 else v for i, v in enumerate(target)]
        return torch.reshape(a[0], target)
    if op == "Squeeze":
        sq_axes: list[int] | None = list(at["axes"]) if "axes" in at else (
            _as_ints(a[1]) if len(a) > 1 and a[1] is not None else None)
        if isinstance(a[0], np.ndarray):
            return np.squeeze(a[0], axis=tuple(sq_axes) if sq_axes is not None else None)
        x = a[0]
        for ax in sorted((int(v) % x.dim() for v in sq_axes), reverse=True) if sq_axes is not None else []:
            x = torch.squeeze(x, ax)
        return x if sq_axes is not None else torch.squeeze(x)
    if op == "Unsqueeze":
        axes = list(at["axes"]) if "axes" in at else _as_ints(a[1])
        if isinstance(a[0], _ShapeValue | np.ndarray | int):
            return _ShapeValue(_as_ints(a[0]))
        x = a[0]
        for ax in sorted(int(v) for v in axes):
            x = torch.unsqueeze(x, ax)
        return x
    if op == "Transpose":
        perm = at.get("perm")
        return a[0].permute(*[int(p) for p in perm]) if perm is not None else a[0].permute(
            *reversed(range(a[0].dim())))
    if op == "Shape":
        dims = list(a[0].shape)
        start, end = int(at.get("start", 0)), at.get("end")
        return _ShapeValue(dims[start:int(end) if end is not None else None])
    if op == "Gather":
        if isinstance(a[0], _ShapeValue | np.ndarray) and int(at.get("axis", 0)) == 0:
            vals = _as_ints(a[0])
            idx = np.asarray(a[1])
            picked = [vals[int(i)] for i in idx.reshape(-1)]
            return _ShapeValue(picked)  # a scalar index gives a 0-d value: kept 1-D, Concat flattens anyway
        raise ExportError(f"Gather {st.name} on a tensor is not supported by the converter (only on shapes)")
    if op == "Slice":
        if isinstance(a[0], _ShapeValue | np.ndarray):
            vals = _as_ints(a[0])
            starts, ends = _as_ints(a[1]), _as_ints(a[2])
            steps = _as_ints(a[4]) if len(a) > 4 and a[4] is not None else [1]
            big = 2 ** 62
            return _ShapeValue(vals[starts[0]:None if ends[0] >= big else ends[0]:steps[0]])
        return _slice_tensor(st, a, opset)
    if op == "Concat":
        if all(isinstance(v, _ShapeValue | np.ndarray) for v in a):
            return _ShapeValue([v for part in a for v in _as_ints(part)])
        return torch.cat([_tensor(v, torch) for v in a], dim=int(at["axis"]))
    if op == "Pad":
        mode = at.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads_list = at["pads"] if "pads" in at else _as_ints(a[1])
        fill = float(at.get("value", 0.0)) if "value" in at else (_scalar(a[2]) if len(a) > 2 else 0.0) or 0.0
        nd = len(pads_list) // 2
        flat: list[int] = []
        for b, e in zip(reversed(pads_list[:nd]), reversed(pads_list[nd:]), strict=True):
            flat += [int(b), int(e)]
        while flat and flat[-1] == 0 and flat[-2] == 0:
            flat = flat[:-2]
        return F.pad(a[0], flat, mode=mode, value=fill) if mode == "constant" else F.pad(a[0], flat, mode=mode)
    if op == "Gemm":
        x, w = a[0], a[1]
        alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
        if at.get("transA", 0) or alpha != 1.0 or beta != 1.0:
            raise ExportError(f"Gemm {st.name} with transA/alpha/beta is not supported by the converter")
        if not at.get("transB", 0):
            w = w.t()
        bias = a[2] if len(a) > 2 else None
        return F.linear(x, w, bias)
    if op == "MatMul":
        x, w = a
        if isinstance(w, torch.nn.Parameter) and w.dim() == 2:
            return F.linear(x, w.t())
        return torch.matmul(x, _tensor(w, torch))
    if op == "Softmax":
        axis = int(at.get("axis", -1 if opset >= 13 else 1))
        if opset < 13 and axis != -1 and axis != a[0].dim() - 1:
            raise ExportError(f"Softmax {st.name} at opset {opset} flattens from axis {axis}; only the last axis "
                              "is supported")
        return torch.softmax(a[0], dim=axis)
    raise ExportError(f"Op {op} ({st.name}) is not supported by the converter")


def _shape_arith(op: str, x: Any, y: Any) -> _ShapeValue:
    fn: dict[str, Callable[[Any, Any], Any]] = {
        "Add": lambda p, q: p + q, "Sub": lambda p, q: p - q, "Mul": lambda p, q: p * q,
        "Div": lambda p, q: p // q}
    xs, ys = _as_ints(x), _as_ints(y)
    if len(xs) == 1:
        xs = xs * len(ys)
    if len(ys) == 1:
        ys = ys * len(xs)
    return _ShapeValue([fn[op](p, q) for p, q in zip(xs, ys, strict=True)])


def _slice_tensor(st: Step, a: Sequence[Any], opset: int) -> Any:
    x = a[0]
    if opset < 10 or "starts" in st.attrs:
        starts, ends = list(st.attrs["starts"]), list(st.attrs["ends"])
        axes = list(st.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _as_ints(a[1]), _as_ints(a[2])
        axes = _as_ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
        steps = _as_ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for s, e, ax, step in zip(starts, ends, axes, steps, strict=True):
        index[int(ax)] = slice(s, None if e >= 2 ** 62 else e, step)
    return x[tuple(index)]
