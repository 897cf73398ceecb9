"""Fused L1 reconstruction error of K class decoders (Triton), recomputed in backward.

The same function as `chunked_l1_distance` (same layout, same dtype rules):

    d[k, n] = || D_k h_k[:, n] - x[:, n] ||_1      x [C, N], h [K, L, N], D [K, C, L] -> d [K, N]

The chunked path writes each chunk's [m, C, N] residual to memory and reads it back
several times (bmm -> sub -> abs -> sum, and again in backward); at C=2048 that traffic,
not arithmetic, set its H100 time (docs/benchmarks/head.md). Here the residual lives only
in registers: each program computes one [BLOCK_C, BLOCK_N] tile of D_k h_k with tl.dot,
subtracts x and reduces |r| (forward) or turns it into s = sign(r) * g (backward) at once.

One kernel per reduction axis, each program owning its output tile (no atomics, so the
result is deterministic):

* forward    grid (N tiles, K):       walk C, d[k, tile]     = sum_c |r|
* grad codes grid (N tiles, K):       walk C, dh[k, :, tile] = sum_c D_k[c]^T s
* grad dec   grid (C tiles, K):       walk N, dD[k, tile, :] = sum_n s h_k[:, n]^T
* grad x     grid (N tiles, C tiles): walk K, dx[tile]       = -sum_k s

Axis 0 is the fastest-launched one: neighbouring programs share D_k (forward, grad codes)
or h_k (grad dec), so those stay in L2 while x (C*N, ~13 MB at ImageNet scale) is re-read
from L2. Every backward kernel recomputes r (4 decoder products per step instead of 2, on
data that never leaves the chip). Inner products run in the input dtype (bf16 tensor
cores) and accumulate in float32; the latent L is padded to a power of two >= 16 (tl.dot's
smallest shape), C and N tails and the padding are masked to zero.

Under TRITON_INTERPRET=1 (CPU tests) the operands of tl.dot are upcast to float32 first:
the interpreter multiplies bf16 bit patterns (triton-lang/triton#11584, unsupported
upstream). bf16 x bf16 products are exact in float32, so this computes what a bf16 tensor
core computes with float32 accumulation, up to summation order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..errors import ConfigError
from .compute_dtype import compute_dtype

__all__ = ["MAX_LATENT", "SUPPORTED_DTYPES", "interpreting", "triton_l1_distance", "triton_l1_supported"]

# The codes tile [L_pad, BLOCK_N] (and grad codes' float32 accumulator) stay in registers.
MAX_LATENT = 128
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tile sizes of the interpreter and of explicit calls; on CUDA the autotuner picks from _CONFIGS.
BLOCK_N = 64
BLOCK_C = 64


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read when kernels are decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b accumulated in float32 (UPCAST: the interpreter's bf16 dot workaround)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _signed_grad(r, g):
    """dL/d(D h) = sign(r) * g, with sign(0) = 0 as torch.sign."""
    return tl.where(r > 0, g[None, :], tl.where(r < 0, -g[None, :], 0.0))


@triton.jit
def _l1_forward_kernel(x_ptr, codes_ptr, dec_ptr, out_ptr, K, C, N, L,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    k = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    n_ok, l_ok = offs_n < N, offs_l < L
    h = tl.load(codes_ptr + k * L * N + offs_l[:, None] * N + offs_n[None, :],
                mask=l_ok[:, None] & n_ok[None, :], other=0.0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        d = tl.load(dec_ptr + k * C * L + offs_c[:, None] * L + offs_l[None, :],
                    mask=c_ok[:, None] & l_ok[None, :], other=0.0)
        x = tl.load(x_ptr + offs_c[:, None] * N + offs_n[None, :], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        r = _mm(d, h, UPCAST, PRECISION) - x.to(tl.float32)
        acc += tl.sum(tl.abs(r), axis=0)
    tl.store(out_ptr + k * N + offs_n, acc, mask=n_ok)


@triton.jit
def _l1_grad_codes_kernel(x_ptr, codes_ptr, dec_ptr, grad_ptr, out_ptr, K, C, N, L,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    k = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    n_ok, l_ok = offs_n < N, offs_l < L
    h_off = k * L * N + offs_l[:, None] * N + offs_n[None, :]
    h = tl.load(codes_ptr + h_off, mask=l_ok[:, None] & n_ok[None, :], other=0.0)
    g = tl.load(grad_ptr + k * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_L, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        d = tl.load(dec_ptr + k * C * L + offs_c[:, None] * L + offs_l[None, :],
                    mask=c_ok[:, None] & l_ok[None, :], other=0.0)
        x = tl.load(x_ptr + offs_c[:, None] * N + offs_n[None, :], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        s = _signed_grad(_mm(d, h, UPCAST, PRECISION) - x.to(tl.float32), g)
        acc += _mm(tl.trans(d), s.to(d.dtype), UPCAST, PRECISION)
    tl.store(out_ptr + h_off, acc, mask=l_ok[:, None] & n_ok[None, :])


@triton.jit
def _l1_grad_dec_kernel(x_ptr, codes_ptr, dec_ptr, grad_ptr, out_ptr, K, C, N, L,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    k = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_l = tl.arange(0, BLOCK_L)
    c_ok, l_ok = offs_c < C, offs_l < L
    d_off = k * C * L + offs_c[:, None] * L + offs_l[None, :]
    d = tl.load(dec_ptr + d_off, mask=c_ok[:, None] & l_ok[None, :], other=0.0)
    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        h = tl.load(codes_ptr + k * L * N + offs_l[:, None] * N + offs_n[None, :],
                    mask=l_ok[:, None] & n_ok[None, :], other=0.0)
        g = tl.load(grad_ptr + k * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs_c[:, None] * N + offs_n[None, :], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        s = _signed_grad(_mm(d, h, UPCAST, PRECISION) - x.to(tl.float32), g)
        acc += _mm(s.to(h.dtype), tl.trans(h), UPCAST, PRECISION)
    tl.store(out_ptr + d_off, acc, mask=c_ok[:, None] & l_ok[None, :])


@triton.jit
def _l1_grad_x_kernel(x_ptr, codes_ptr, dec_ptr, grad_ptr, out_ptr, K, C, N, L,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_l = tl.arange(0, BLOCK_L)
    n_ok, c_ok, l_ok = offs_n < N, offs_c < C, offs_l < L
    x_off = offs_c[:, None] * N + offs_n[None, :]
    x = tl.load(x_ptr + x_off, mask=c_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    # Pointers advance by one class per step (64-bit pointer arithmetic: no int32 overflow in k * C * L).
    d_ptrs = dec_ptr + offs_c[:, None] * L + offs_l[None, :]
    h_ptrs = codes_ptr + offs_l[:, None] * N + offs_n[None, :]
    g_ptrs = grad_ptr + offs_n
    for _ in range(0, K):
        d = tl.load(d_ptrs, mask=c_ok[:, None] & l_ok[None, :], other=0.0)
        h = tl.load(h_ptrs, mask=l_ok[:, None] & n_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=n_ok, other=0.0).to(tl.float32)
        acc -= _signed_grad(_mm(d, h, UPCAST, PRECISION) - x, g)
        d_ptrs += C * L
        h_ptrs += L * N
        g_ptrs += N
    tl.store(out_ptr + x_off, acc, mask=c_ok[:, None] & n_ok[None, :])


# Reasonable tiles for an H100/H200, not tuned on one (none was at hand when this was
# written); the first is the interpreter's. The autotuner measures them once per shape.
_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_C": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_C": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_C": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_C": 128}, num_warps=8, num_stages=3),
]
_KERNELS = {
    "forward": _l1_forward_kernel,
    "codes": _l1_grad_codes_kernel,
    "dec": _l1_grad_dec_kernel,
    "x": _l1_grad_x_kernel,
}
# Autotuned twins for compiled (GPU) runs; the interpreter and explicit tiles use the plain ones.
_TUNED = {} if interpreting() else {
    name: triton.autotune(configs=_CONFIGS, key=["K", "C", "N", "L", "BLOCK_L"])(fn) for name, fn in _KERNELS.items()
}


def _grid(name: str, k: int, c: int, n: int):
    def grid(meta: dict) -> tuple[int, int]:
        if name == "dec":
            return triton.cdiv(c, meta["BLOCK_C"]), k
        if name == "x":
            return triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(c, meta["BLOCK_C"])
        return triton.cdiv(n, meta["BLOCK_N"]), k

    return grid


def _launch(name: str, tensors: tuple[torch.Tensor, ...], blocks: tuple[int, int] | None) -> None:
    """Run one kernel on (x, codes, dec[, grad], out); blocks = (BLOCK_N, BLOCK_C) or the autotuner's."""
    x, codes, dec = tensors[:3]
    k, latent, n = codes.shape
    c = x.shape[0]
    fp32 = x.dtype == torch.float32
    consts = dict(
        BLOCK_L=max(16, triton.next_power_of_2(latent)),
        UPCAST=interpreting(),
        # Same contract as torch.matmul: float32 products in IEEE unless TF32 is allowed.
        PRECISION="ieee" if fp32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32",
    )
    if blocks is None and name in _TUNED:
        _TUNED[name][_grid(name, k, c, n)](*tensors, k, c, n, latent, **consts)
        return
    block_n, block_c = blocks or (BLOCK_N, BLOCK_C)
    meta = {"BLOCK_N": block_n, "BLOCK_C": block_c}
    _KERNELS[name][_grid(name, k, c, n)(meta)](*tensors, k, c, n, latent, **meta, **consts)


def triton_l1_supported(x: torch.Tensor, codes: torch.Tensor, dec: torch.Tensor) -> str | None:
    """None when the fused kernel can run these inputs, else the reason it cannot."""
    device_ok = all(t.is_cuda for t in (x, codes, dec)) or (interpreting() and x.device.type == "cpu")
    if not device_ok:
        return f"needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {x.device.type}"
    dtype = compute_dtype(x, codes, dec)
    if dtype not in SUPPORTED_DTYPES:
        return f"supports float32, bfloat16 and float16, got {dtype}"
    if codes.shape[1] > MAX_LATENT:
        return f"supports a last decoder input (latent) of at most {MAX_LATENT}, got {codes.shape[1]}"
    if x.shape[0] * x.shape[1] >= 2**31:
        return f"indexes x [C, N] with 32 bits, got {x.shape[0]} x {x.shape[1]}"
    return None


class TritonL1Distance(torch.autograd.Function):
    """d[k, n] = ||D_k h_k[:, n] - x[:, n]||_1 by the fused kernels; see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, dec: torch.Tensor, blocks: tuple[int, int] | None):
        dtype = compute_dtype(x, codes, dec)
        ctx.input_dtypes = (x.dtype, codes.dtype, dec.dtype)
        x, codes, dec = (t.to(dtype).contiguous() for t in (x, codes, dec))
        out = torch.empty(codes.shape[0], x.shape[1], dtype=torch.promote_types(dtype, torch.float32), device=x.device)
        _launch("forward", (x, codes, dec, out), blocks)
        ctx.save_for_backward(x, codes, dec)
        ctx.blocks = blocks
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, codes, dec = ctx.saved_tensors
        # g in the compute dtype, as the chunked path: s = +-g is then exact in a bf16 dot operand.
        grad = grad_out.to(x.dtype).contiguous()
        grads = []
        for name, like, dtype, needed in zip(("x", "codes", "dec"), (x, codes, dec), ctx.input_dtypes,
                                             ctx.needs_input_grad[:3]):
            if not needed:
                grads.append(None)
                continue
            out = torch.empty(like.shape, dtype=dtype, device=like.device)  # kernels accumulate in float32
            _launch(name, (x, codes, dec, grad, out), ctx.blocks)
            grads.append(out)
        return (*grads, None)


def triton_l1_distance(
    x: torch.Tensor, codes: torch.Tensor, dec: torch.Tensor, blocks: tuple[int, int] | None = None
) -> torch.Tensor:
    """L1 reconstruction error of every class at every pixel, [K, N], by the fused kernels.

    Args:
        x: features [C, N]; codes: [K, L, N]; dec: last decoder weights [K, C, L] (as
            `chunked_l1_distance`). Under autocast the kernels run in its dtype.
        blocks: (BLOCK_N, BLOCK_C) tiles, powers of two >= 16; None: the autotuner's on
            CUDA, 64 x 64 in the interpreter.
    """
    reason = triton_l1_supported(x, codes, dec)
    if reason:
        raise ConfigError(f"the fused L1 kernel (model.l1_kernel=triton) {reason}; use model.l1_kernel=auto or chunked")
    if blocks is not None and any(b < 16 or b & (b - 1) for b in blocks):
        raise ValueError(f"blocks must be powers of two >= 16, got {blocks}")
    return TritonL1Distance.apply(x, codes, dec, blocks)
