"""Export: torch.export tracing, AOTInductor packaging, ONNX export, the artifact manifest."""

from dbrx_aot.export.artifact import FORMATS, ExportReport, export_artifact

__all__ = ["FORMATS", "ExportReport", "export_artifact"]
