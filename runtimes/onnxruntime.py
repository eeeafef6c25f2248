"""The ONNX Runtime runtime: the CUDA execution provider when a GPU and onnxruntime-gpu are there,
the CPU execution provider otherwise.

Every call goes through I/O binding onto torch tensors (on CPU or on the GPU, the same code):
inputs are bound by pointer, outputs land in tensors this runtime allocated once, and the step's
new keys and values are scattered into the caller's cache on its device. Nothing is copied
through numpy, and the cache never leaves the device.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dbrx_aot.errors import DbrxAotError
from dbrx_aot.manifest import Manifest
from dbrx_aot.model import write_cache_
from dbrx_aot.runtimes import KVCache
from dbrx_aot.runtimes.artifact import ArtifactRuntime, open_artifact, verify_artifact_files

# torch dtype -> ONNX TensorProto element type (what IOBinding takes for types numpy lacks, bf16)
ONNX_ELEMENT_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7}
PROVIDER_FOR_DEVICE = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def bind(io, name: str, tensor: torch.Tensor, output: bool = False) -> None:
    """Bind a contiguous torch tensor to an input or output of an IOBinding, by pointer."""
    assert tensor.is_contiguous(), name
    device = tensor.device
    args = (name, device.type, device.index or 0, ONNX_ELEMENT_TYPES[tensor.dtype], list(tensor.shape),
            tensor.data_ptr())
    (io.bind_output if output else io.bind_input)(*args)


class OnnxRuntime(ArtifactRuntime):
    name = "onnxruntime"

    @classmethod
    def load(cls, path: Path, device="cpu", providers: list[str] | None = None, threads: int | None = None,
             verify_checksums: bool = True, progress: bool = True) -> OnnxRuntime:
        import onnxruntime as ort

        path = Path(path)
        manifest, dev, _ = open_artifact(path, "onnx", device)
        available = ort.get_available_providers()
        providers = providers or [PROVIDER_FOR_DEVICE[dev.type]]
        missing = [p for p in providers if p not in available]
        if missing:
            raise DbrxAotError(f"onnxruntime {ort.__version__} has no {missing[0]} (available: {', '.join(available)}); "
                               + ("install onnxruntime-gpu for CUDA" if "CUDA" in missing[0] else "pick another provider"))
        if providers[0] == "CPUExecutionProvider" and manifest.dtype == "bfloat16":
            raise DbrxAotError(f"{path}: dtype bfloat16 cannot run on onnxruntime's CPU execution provider (it has no "
                               "bf16 MatMul/Softmax kernels); export with --dtype float32 for CPU, or run on CUDA")
        if providers[0] == "CUDAExecutionProvider" and dev.type != "cuda":
            raise DbrxAotError("--providers CUDAExecutionProvider needs --device cuda (the cache lives on the GPU)")
        verify_artifact_files(manifest, path, "onnx", verify_checksums, progress)
        return cls(path, manifest, dev, providers, threads)

    def __init__(self, path: Path, manifest: Manifest, device: torch.device, providers: list[str],
                 threads: int | None = None):
        import onnxruntime as ort

        super().__init__(path, manifest, device)
        self.decode_moe = manifest.onnx_moe("decode")  # its own where it differs from the aoti graph's
        self.providers = providers
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.log_severity_level = 3  # errors only: constant-folding notes are not the user's business
        self.sessions = {g: self._session(g, options, ort) for g in ("prefill", "decode")}
        # Outputs land in tensors allocated once per graph.
        self._outputs = {g: self._output_buffers(g) for g in ("prefill", "decode")}

    def _session(self, graph: str, options, ort):
        file = self.path / self.manifest.graphs[graph]["onnx"]
        try:
            session = ort.InferenceSession(str(file), sess_options=options, providers=self.providers)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise DbrxAotError(f"{file}: onnxruntime could not load it ({str(err).splitlines()[0]})") from None
        expected = [(i["name"], i["shape"]) for i in self.manifest.graphs[graph]["inputs"]]
        actual = [(i.name, list(i.shape)) for i in session.get_inputs()]
        if actual != expected:
            raise DbrxAotError(f"{file}: graph inputs {actual} do not match {self.manifest.graphs[graph]['inputs']} "
                               "in manifest.json (a graph from another export?)")
        return session

    def _output_buffers(self, graph: str) -> dict[str, torch.Tensor]:
        return {o["name"]: torch.empty(o["shape"], dtype=self.dtype, device=self.device)
                for o in self.manifest.graphs[graph]["onnx_outputs"]}

    def run_graph(self, graph: str, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                  logit_index: torch.Tensor | None = None) -> torch.Tensor:
        session = self.sessions[graph]
        io = session.io_binding()
        # Bound by pointer (check_call made them contiguous, on this device); referenced until the run ends.
        inputs = {"tokens": tokens, "positions": positions, "k_cache": cache.k, "v_cache": cache.v}
        if graph == "prefill":
            inputs["logit_index"] = logit_index
        for name, tensor in inputs.items():
            bind(io, name, tensor)
        outputs = self._outputs[graph]
        for name, tensor in outputs.items():
            bind(io, name, tensor, output=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready
        session.run_with_iobinding(io)
        write_cache_(cache.k, cache.v, outputs["new_k"], outputs["new_v"], positions)
        return outputs["logits"].clone()  # the buffer is reused by the next call
