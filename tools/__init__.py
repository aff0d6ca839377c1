"""edgecv workstation tools: data → train → prune → int8 ONNX/TFLite → signed bundle; fleet client."""

from agent import __version__

__all__ = ["__version__"]
