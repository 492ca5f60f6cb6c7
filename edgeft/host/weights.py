"""Host stage: write ``weights.safetensors`` tensor by tensor (no second copy of the model in memory).

safetensors' own ``save_file`` turns every tensor into a bytes object before writing, which holds
a second full copy of the weights; here the header is computed first and each array's buffer is
written as is. The file is standard safetensors (contiguous data, 8-byte aligned header).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}


def write_safetensors(
    path: Path, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]], produce: Callable[[str], np.ndarray]
) -> dict[str, tuple[int, int]]:
    """Write tensors ``specs`` = [(key, shape, dtype)] to ``path``, asking ``produce(key)`` for each
    array only when its turn comes, in the order given (so a caller can quantize or convert one
    tensor at a time). Tensors whose size is not a multiple of 8 bytes move to the end so every
    other tensor stays 8-byte aligned in the file. Returns {key: (absolute offset, length)} for
    ONNX external data."""
    specs = list(specs)
    nbytes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for _, shape, dtype in specs]
    specs = [s for s, n in zip(specs, nbytes, strict=True) if n % 8 == 0] + [
        s for s, n in zip(specs, nbytes, strict=True) if n % 8
    ]
    header, offset = {}, 0
    for key, shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": DTYPES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned
    start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape, dtype in specs:
            arr = np.ascontiguousarray(produce(key))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(
                    f"{key}: produced {arr.dtype}{list(arr.shape)}, declared {np.dtype(dtype)}{list(shape)}"
                )
            f.write(memoryview(arr).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return {
        key: (start + h["data_offsets"][0], h["data_offsets"][1] - h["data_offsets"][0]) for key, h in header.items()
    }
