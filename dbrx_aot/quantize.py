"""Weight formats (``--weights``): how an artifact stores the model's matrices, and the int8 scheme.

``same`` stores every weight in the compute dtype (``--dtype``). ``bfloat16`` and ``int8`` change
how the matrices that decode streams are stored: Wqkv, out_proj, the three expert tensors and
lm_head (the table ``MATRICES``); wte, the router and the norms stay in the compute dtype.

- ``bfloat16``: the matrices in bf16, upcast to the compute dtype inside the kernels that read
  them. With ``--dtype float32`` it is exact to the released bf16 weights at half fp32's bytes.
- ``int8``: symmetric, per output channel: ``q = round(w / s)`` in [-127, 127] with
  ``s = max |w| / 127`` over the matmul's reduction dimension, stored as uint8 ``q + 128`` (the
  byte layout of onnxruntime's MatMulNBits with bits=8, so both formats read the same bytes) and
  an fp32 scale per output channel, applied after the reduction. |w - (u - 128) s| <= s / 2.

Quantisation runs tensor by tensor during the streaming conversion (``stored_tensors``), and on a
loaded model through the model's own transform (``dbrx_aot.model.replace_weight_format``): both
use ``quantize_int8``.
"""

from __future__ import annotations

import torch

from dbrx_aot.errors import DbrxAotError

WEIGHT_FORMATS = ("same", "bfloat16", "int8")
INT8_ZERO_POINT = 128
INT8_SCHEME = "symmetric per output channel: uint8 = round(w / scale) + 128, fp32 scale = max|w| / 127"

# Graph parameter (by name suffix) -> the dimension its matmul reduces over (its int8 scale has
# every other dimension). Linear weights are [O, D]; experts are [E, F, D]: w1 and v1 reduce over
# D (out [E, F]), w2 is used without a transpose and reduces over F (out [E, D]).
MATRICES: dict[str, int] = {
    "attn.Wqkv.weight": 1,
    "attn.out_proj.weight": 1,
    "ffn.w1": 2,
    "ffn.v1": 2,
    "ffn.w2": 1,
    "lm_head.weight": 1,
}


def check_weights_format(fmt: str) -> str:
    if fmt not in WEIGHT_FORMATS:
        raise DbrxAotError(f"--weights {fmt}: expected one of {', '.join(WEIGHT_FORMATS)}")
    return fmt


def reduction_dim(name: str) -> int | None:
    """The reduction dimension of a quantisable matrix, None for every other parameter."""
    for suffix, dim in MATRICES.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def scale_name(name: str) -> str:
    """``x.weight`` -> ``x.scale`` (linear layers); ``ffn.w1`` -> ``ffn.w1_scale`` (experts)."""
    return name.removesuffix(".weight") + ".scale" if name.endswith(".weight") else name + "_scale"


def quantize_int8(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 q + 128 shaped like w, fp32 scale with ``dim`` removed)."""
    w = w.float()
    scale = w.abs().amax(dim, keepdim=True) / 127
    q = torch.round(w / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp_(-127, 127)
    return (q + INT8_ZERO_POINT).to(torch.uint8), scale.squeeze(dim)


def dequantize_int8(u: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    return (u.float() - INT8_ZERO_POINT) * scale.unsqueeze(dim)


def stored_names(name: str, fmt: str) -> list[str]:
    """The names an artifact stores for one graph parameter: itself, and for an int8 matrix its scale."""
    return [name, scale_name(name)] if fmt == "int8" and reduction_dim(name) is not None else [name]


def stored_tensors(name: str, tensor: torch.Tensor, fmt: str,
                   dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """What an artifact stores for one graph parameter: [(name, tensor)] or, for an int8 matrix,
    [(name, uint8), (its scale name, fp32)]."""
    dim = reduction_dim(name)
    if dim is None or fmt == "same":
        return [(name, tensor.to(dtype))]
    if fmt == "bfloat16":
        return [(name, tensor.to(torch.bfloat16))]
    return list(zip(stored_names(name, fmt), quantize_int8(tensor, dim)))
