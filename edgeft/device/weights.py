"""The bundle's frozen weights, mapped once per process and shared by its graphs.

``weights.safetensors`` is memory-mapped read-only (file-backed pages: the kernel can drop them
under memory pressure and read them back) and every tensor is wrapped in a CPU OrtValue without a
copy. Sessions get them through ``SessionOptions.add_initializer``, so the training and eval graphs
read the same pages: measured on a 364 MB model, the eval session then adds 27 MB instead of a
second 391 MB copy (onnxruntime 1.19, 1.20 and 1.32 alike).
"""

from __future__ import annotations

import numpy as np

from edgeft.bundle import Bundle, read_safetensors_header
from edgeft.errors import EdgeftError

DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I32": np.int32, "I64": np.int64}


class BundleWeights:
    """Graph initializer name -> OrtValue over its bytes in weights.safetensors."""

    def __init__(self, bundle: Bundle):
        path = bundle.path(bundle.manifest["weights"])
        self.arrays = _memmap(path)  # kept alive as long as the OrtValues that wrap them
        self.values = {}
        from edgeft.device.session import onnxruntime

        ortvalue = onnxruntime().OrtValue.ortvalue_from_numpy
        for name, key in graph_keys(bundle).items():
            if key not in self.arrays:
                raise EdgeftError(f"{path}: tensor {key} ({name}) is missing")
            self.values[name] = ortvalue(self.arrays[key])


def graph_keys(bundle: Bundle) -> dict[str, str]:
    """Initializer name in the graphs -> weights.safetensors key, for every frozen tensor."""
    out = {}
    for p in bundle.frozen:
        q = p.get("quantized")
        if q is None:
            out[p["onnx"]] = p["key"]
        else:
            out[q["data_input"]], out[q["scales_input"]] = p["key"], q["scales_key"]
            out.update(q.get("transposed", {}))
    return out


def _memmap(path) -> dict[str, np.ndarray]:
    raw, header = read_safetensors_header(path)
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise EdgeftError(f"{path}: tensor {key} has dtype {entry.get('dtype')!r}, which edgeft does not read")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if begin == end:
            out[key] = np.zeros(shape, dtype)
        else:
            out[key] = np.memmap(path, dtype, mode="r", offset=len(raw) + begin, shape=shape)
    return out
