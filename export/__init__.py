"""Export of the PC-AVS stages for deployment runtimes (not shipped in the wheel).

* :func:`rt_engine.onnx_graphs.export_onnx`: four ONNX graphs + manifest + verification (CPU, CI);
* :mod:`export.trt_build`: TensorRT / TensorRT-RTX engines with sidecars and a timing cache;
* :mod:`export.torch_trt`: torch-tensorrt compilation for the torch backend (GPU only).

Command line: ``python -m export {onnx,trt,torch-trt,check} ...`` (see ``python -m export -h``).
"""

from rt_engine.onnx_graphs import STAGES, ExportError, check_graph, export_onnx, read_manifest

__all__ = ["STAGES", "ExportError", "check_graph", "export_onnx", "read_manifest"]
