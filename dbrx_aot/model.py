"""DBRX as one static-shape graph, written once for torch.export, AOTInductor and ONNX.

What is DBRX specific (FACTS.md): a fused Wqkv projection clamped to [-clip_qkv, clip_qkv]
before RoPE; rotate-half RoPE with theta 5e5; grouped-query attention (48 query heads over 8 KV
heads); bias-free LayerNorms; a fine-grained MoE of 16 experts, top-4, with an fp32 router softmax
and p-norm renormalised weights; experts stored flat as [E*F, D] (here [E, F, D]) with w2 used
without a transpose; an untied lm_head.

Weight formats (``--weights``, dbrx_aot/quantize.py): a matrix may be stored in another dtype than
the model computes in (bf16 upcast in the kernel that reads it) or as int8 with per-output-channel
scales (``Int8Linear``, ``Int8MoE``, swapped in by ``replace_weight_format``). They are forms of
this one module: the eager model on an int8 artifact is the exact reference for its compiled graphs.

Tensor parallelism (``--tp N``, dbrx_aot/tp.py) is a transform of this module too: ``shard_model``
cuts the parameters to one rank's share (attention keeps ``n_heads`` / ``kv_heads`` of its own) and
adds the collectives after out_proj, the experts and lm_head as forward hooks.

Static shapes: B rows, T tokens per call (T = P for prefill, 1 for decode), a KV cache of S slots.
The cache is passed in, never held: ``DbrxModel.forward`` reads it and returns the step's new
keys and values; ``CachedStep`` (the graph AOTInductor compiles) also writes them into the cache
in place, while the ONNX graph returns them for its runtime to write.

Attention reads the cache slots before the row's first position in this call (``j <
positions[b, 0]``) plus the call's own new keys, causally by index within the call. Padding
tokens sit after a row's real tokens, so no real query sees them; they may write junk into future
cache slots, which a real token overwrites before any query can read them.

Shape legend: B batch, T tokens in the call, S cache slots, L layers, H query heads, K kv heads,
G = H / K query heads per kv head, hd head dim, D model width, E experts, k top-k, F expert ffn
width, V vocabulary, N = B * T tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F_
from torch import nn
from torch.torch_version import TorchVersion

from dbrx_aot.config import NORM_EPS, DbrxConfig
from dbrx_aot.errors import DbrxAotError
from dbrx_aot.quantize import INT8_ZERO_POINT, check_weights_format, quantize_int8, reduction_dim

MoeMode = Literal["dense", "gather", "grouped"]
MOE_MODES = ("auto", "dense", "gather", "grouped")
W2_ROW_BLOCK = 16  # the gather form's w2 rows summed together first (MoE.forward)
# auto picks grouped from this many token slots per expert on average (B*T*k/E), by compute dtype,
# where it was measured faster than dense (CPU, small preset, AOTInductor, scripts/ab_bench.py):
# bf16 1.13-2.06x at 128 an expert, a tie at 16; fp32 1.26-1.33x at 16, 1.61x at 32, 2.25x at 128.
GROUPED_MIN_ROWS = {torch.bfloat16: 128, torch.float32: 16}


def grouped_unfit(config: DbrxConfig, dtype: torch.dtype, onnx: bool = False) -> str | None:
    """Why the grouped form cannot be compiled here, or None: bf16 goes through torch._grouped_mm,
    which wants rows of a multiple of 16 bytes; other dtypes through the project op
    (``grouped_mm``); ONNX has no counterpart."""
    if dtype == torch.bfloat16 and (config.d_model % 8 or config.ffn_hidden_size % 8):
        return (f"d_model {config.d_model} and ffn_hidden_size {config.ffn_hidden_size} must be multiples of 8 "
                "(torch._grouped_mm's 16-byte rows in bf16); use --moe dense")
    if onnx:
        return "ONNX has no grouped matrix product; use --format aoti, or --moe dense"
    return None


def resolve_moe_mode(mode: str, tokens_per_call: int, config: DbrxConfig, dtype: torch.dtype = torch.float32,
                     device: torch.device = torch.device("cpu"), onnx: bool = False) -> MoeMode:
    """``auto``: gather when the call's tokens pick fewer expert slots than there are experts;
    grouped on CPU for a graph that is not ONNX once the experts get ``GROUPED_MIN_ROWS[dtype]``
    slots each on average; dense elsewhere (below that, ONNX graphs, on CUDA: not measured yet).
    ``grouped`` explicitly: where ``grouped_unfit`` finds nothing against it."""
    if mode == "auto":
        slots = tokens_per_call * config.moe_top_k
        if slots < config.moe_num_experts:
            return "gather"
        rows = GROUPED_MIN_ROWS.get(dtype)
        grouped = device.type == "cpu" and rows is not None and grouped_unfit(config, dtype, onnx) is None
        return "grouped" if grouped and slots >= rows * config.moe_num_experts else "dense"
    if mode not in MOE_MODES:
        raise DbrxAotError(f"--moe {mode}: expected one of {', '.join(MOE_MODES)}")
    why = grouped_unfit(config, dtype, onnx) if mode == "grouped" else None
    if why is not None:
        raise DbrxAotError(f"--moe grouped: {why}")
    return mode  # type: ignore[return-value]


@torch.library.custom_op("dbrx_aot::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=ends)`` ([A, X] rows sorted by group, [G, X, Y] -> [A, Y]) as
    an opaque project op, for the dtypes whose export torch refuses: torch 2.13's meta function
    admits bf16 only, while the kernels (CPU, and CUDA's fallback) run fp32 and fp16 too. An
    AOTInductor package calls it through its proxy executor: it runs in a process where this module
    is imported (the aoti runtime imports it), not in a C++ host without the op."""
    return torch._grouped_mm(a, b, offs=ends)


@grouped_mm.register_fake
def _grouped_mm_shape(a, b, ends):
    return a.new_empty(a.shape[0], b.shape[-1])                     # [A, Y]


# AOTInductor's shims for aten._grouped_mm came with torch 2.12 (torchgen/aoti/fallback_ops.py): a
# package compiled by torch 2.11 cannot call it, on CPU nor on CUDA (seen on an H200: "aoti_torch_cuda
# __grouped_mm was not declared"), so there bf16 goes through the project op as the other dtypes do.
ATEN_GROUPED_MM_SHIM = TorchVersion(torch.__version__) >= (2, 12)


def project_ops(moe: MoeMode, dtype: torch.dtype) -> list[str]:
    """The dbrx_aot ops a compiled graph of this MoE form and dtype calls (the manifest's
    ``aoti_ops``): a process loading its package must have imported dbrx_aot."""
    aten = dtype == torch.bfloat16 and ATEN_GROUPED_MM_SHIM
    return ["dbrx_aot::grouped_mm"] if moe == "grouped" and not aten else []


def group_matmul(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` sorted by group times each group's matrix of ``b``: aten's op where its export
    admits the dtype (bf16) and AOTInductor can call it, the project op otherwise."""
    if project_ops("grouped", a.dtype):
        return grouped_mm(a, b, ends)
    return torch._grouped_mm(a, b, offs=ends)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, 1, T, hd] in fp32, cast to the model dtype (as the reference does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
                                / head_dim))                       # [hd/2]
    angles = positions.to(torch.float32)[..., None] * inv_freq     # [B, T, hd/2]
    emb = torch.cat((angles, angles), dim=-1)                      # [B, T, hd]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rowdot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x W^T`` as a multiply and a row reduction, for one-token decode graphs on CPU: Inductor
    fuses it into one kernel that streams W (and upcasts or dequantises it on the fly), where a BLAS
    gemv reaches less of the memory bandwidth (lm_head of the small preset on 2 cores: 17 ms vs
    25 ms). Compiled graphs only: run eagerly, it would materialise the product."""
    return (x[..., None, :] * w).sum(-1)  # [..., 1, D] * [O, D] -> [..., O]


class Linear(nn.Linear):
    """A bias-free linear layer whose weight may be stored in another dtype than it computes in
    (``--weights bfloat16``): upcast where it is read. ``rowdot`` (set by ``use_rowdot``) picks the
    matrix-vector form of compiled CPU decode graphs."""

    rowdot = False

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        w = self.weight.to(x.dtype)
        return rowdot(x, w) if self.rowdot else F_.linear(x, w)


class Int8Linear(nn.Module):
    """``x W^T`` with W stored as uint8 ``q + 128`` [O, D] and an fp32 scale per output channel [O],
    applied after the reduction (``--weights int8``)."""

    rowdot = False

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)   # [O, D] uint8
        self.scale = nn.Parameter(scale, requires_grad=False)     # [O] fp32

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(*quantize_int8(linear.weight.detach(), dim=1))

    def forward(self, x):
        w = self.weight.to(x.dtype) - INT8_ZERO_POINT                     # [O, D], exact integers
        y = rowdot(x, w) if self.rowdot else F_.linear(x, w)
        return y * self.scale.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.config = config
        # The heads this module computes: all of them, or a rank's share under tensor parallelism.
        self.n_heads, self.kv_heads = config.n_heads, config.kv_n_heads
        self.Wqkv = Linear(config.d_model, config.qkv_size)
        self.out_proj = Linear(config.d_model, config.d_model)

    # False: the attention written out (scores against the cache and the call's keys, fp32 softmax);
    # True: torch's scaled_dot_product_attention over the cache and the call's keys concatenated
    # (a copy of the cache per layer; its kernels accumulate the softmax in fp32 for half-precision
    # inputs). Set by ``use_sdpa`` (export's --attention; AOTInductor graphs).
    sdpa = False
    # Cache extents (slot counts below S) the graph may attend over instead of all S slots: a branch
    # per extent (torch.cond), taken when no row has cached past it (``within_extent``). Set by
    # ``use_attention_extents`` (export: AOTInductor fp32 prefill graphs on CPU, trace.attention_extents).
    extents: tuple[int, ...] = ()

    def forward(self, x, cos, sin, k_cache, v_cache, mask, reach=None):
        # x [B, T, D]; cos, sin [B, 1, T, hd]; k_cache, v_cache [B, K, S, hd]; mask [B, 1, T, S+T];
        # reach: 0-dim, the most cache slots any row attends to (each row's first position)
        c = self.config
        qkv = self.Wqkv(x)                                              # [B, T, H*hd + 2*K*hd]
        if c.clip_qkv is not None:
            qkv = qkv.clamp(min=-c.clip_qkv, max=c.clip_qkv)
        q, k, v = self.heads(qkv, cos, sin)
        if self.extents:
            # The branches take qkv and make their own heads: AOTInductor (torch 2.13) hands a
            # torch.cond branch wrong values for the RoPE'd or strided q, k, v (README, Notes).
            def attend(qkv, cos, sin, k_cache, v_cache, mask):
                return self.attend(*self.heads(qkv, cos, sin), k_cache, v_cache, mask)
            out = within_extent(self.extents, reach, attend, qkv, cos, sin, k_cache, v_cache, mask)
        else:
            out = self.attend(q, k, v, k_cache, v_cache, mask)
        return self.out_proj(out), k, v

    def heads(self, qkv, cos, sin):
        # qkv [B, T, H*hd + 2*K*hd]; cos, sin [B, 1, T, hd] -> q [B, H, T, hd], k, v [B, K, T, hd]
        B, T, _ = qkv.shape
        H, K, hd = self.n_heads, self.kv_heads, self.config.head_dim
        # Slices, not split(): ONNX's SplitToSequence has no bf16 kernel type (Slice has).
        q, k, v = qkv[..., :H * hd], qkv[..., H * hd:(H + K) * hd], qkv[..., (H + K) * hd:]
        q = q.view(B, T, H, hd).transpose(1, 2)                         # [B, H, T, hd]
        k = k.view(B, T, K, hd).transpose(1, 2)                         # [B, K, T, hd]
        v = v.view(B, T, K, hd).transpose(1, 2)                         # [B, K, T, hd]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def attend(self, q, k, v, k_cache, v_cache, mask):
        # q [B, H, T, hd]; k, v [B, K, T, hd]; k_cache, v_cache [B, K, S, hd]; mask [B, 1, T, S+T]
        # -> [B, T, H*hd]
        B, H, T, hd = q.shape
        K, S = k.shape[1], k_cache.shape[2]
        G = H // K
        if self.sdpa:
            keys, values = torch.cat((k_cache, k), dim=2), torch.cat((v_cache, v), dim=2)  # [B, K, S+T, hd]
            out = F_.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # [B, H, T, hd]
            return out.transpose(1, 2).reshape(B, T, H * hd)             # [B, T, H*hd]
        mask = mask.repeat(1, 1, G, 1)                                  # [B, 1, G*T, S+T]
        # Query head h uses kv head h // G: group the G query heads of a kv head as rows.
        qg = q.reshape(B, K, G * T, hd)                                 # [B, K, G*T, hd]
        scale = 1.0 / math.sqrt(hd)
        scores = torch.cat((qg @ k_cache.transpose(2, 3),               # [B, K, G*T, S]
                            qg @ k.transpose(2, 3)), dim=-1) * scale    # [B, K, G*T, S+T]
        scores = scores.float().masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)               # [B, K, G*T, S+T]
        out = probs[..., :S] @ v_cache + probs[..., S:] @ v             # [B, K, G*T, hd]
        return out.view(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)  # [B, T, H*hd]


def within_extent(extents, reach, attend, qkv, cos, sin, k_cache, v_cache, mask):
    """``attend`` over the first E cache slots only, E the smallest of ``extents`` that holds every
    slot a row may attend to (``reach`` <= E), all S slots when none does: nested torch.cond, one
    static graph with a branch per extent, exact (the slots left out are masked anyway). A prompt's
    first chunk (reach 0) attends over its own T keys, not S+T."""
    S = k_cache.shape[2]

    # (torch.cond wants each branch's output dense in memory: .contiguous())
    def over(E):
        def branch(qkv, cos, sin, k_cache, v_cache, mask):
            mask = torch.cat((mask[..., :E], mask[..., S:]), dim=-1)    # [B, 1, T, E+T]
            return attend(qkv, cos, sin, k_cache[:, :, :E], v_cache[:, :, :E], mask).contiguous()
        return branch

    def pick(i):
        if i == len(extents):
            return lambda *args: attend(*args).contiguous()
        return lambda *args: torch.cond(reach <= extents[i], over(extents[i]), pick(i + 1), args)

    return pick(0)(qkv, cos, sin, k_cache, v_cache, mask)


class MoE(nn.Module):
    """Router + experts. Expert weights are [E, F, D]: out_e = (silu(h w1_e^T) * h v1_e^T) w2_e.

    Three static-shape forms of the same sum (``mode``): ``dense`` (every expert on every token,
    weighted by a routing weight that is zero where not chosen), ``gather`` (each token's k experts'
    rows gathered by index: decode), ``grouped`` (the token slots sorted by expert and multiplied
    expert by expert, ``group_matmul``: prefill on CPU).

    ``weight`` reads an expert tensor (all of it, or the rows of the chosen experts) in the compute
    dtype and ``scale`` applies its per-output-channel scale after the reduction: the identity
    here, the int8 form's scales in ``Int8MoE``."""

    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.config = config
        E, F, D = config.moe_num_experts, config.ffn_hidden_size, config.d_model
        self.router = Linear(D, E)
        self.w1 = nn.Parameter(torch.empty(E, F, D))
        self.v1 = nn.Parameter(torch.empty(E, F, D))
        self.w2 = nn.Parameter(torch.empty(E, F, D))

    # The gather form's products: False, broadcast multiply + sum (Inductor fuses it into one kernel
    # that streams the rows); True, batched matmuls (onnxruntime runs each elementwise op as its own
    # pass, so the matmul form decodes 1.37x faster there). Set by the ONNX export (export/onnx.py).
    gather_matmul = False
    # The gather form's kernels: "inductor", the products above as PyTorch ops (compiled by Inductor on
    # every device); "triton", moe_kernels' hand-written Triton kernels (CUDA; set by
    # ``use_triton_gather``, export's --moe-kernel).
    gather_kernel = "inductor"
    zero_point = 0  # what the stored expert integers are offset by (Int8MoE: q + 128)

    def weight(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return w.to(dtype)

    def scale(self, y: torch.Tensor, name: str, top_e: torch.Tensor | None = None) -> torch.Tensor:
        return y

    def route(self, h):
        # h [N, D] -> top weights [N, k] (model dtype), top experts [N, k]
        c = self.config
        probs = torch.softmax(self.router(h).float(), dim=-1)          # [N, E] fp32
        top_w, top_e = torch.topk(probs, c.moe_top_k, dim=-1)           # [N, k]
        if c.moe_normalize_expert_weights is not None:
            top_w = top_w / torch.linalg.vector_norm(top_w, ord=c.moe_normalize_expert_weights,
                                                     dim=-1, keepdim=True)
        return top_w.to(h.dtype), top_e

    def forward(self, x, mode: MoeMode):
        B, T, D = x.shape
        h = x.reshape(B * T, D)                                         # [N, D]
        top_w, top_e = self.route(h)
        dt = h.dtype
        if mode == "dense":
            # Every expert on every token, weighted by its routing weight (0 when not chosen).
            weights = torch.zeros(h.shape[0], self.config.moe_num_experts, dtype=dt,
                                  device=h.device).scatter(1, top_e, top_w)           # [N, E]
            gate = F_.silu(self.scale(h @ self.weight(self.w1, dt).transpose(1, 2), "w1"))  # [E, N, F]
            up = self.scale(h @ self.weight(self.v1, dt).transpose(1, 2), "v1")             # [E, N, F]
            y = self.scale((gate * up) @ self.weight(self.w2, dt), "w2")                   # [E, N, D]
            out = (y * weights.t()[:, :, None]).sum(dim=0)              # [N, D]
        elif mode == "grouped":
            out = self.grouped(h, top_w, top_e)
        else:
            out = (self.gathered(h, top_e, dt) * top_w[..., None]).sum(1)  # [N, D]
        return out.view(B, T, D)

    def gathered(self, h, top_e, dt):
        """The gather form's products: h [N, D], top_e [N, k] -> y [N, k, D] (scaled)."""
        if self.gather_kernel == "triton":
            # moe_kernels: the same sums, each chosen row read once in its stored dtype (fp32
            # accumulation), and the same scales and rounding to dt after each.
            rowdot, coldot, z = torch.ops.dbrx_aot.gather_rowdot, torch.ops.dbrx_aot.gather_coldot, self.zero_point
            gate = F_.silu(self.scale(rowdot(h, top_e, self.w1, z).to(dt), "w1", top_e))  # [N, k, F]
            up = self.scale(rowdot(h, top_e, self.v1, z).to(dt), "v1", top_e)             # [N, k, F]
            return self.scale(coldot(gate * up, top_e, self.w2, z).to(dt), "w2", top_e)   # [N, k, D]
        (N, D), k = h.shape, top_e.shape[1]
        # Only the chosen experts' rows, gathered by index per token (then upcast). index_select
        # along E, not w[top_e]: ONNX Gather instead of GatherND, which onnxruntime's CPU provider
        # copies at half the speed; Inductor compiles both into the same indexed load.
        w1, v1, w2 = (self.weight(w.index_select(0, top_e.reshape(N * k)), dt).view(N, k, *w.shape[1:])
                      for w in (self.w1, self.v1, self.w2))             # [N, k, F, D]
        if self.gather_matmul:
            hc = h[:, None, :, None]                                # [N, 1, D, 1]
            gate = F_.silu(self.scale((w1 @ hc)[..., 0], "w1", top_e))  # [N, k, F]
            up = self.scale((v1 @ hc)[..., 0], "v1", top_e)         # [N, k, F]
            y = self.scale(((gate * up)[:, :, None, :] @ w2)[:, :, 0], "w2", top_e)  # [N, k, D]
        else:
            hk = h[:, None, None, :]                                # [N, 1, 1, D]
            gate = F_.silu(self.scale((hk * w1).sum(-1), "w1", top_e))  # [N, k, F]
            up = self.scale((hk * v1).sum(-1), "v1", top_e)         # [N, k, F]
            # w2 reduces over its rows (F): summed R rows at a time first, so Inductor's kernel
            # walks R neighbouring rows per step instead of one column of D down all F rows
            # (small preset decode on 2 cores, S=2048: 14.5 -> 13.6 ms a step).
            F = gate.shape[2]
            R = math.gcd(F, W2_ROW_BLOCK)
            a = (gate * up).view(N, k, F // R, R, 1)                # [N, k, F/R, R, 1]
            y = (a * w2.view(N, k, F // R, R, D)).sum(3).sum(2)     # [N, k, D]
            y = self.scale(y, "w2", top_e)
        return y

    def grouped(self, h, top_w, top_e):
        """Each expert's matmuls over only the token slots routed to it: the N*k slots sorted by
        expert, ``group_matmul`` with the group ends as data (static shapes), then back to token
        order and weighted. Reads each expert once and multiplies k/E of dense's rows."""
        (N, D), k, E = h.shape, top_e.shape[1], self.config.moe_num_experts
        A = N * k
        slots = torch.arange(A, device=h.device)
        e = top_e.reshape(A)                                            # [A] slot -> expert
        order = torch.argsort(e * A + slots)                            # [A] by expert, stable
        experts = e[order]                                              # [A] sorted
        ends = (e[:, None] == torch.arange(E, device=h.device)).sum(0).cumsum(0).to(torch.int32)  # [E]
        rows = h[order // k]                                            # [A, D] slot i is token i // k
        dt = h.dtype
        gate = F_.silu(self.scale(group_matmul(rows, self.weight(self.w1, dt).transpose(1, 2), ends),
                                  "w1", experts))                       # [A, F]
        up = self.scale(group_matmul(rows, self.weight(self.v1, dt).transpose(1, 2), ends), "v1", experts)  # [A, F]
        y = self.scale(group_matmul(gate * up, self.weight(self.w2, dt), ends), "w2", experts)  # [A, D]
        inverse = torch.empty_like(order).scatter_(0, order, slots)     # [A] token order
        return (y[inverse].view(N, k, D) * top_w[..., None]).sum(1)     # [N, D]


class Int8MoE(MoE):
    """The experts as uint8 ``q + 128`` [E, F, D] with fp32 scales per output channel: w1, v1 [E, F]
    (their matmuls reduce over D), w2 [E, D] (it reduces over F). Router unquantised."""

    zero_point = INT8_ZERO_POINT

    def __init__(self, moe: MoE):
        nn.Module.__init__(self)
        self.config, self.router = moe.config, moe.router
        for name in ("w1", "v1", "w2"):
            u, s = quantize_int8(getattr(moe, name).detach(), reduction_dim("ffn." + name))
            setattr(self, name, nn.Parameter(u, requires_grad=False))
            setattr(self, name + "_scale", nn.Parameter(s, requires_grad=False))

    def weight(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return w.to(dtype) - INT8_ZERO_POINT

    def scale(self, y: torch.Tensor, name: str, top_e: torch.Tensor | None = None) -> torch.Tensor:
        s = {"w1": self.w1_scale, "v1": self.v1_scale, "w2": self.w2_scale}[name]   # [E, C]
        s = s[:, None, :] if top_e is None else s[top_e]        # dense [E, 1, C]; gather [N, k, C]; grouped [A, C]
        return y * s.to(y.dtype)


class Block(nn.Module):
    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.d_model, eps=NORM_EPS, bias=False)
        self.attn = Attention(config)
        self.norm_2 = nn.LayerNorm(config.d_model, eps=NORM_EPS, bias=False)
        self.ffn = MoE(config)

    def forward(self, x, cos, sin, k_cache, v_cache, mask, moe: MoeMode, reach=None):
        a, k, v = self.attn(self.norm_1(x), cos, sin, k_cache, v_cache, mask, reach)
        x = x + a
        x = x + self.ffn(self.norm_2(x), moe)
        return x, k, v


class DbrxModel(nn.Module):
    tp = 1  # the tensor-parallel degree this model's shard was cut for (set by tp.shard_model)

    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model, eps=NORM_EPS, bias=False)
        self.lm_head = Linear(config.d_model, config.vocab_size)

    def forward(self, tokens, positions, k_cache, v_cache, moe: MoeMode = "dense", logit_index=None):
        """tokens, positions [B, T] int64; k_cache, v_cache [L, B, K, S, hd], read only; logit_index
        [B] int64 or None.

        Returns logits [B, T, V] (with ``logit_index``: [B, 1, V], row b's at its token
        logit_index[b] only: generation samples from one position per row, and lm_head over the
        whole vocabulary is the largest matmul a prompt token costs) and the call's new keys and
        values [L, B, K, T, hd].
        """
        c = self.config
        B, T = tokens.shape
        S = k_cache.shape[3]
        x = self.wte(tokens)                                            # [B, T, D]
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
        slots = torch.arange(S, device=tokens.device)
        cached = slots[None, :] < positions[:, :1]                       # [B, S]
        index = torch.arange(T, device=tokens.device)
        causal = index[None, :] <= index[:, None]                        # [T, T]
        mask = torch.cat((cached[:, None, :].expand(B, T, S),
                          causal[None].expand(B, T, T)), dim=-1)[:, None]        # [B, 1, T, S+T]
        reach = positions[:, 0].max()                                    # [] cache slots any row reads
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, cos, sin, k_cache[i], v_cache[i], mask, moe, reach)
            new_k.append(k)
            new_v.append(v)
        if logit_index is not None:
            x = x.gather(1, logit_index[:, None, None].expand(B, 1, x.shape[-1]))  # [B, 1, D]
        logits = self.lm_head(self.norm_f(x))                           # [B, T or 1, V]
        return logits, torch.stack(new_k), torch.stack(new_v)           # [L, B, K, T, hd]


def use_sdpa(module: nn.Module) -> nn.Module:
    """Every attention below ``module`` through scaled_dot_product_attention (``Attention.sdpa``), in place."""
    for child in module.modules():
        if isinstance(child, Attention):
            child.sdpa = True
    return module


def use_attention_extents(module: nn.Module, extents: tuple[int, ...]) -> nn.Module:
    """Every attention below ``module`` attends within the smallest fitting cache extent
    (``within_extent``; ascending slot counts below S), in place."""
    for child in module.modules():
        if isinstance(child, Attention):
            child.extents = tuple(extents)
    return module


def use_triton_gather(module: nn.Module) -> nn.Module:
    """Every MoE below ``module`` computes its gather form with moe_kernels' Triton kernels, in place.
    The other forms (dense, grouped) are unchanged."""
    from dbrx_aot import moe_kernels  # registers torch.ops.dbrx_aot.gather_rowdot / gather_coldot

    if not moe_kernels.available():
        raise DbrxAotError("--moe-kernel triton: triton is not installed (it comes with CUDA builds of torch)")
    for child in module.modules():
        if isinstance(child, MoE):
            child.gather_kernel = "triton"
    return module


def use_rowdot(module: nn.Module) -> nn.Module:
    """Every linear layer below ``module`` computes in its row-dot form (see ``rowdot``), in place."""
    for child in module.modules():
        if isinstance(child, (Linear, Int8Linear)):
            child.rowdot = True
    return module


def replace_weight_format(model: DbrxModel, fmt: str) -> DbrxModel:
    """Store the matrices (quantize.MATRICES) as ``fmt`` (``same``, ``bfloat16``, ``int8``), in place.

    Works on real weights (it converts or quantises them) and on the meta device (it only shapes
    the parameters, for loading stored weights into them)."""
    check_weights_format(fmt)
    if fmt == "same":
        return model
    for block in model.blocks:
        if fmt == "bfloat16":
            block.attn.to(torch.bfloat16)
            for name in ("w1", "v1", "w2"):
                setattr(block.ffn, name, nn.Parameter(getattr(block.ffn, name).detach().to(torch.bfloat16),
                                                      requires_grad=False))
        else:
            block.attn.Wqkv = Int8Linear.from_linear(block.attn.Wqkv)
            block.attn.out_proj = Int8Linear.from_linear(block.attn.out_proj)
            block.ffn = Int8MoE(block.ffn)
    model.lm_head = model.lm_head.to(torch.bfloat16) if fmt == "bfloat16" else Int8Linear.from_linear(model.lm_head)
    return model


def write_cache_(k_cache, v_cache, new_k, new_v, positions) -> None:
    """Write the call's keys/values [L, B, K, T, hd] at their positions [B, T], in place.

    An indexed assignment (index_put_) into a permuted view, not ``scatter_`` along S: Inductor
    turns the functionalised scatter into a copy of the whole cache per call (and a copy back), 4
    passes over [L, B, K, S, hd] per step for 2 * L * K * T * hd new numbers; index_put_ is written
    in place (small preset, S=2048: 0.40 ms -> 0.016 ms a call for the keys alone)."""
    B, T = positions.shape
    rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)       # [B, T]
    for cache, new in ((k_cache, new_k), (v_cache, new_v)):
        # [L, B, K, S, hd] seen as [B, S, L, K, hd]: (rows, positions) pick [B, T] slots of [L, K, hd]
        cache.permute(1, 3, 0, 2, 4)[rows, positions] = new.permute(1, 3, 0, 2, 4)


# CachedStep and FunctionalStep hold the model as ``model``: a weight ``w`` is ``model.w`` in their graphs.
STEP_PREFIX = "model."


class CachedStep(nn.Module):
    """The graph AOTInductor compiles (and eager runs): logits out, cache updated in place."""

    def __init__(self, model: DbrxModel, moe: MoeMode):
        super().__init__()
        self.model = model
        self.moe = moe

    def forward(self, tokens, positions, k_cache, v_cache, logit_index=None):
        logits, new_k, new_v = self.model(tokens, positions, k_cache, v_cache, self.moe, logit_index)
        write_cache_(k_cache, v_cache, new_k, new_v, positions)
        return logits


class FunctionalStep(nn.Module):
    """The graph ONNX exports: no mutation, the call's new keys and values are returned."""

    def __init__(self, model: DbrxModel, moe: MoeMode):
        super().__init__()
        self.model = model
        self.moe = moe

    def forward(self, tokens, positions, k_cache, v_cache, logit_index=None):
        return self.model(tokens, positions, k_cache, v_cache, self.moe, logit_index)


def cache_shape(config: DbrxConfig, batch_size: int, max_seq_len: int, tp: int = 1) -> tuple[int, ...]:
    """[L, B, K, S, hd]; under tensor parallelism each rank caches its K/N kv heads."""
    return (config.n_layers, batch_size, config.kv_n_heads // tp, max_seq_len, config.head_dim)
