"""edgeft: export Hugging Face causal LMs to ONNX Runtime training bundles and fine-tune them on devices.

Layout: ``edgeft.host`` runs on the export machine (torch, transformers, peft, optimum);
``edgeft.device`` runs on the field device and never imports those.
"""

__version__ = "0.1.0"
