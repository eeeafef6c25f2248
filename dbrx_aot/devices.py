"""Device parsing, shared by export and the runtimes (below both, so neither imports the other)."""

from __future__ import annotations

import torch

from dbrx_aot.errors import DbrxAotError


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DbrxAotError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DbrxAotError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                               f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DbrxAotError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        if dev.index is None:  # tensors report cuda:N; compare like with like
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise DbrxAotError(f"--device {device}: expected cpu or cuda")
    return dev
