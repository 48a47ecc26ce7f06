"""Tinker's protobuf `Tensor` -> numpy: dense or sparse CSR, any of the SDK's dtypes, its declared
shape bounded before anything is allocated, and its values checked (token ids, finite floats).
"""

from __future__ import annotations

import math

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from .errors import WireError, where

# A loss_fn_inputs tensor holds one value per token: its declared shape may not hold more.
MAX_ELEMENTS = 256 * 1024

_DTYPE_NAMES = {
    pb.DTYPE_UNSPECIFIED: "unspecified",
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_INT64: "int64",
    pb.DTYPE_INT32: "int32",
    pb.DTYPE_BFLOAT16: "bfloat16",
}
# The numpy type each DType's bytes are read as (bfloat16: raw uint16, widened below).
_DTYPE_NUMPY: dict[pb.DType.ValueType, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
}


def decode_array(buf: bytes, dtype: pb.DType.ValueType, loc: tuple[str | int, ...], what: str) -> np.ndarray:
    """Little-endian bytes of a DType -> a 1-D numpy array (int64 or float32)."""
    np_dtype = _DTYPE_NUMPY.get(dtype)
    if np_dtype is None:
        raise WireError(
            f"{where(loc)} has dtype {_DTYPE_NAMES.get(dtype, dtype)}; expected int64, int32, float32 or bfloat16",
            loc,
        )
    if len(buf) % np_dtype.itemsize:
        raise WireError(
            f"{where(loc)}: {what} holds {len(buf)} bytes, not a whole number of {_DTYPE_NAMES[dtype]} values",
            loc,
        )
    arr = np.frombuffer(buf, dtype=np_dtype)
    if dtype == pb.DTYPE_BFLOAT16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if dtype == pb.DTYPE_INT32:
        return arr.astype(np.int64)
    return arr


def _index_array(buf: bytes, loc: tuple[str | int, ...], what: str) -> np.ndarray:
    if len(buf) % 8:
        raise WireError(f"{where(loc)}: sparse {what} is not a whole number of int64 values", loc)
    return np.frombuffer(buf, dtype="<i8")


def decode_dense(msg: pb.Tensor, loc: tuple[str | int, ...], max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """A Tensor -> a numpy array of its shape; sparse CSR is expanded with zeros. The declared
    shape is checked against `max_elements` first: a 177-byte CSR tensor may declare [3, 2^36]."""
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape):
        raise WireError(f"{where(loc)} has a negative dimension in shape {shape}", loc)
    if math.prod(shape) > max_elements:
        raise WireError(
            f"{where(loc)} declares shape {shape}, {math.prod(shape)} values; a loss_fn_inputs tensor "
            f"holds at most max_tokens_per_request ({max_elements})",
            loc,
        )
    which = msg.WhichOneof("encoding")
    if which == "sparse_csr":
        if len(shape) != 2:
            raise WireError(f"{where(loc)} is sparse CSR with shape {shape}; CSR needs a 2-D shape", loc)
        rows, cols = shape
        csr = msg.sparse_csr
        values = decode_array(csr.values, msg.dtype, loc, "values")
        crow = _index_array(csr.crow_indices, loc, "crow_indices")
        col = _index_array(csr.col_indices, loc, "col_indices")
        nnz = len(values)
        if (
            len(crow) != rows + 1
            or crow[0] != 0
            or crow[-1] != nnz
            or np.any(np.diff(crow) < 0)
            or len(col) != nnz
            or (nnz and (col.min() < 0 or col.max() >= cols))
        ):
            raise WireError(
                f"{where(loc)} is not a valid sparse CSR tensor of shape {shape} "
                f"({len(crow)} crow_indices, {len(col)} col_indices, {nnz} values)",
                loc,
            )
        dense = np.zeros((rows, cols), dtype=values.dtype)
        row_of = np.repeat(np.arange(rows), np.diff(crow))
        dense[row_of, col] = values
        return dense
    arr = decode_array(msg.dense, msg.dtype, loc, "dense data")
    if not shape:
        return arr
    if math.prod(shape) != arr.size:
        raise WireError(f"{where(loc)} has shape {shape} but {arr.size} values", loc)
    return arr.reshape(shape)


def decode_tensor(
    msg: pb.Tensor, loc: tuple[str | int, ...], max_elements: int = MAX_ELEMENTS, multi: bool = False
) -> np.ndarray:
    """A Tensor -> a 1-D numpy array, or with `multi` a 2-D [N, K] one (K >= 2). A 2-D tensor
    of shape [N, 1] counts as 1-D."""
    arr = decode_dense(msg, loc, max_elements)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2 and multi:
        return arr
    if arr.ndim > 1:
        takes = "[N] or [N, K]" if multi else "[N] (one value per input token)"
        raise WireError(f"{where(loc)} has shape {list(arr.shape)}; it must be {takes}", loc)
    return arr.reshape(-1)


def token_ids(arr: np.ndarray, loc: tuple[str | int, ...]) -> list[int]:
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise WireError(f"{where(loc)} must hold integer token ids", loc)
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise WireError(f"{where(loc)} holds a negative token id ({int(arr.min())})", loc)
    return arr.tolist()


def finite_floats(arr: np.ndarray, loc: tuple[str | int, ...]) -> list[float]:
    arr = arr.astype(np.float64)
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        at = tuple(int(i) for i in bad[0])
        index = "".join(f"[{i}]" for i in at)
        raise WireError(f"{where(loc)}{index} is {arr[at]}; only finite values are accepted", (*loc, *at))
    return arr.tolist()
