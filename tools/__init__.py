"""edgecv workstation tools: data → train → prune → int8 ONNX/TFLite → signed bundle; fleet client."""

from edgecv.agent import __version__

__all__ = ["__version__"]
