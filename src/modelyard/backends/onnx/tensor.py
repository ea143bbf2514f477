"""The ``tensor`` task: any ONNX graph over v2 ``/infer``, checked against the graph's own specs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from modelyard.core.errors import BackendError, BadRequestError
from modelyard.core.types import Tensor, TensorRequest, TensorResult, TensorSpec

__all__ = ["TensorTask", "numpy_dtype", "spec_of", "v2_datatype"]

_ORT_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}
_V2_TO_NUMPY: dict[str, Any] = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
    "BYTES": object,
}
Feeds = dict[str, npt.NDArray[Any]]


def v2_datatype(ort_type: str) -> str:
    """``tensor(float)`` -> ``FP32``; types v2 cannot carry keep their onnxruntime name."""
    return _ORT_TO_V2.get(ort_type, ort_type)


def numpy_dtype(ort_type: str) -> Any:
    return _V2_TO_NUMPY.get(v2_datatype(ort_type), np.float32)


def spec_of(arg: Any) -> TensorSpec:
    """An onnxruntime NodeArg as a v2 TensorSpec; symbolic or unknown axes become -1."""
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, v2_datatype(arg.type), shape)


def _shape_fits(shape: Sequence[int], spec: TensorSpec) -> bool:
    return len(shape) == len(spec.shape) and all(
        want in (-1, got) for got, want in zip(shape, spec.shape, strict=True)
    )


class TensorTask:
    """Validates v2 tensors against the graph and runs them; same-shaped requests share a run."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.inputs = {arg.name: spec_of(arg) for arg in session.get_inputs()}
        self.outputs = {arg.name: spec_of(arg) for arg in session.get_outputs()}
        # Concatenating on axis 0 is only sound when every input and output is batched there.
        self._batchable = all(
            spec.shape[:1] == (-1,) for spec in [*self.inputs.values(), *self.outputs.values()]
        )

    def run(self, batch: Sequence[TensorRequest]) -> list[TensorResult | Exception]:
        results: list[TensorResult | Exception | None] = [None] * len(batch)
        groups: dict[Any, list[tuple[int, Feeds, list[str]]]] = {}
        for i, request in enumerate(batch):
            try:
                feeds, names = self._feeds(request), self._output_names(request)
            except BadRequestError as exc:
                results[i] = exc
                continue
            groups.setdefault(self._group_key(feeds, names, i), []).append((i, feeds, names))
        for members in groups.values():
            for i, result in self._run_group(members):
                results[i] = result
        return [r if r is not None else BackendError("no result") for r in results]

    # -- validation ------------------------------------------------------------------------

    def _feeds(self, request: TensorRequest) -> Feeds:
        feeds: Feeds = {}
        for tensor in request.inputs:
            spec = self.inputs.get(tensor.name)
            if spec is None:
                known = ", ".join(self.inputs)
                raise BadRequestError(
                    f"unknown input tensor {tensor.name!r}; the model takes: {known}"
                )
            if tensor.name in feeds:
                raise BadRequestError(f"input tensor {tensor.name!r} is given twice")
            feeds[tensor.name] = self._array(tensor, spec)
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise BadRequestError(f"input tensor {missing[0]!r} is missing")
        return feeds

    @staticmethod
    def _array(tensor: Tensor, spec: TensorSpec) -> npt.NDArray[Any]:
        if tensor.datatype != spec.datatype:
            raise BadRequestError(
                f"input tensor {tensor.name!r} has datatype {tensor.datatype}, "
                f"expected {spec.datatype}"
            )
        if not _shape_fits(tensor.shape, spec):
            raise BadRequestError(
                f"input tensor {tensor.name!r} has shape {list(tensor.shape)}, "
                f"expected {list(spec.shape)} (-1: any size)"
            )
        data = tensor.data
        if len(data) != math.prod(tensor.shape):
            raise BadRequestError(
                f"input tensor {tensor.name!r}: shape {list(tensor.shape)} needs "
                f"{math.prod(tensor.shape)} elements, got {len(data)}"
            )
        if spec.datatype == "BYTES":
            # onnxruntime string tensors take str objects.
            data = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in data]
        try:
            return np.asarray(data, dtype=_V2_TO_NUMPY[spec.datatype]).reshape(tensor.shape)
        except (OverflowError, ValueError, TypeError) as exc:
            raise BadRequestError(f"input tensor {tensor.name!r}: {exc}") from None

    def _output_names(self, request: TensorRequest) -> list[str]:
        if not request.outputs:
            return list(self.outputs)
        unknown = [name for name in request.outputs if name not in self.outputs]
        if unknown:
            raise BadRequestError(f"unknown output tensor(s): {', '.join(unknown)}")
        return list(dict.fromkeys(request.outputs))

    # -- running ---------------------------------------------------------------------------

    def _group_key(self, feeds: Feeds, names: list[str], index: int) -> Any:
        rows = {arr.shape[0] if arr.ndim else -1 for arr in feeds.values()}
        if not self._batchable or len(rows) != 1:
            return ("alone", index)
        return (tuple(names), tuple((n, a.shape[1:]) for n, a in sorted(feeds.items())))

    def _run_group(
        self, members: list[tuple[int, Feeds, list[str]]]
    ) -> list[tuple[int, TensorResult | Exception]]:
        names = members[0][2]
        if len(members) > 1:
            feeds = {
                name: np.concatenate([m[1][name] for m in members], axis=0) for name in self.inputs
            }
            rows = [next(iter(m[1].values())).shape[0] for m in members]
            try:
                outputs = self._session_run(names, feeds)
            except Exception:  # noqa: BLE001 - let each request meet its own error alone
                outputs = None
            if outputs is not None and all(o.shape[:1] == (sum(rows),) for o in outputs):
                offsets = np.cumsum([0, *rows])
                return [
                    (m[0], self._result(names, [o[offsets[k] : offsets[k + 1]] for o in outputs]))
                    for k, m in enumerate(members)
                ]
        answered: list[tuple[int, TensorResult | Exception]] = []
        for index, feeds, wanted in members:
            try:
                answered.append((index, self._result(wanted, self._session_run(wanted, feeds))))
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the rest
                answered.append((index, exc))
        return answered

    def _session_run(self, names: list[str], feeds: Feeds) -> list[npt.NDArray[Any]]:
        from onnxruntime.capi.onnxruntime_pybind11_state import (
            InvalidArgument,
        )

        try:
            return list(self._session.run(names, feeds))
        except InvalidArgument as exc:
            raise BadRequestError(f"onnxruntime rejected the inputs: {exc}") from None
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"onnxruntime failed: {type(exc).__name__}: {exc}") from None

    def _result(self, names: list[str], arrays: list[npt.NDArray[Any]]) -> TensorResult:
        tensors = []
        for name, raw in zip(names, arrays, strict=True):
            array = np.asarray(raw)
            datatype = self.outputs[name].datatype
            data: Any
            if datatype == "BYTES":
                data = [x.encode() if isinstance(x, str) else bytes(x) for x in array.ravel()]
            else:
                data = np.ascontiguousarray(array).ravel()
            tensors.append(Tensor(name, datatype, tuple(int(d) for d in array.shape), data))
        return TensorResult(outputs=tensors)
