"""Export: torch.export tracing, AOTInductor packaging, ONNX export, the artifact manifest."""
