"""Export of the PC-AVS stages for deployment runtimes (not shipped in the wheel).

* :func:`export.onnx_export.export_onnx`: four ONNX graphs + manifest + verification (CPU, CI);
* :mod:`export.trt_build`: TensorRT / TensorRT-RTX engines with sidecars and a timing cache;
* :mod:`export.torch_trt`: torch-tensorrt compilation for the torch backend (GPU only).

Command line: ``python -m export {onnx,trt,torch-trt,check} ...`` (see ``python -m export -h``).
"""

from export.onnx_export import STAGES, ExportError, check_graph, export_onnx, read_manifest

__all__ = ["STAGES", "ExportError", "check_graph", "export_onnx", "read_manifest"]
