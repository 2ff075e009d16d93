"""numpy arrays <-> ``histoxplain.v1.RawArray`` (shape + dtype + little-endian C-order bytes)."""

from __future__ import annotations

import numpy as np

from histoxplain_client._proto.histoxplain.v1 import types_pb2

__all__ = ["decode_array", "encode_array"]

_NUMPY_DTYPES: dict[int, np.dtype] = {
    types_pb2.ARRAY_DTYPE_FLOAT16: np.dtype("<f2"),
    types_pb2.ARRAY_DTYPE_FLOAT32: np.dtype("<f4"),
    types_pb2.ARRAY_DTYPE_UINT8: np.dtype("u1"),
}


def encode_array(array: np.ndarray, dtype: int = types_pb2.ARRAY_DTYPE_FLOAT32) -> types_pb2.RawArray:
    """``array`` cast to ``dtype`` (an ``ARRAY_DTYPE_*`` value) as a RawArray message.

    Float values outside the float16 range would become inf; heatmaps are in [0, 1].
    """
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"unsupported array dtype {dtype}; use one of {sorted(_NUMPY_DTYPES)}")
    values = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[dtype])
    return types_pb2.RawArray(shape=list(values.shape), dtype=dtype, data=values.tobytes())


def decode_array(message: types_pb2.RawArray, as_dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A RawArray as a writable numpy array of ``as_dtype`` (float16 maps are widened to float32).

    Raises ValueError when the dtype is unknown or the byte count does not match the shape.
    """
    wire_dtype = _NUMPY_DTYPES.get(message.dtype)
    if wire_dtype is None:
        raise ValueError(f"RawArray has unsupported dtype {message.dtype}")
    shape = tuple(int(size) for size in message.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * wire_dtype.itemsize
    if len(message.data) != expected:
        raise ValueError(
            f"RawArray of shape {shape} and dtype {wire_dtype.name} needs {expected} bytes, "
            f"got {len(message.data)}"
        )
    values = np.frombuffer(message.data, dtype=wire_dtype).reshape(shape)
    return values.astype(as_dtype, copy=True)
