"""ONNX Runtime access for the device, without torch.

``import onnxruntime.training`` runs that package's ``__init__``, which imports its torch-based
``optim`` module, so a torch-free device could not reach the on-device training API. The C++
training API and its thin Python wrappers (``onnxruntime/training/api``) need no torch, so we
register an empty package object for ``onnxruntime.training`` pointing at the real directory and
import ``onnxruntime.training.api`` through it. Nothing else in the package is executed.
"""

from __future__ import annotations

import importlib.util
import sys
import types

from edgeft.errors import EdgeftError

INSTALL_HINT = "pip install onnxruntime-training-cpu==1.19.2 (or onnxruntime-training==1.19.2 for CUDA)"


def onnxruntime():
    """The onnxruntime module with its log noise turned down to errors."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort


def training_api():
    """``onnxruntime.training.api`` (Module, CheckpointState), imported without torch."""
    ort = onnxruntime()
    if "onnxruntime.training" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime.training")
        if spec is None or not hasattr(ort.capi._pybind_state, "Module"):
            raise EdgeftError(f"this onnxruntime ({ort.__version__}) cannot train; {INSTALL_HINT}")
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["onnxruntime.training"] = package
    return importlib.import_module("onnxruntime.training.api")


def session_options(threads: int | None = None, deterministic: bool = True):
    """Session options shared by every edgeft session: thread count, deterministic kernels."""
    ort = onnxruntime()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.use_deterministic_compute = deterministic
    opts.log_severity_level = 3
    return opts
