"""Deployment builds of the PC-AVS stages (a repository tool, not shipped in the wheel).

It depends on the runtime package, never the other way round:

* :func:`rt_engine.onnx_graphs.export_onnx` (in the runtime, which builds its OpenVINO/ONNX Runtime
  graphs with it): four ONNX graphs + manifest + verification; ``python -m export onnx`` runs it;
* :mod:`export.trt_build`: TensorRT / TensorRT-RTX engines with sidecars and a timing cache;
* :mod:`export.torch_trt`: torch-tensorrt compilation for the torch backend (GPU only).

Command line: ``python -m export {onnx,trt,torch-trt,check} ...`` (see ``python -m export -h``).
"""

from rt_engine.onnx_graphs import STAGES, ExportError, check_graph, export_onnx, read_manifest

__all__ = ["STAGES", "ExportError", "check_graph", "export_onnx", "read_manifest"]
