"""The bundle's frozen weights, mapped once per process and shared by its graphs.

``weights.safetensors`` is memory-mapped read-only (file-backed pages: the kernel can drop them
under memory pressure and read them back) and every tensor is wrapped in a CPU OrtValue without a
copy. Sessions get them through ``SessionOptions.add_initializer``, so the training and eval graphs
read the same pages: measured on a 364 MB model, the eval session then adds 27 MB instead of a
second 391 MB copy (onnxruntime 1.19, 1.20 and 1.32 alike).

A session that pre-packs int4 weights (``edgeft train --prepack``) reads each one once to build
MLAS's own layout and never reads it again; ``shedding`` drops the mapped pages while it does, so
the packed copy replaces the stored one in memory instead of joining it (Llama-3.2-1B int4: 2468 ->
1313 MB at session start, 4131 -> 2993 MB at the step's peak, the same losses).
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Iterator

import numpy as np

from edgeft.bundle import Bundle, read_safetensors_header
from edgeft.errors import EdgeftError

DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # Linux, macOS; elsewhere pages are left to the OS
DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I32": np.int32, "I64": np.int64}


class BundleWeights:
    """Graph initializer name -> OrtValue over its bytes in weights.safetensors."""

    def __init__(self, bundle: Bundle):
        path = bundle.path(bundle.manifest["weights"])
        self._mapping, self.arrays = _memmap(path)  # kept alive as long as the OrtValues that wrap them
        self.values = {}
        from edgeft.device.session import onnxruntime

        ortvalue = onnxruntime().OrtValue.ortvalue_from_numpy
        for name, key in graph_keys(bundle).items():
            if key not in self.arrays:
                raise EdgeftError(f"{path}: tensor {key} ({name}) is missing")
            self.values[name] = ortvalue(self.arrays[key])

    def release_pages(self) -> None:
        """Drop the mapping's resident pages: clean and file-backed, they are read back from the
        file if anything touches them again."""
        if DONTNEED is not None:
            self._mapping.madvise(DONTNEED)

    @contextlib.contextmanager
    def shedding(self, every: float = 0.05) -> Iterator[None]:
        """Release the pages every ``every`` seconds while the body runs, and once after it."""
        done = threading.Event()

        def shed() -> None:
            while not done.wait(every):
                self.release_pages()

        thread = threading.Thread(target=shed, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.release_pages()


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


def _memmap(path) -> tuple[mmap.mmap, dict[str, np.ndarray]]:
    """One read-only mapping of the file and an array over each tensor's bytes in it."""
    raw, header = read_safetensors_header(path)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
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
            count = (end - begin) // np.dtype(dtype).itemsize
            out[key] = np.frombuffer(mapping, dtype, count, len(raw) + begin).reshape(shape)
    return mapping, out
