"""Safetensors files: checked opening, and a streaming writer that holds one tensor at a time.

The writer computes the whole header from shapes and dtypes first, then appends each tensor's
bytes as it is produced, so converting a 263 GB checkpoint never holds more than one tensor.
It also reports where each tensor's bytes lie in the file, which the ONNX external data uses.
"""

from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from dbrx_aot.errors import DbrxAotError

DTYPE_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@contextmanager
def open_checked(path: Path):
    """safe_open with the file named in every error (truncated, corrupt, not safetensors)."""
    if not path.is_file():
        raise DbrxAotError(f"{path}: no such file")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise DbrxAotError(f"{path}: not a readable safetensors file ({err})") from None
    with handle as f:
        yield f


def read_tensor(f, path: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DbrxAotError(f"{path}: cannot read tensor {key} ({err})") from None


class StreamingWriter:
    """Write tensors of known name, shape and dtype into one safetensors file, one at a time."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        self.specs = {name: (tuple(shape), dtype) for name, shape, dtype in specs}
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, shape, dtype in specs:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
        self.data_start = 8 + len(raw)
        self.header = header
        self.order = [name for name, _, _ in specs]
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def byte_range(self, name: str) -> tuple[int, int]:
        """(offset from the start of the file, length) of a tensor's bytes."""
        begin, end = self.header[name]["data_offsets"]
        return self.data_start + begin, end - begin

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self._next]
        assert name == expected, f"tensors must come in header order: got {name}, expected {expected}"
        shape, dtype = self.specs[name]
        assert tuple(tensor.shape) == shape and tensor.dtype == dtype, (name, tensor.shape, tensor.dtype)
        data = tensor.detach().contiguous().cpu()
        self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        assert self._next == len(self.order), f"{self.path}: {len(self.order) - self._next} tensors unwritten"
        self._file.close()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with open_checked(path) as f:
        for key in f.keys():
            yield key, read_tensor(f, path, key)


def byte_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """{tensor name: (offset from the start of the file, length)} read from a safetensors header."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    start = 8 + header_len
    return {name: (start + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0])
            for name, info in header.items() if name != "__metadata__"}
