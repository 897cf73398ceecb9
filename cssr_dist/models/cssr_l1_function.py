"""Chunked L1 reconstruction error of K class decoders, with recomputation in backward.

The CSSR head needs, for every class k and pixel n,

    d[k, n] = || D_k h_k[:, n] - x[:, n] ||_1          (D_k: C x L, h_k[:, n]: L, x[:, n]: C)

Evaluating all classes at once materialises a [K, C, N] tensor (N = B*H*W): 6.4 GB at
ImageNet scale (K=1000, C=512, N=64*49), and autograd would keep it for backward. A Python
loop over classes keeps each class's [C, N] working set in cache (fast) but autograd still
stores one residual per class (the same 6.4 GB in total).

This function walks the classes in CHUNKS of `chunk` classes. Each chunk computes the
decoder output into one reused [m, C, N] buffer (a few classes on CPU), subtracts x,
takes |.| in place and reduces it to [m, N]. Only the inputs (x, codes h, decoder
weights D) are saved; the backward pass recomputes each chunk's residual and turns it in
place into the gradient sign(r) * g, from which it forms the gradients of x, h and D.
Beyond inputs and gradients, peak memory is one chunk's buffer whatever K is; the extra
cost is one recomputed decoder product (still ~3-4x faster than the loop on CPU, see
docs/benchmarks/head.md).

Layout: x is [C, N] (channels first, pixels flattened), h is [K, L, N], D is [K, C, L], so
that every chunk is a contiguous slice and all products are plain batched GEMMs.

`l1_distance` is the one entry the head calls: it picks this chunked path or the fused
Triton kernels of `cssr_l1_triton` (same function, residual kept in registers) by the
head's `l1_kernel` setting; see `FUSED_L1_IS_FASTER_ON_CUDA` for what `auto` does.
"""

from __future__ import annotations

import importlib.util

import torch

from .compute_dtype import compute_dtype

__all__ = ["FUSED_L1_IS_FASTER_ON_CUDA", "L1_KERNELS", "chunked_l1_distance", "default_class_chunk", "l1_distance",
           "uses_fused_l1"]

L1_KERNELS = ("auto", "chunked", "triton")
# What `l1_kernel="auto"` picks on CUDA with Triton installed: the fused kernel when True,
# the chunked path when False. Measured on an H200 (2026-12-04, K=1000, latent 16, B=64, 7x7,
# bf16, forward + backward; `python -m benchmarks.bench_head --device cuda --dtype bf16`,
# docs/benchmarks/head.md): fused 17 ms vs chunked 94 ms at C=2048, 5 ms vs 24 ms at C=512,
# so the fused kernel is the default there. Flipping this constant is the whole switch.
# Off CUDA `auto` is always chunked.
FUSED_L1_IS_FASTER_ON_CUDA = True
# Looked up, not imported: importing triton takes seconds and fixes its kernels as compiled or interpreted.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

# Bytes of one chunk's [m, C, N] residual. On CPU a few classes per chunk (up to ~50 MB)
# ran equally fast and 32 classes (200 MB) 30% slower on the dev box (docs/benchmarks/
# head.md); on an accelerator larger chunks amortise kernel launches, memory stays bounded.
CPU_CHUNK_BYTES = 16 * 2**20
ACCELERATOR_CHUNK_BYTES = 256 * 2**20


def default_class_chunk(num_classes: int, channels: int, pixels: int, element_size: int, device: torch.device) -> int:
    """Classes per chunk so that one chunk's [m, C, N] residual fits the byte budget."""
    budget = CPU_CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
    per_class = max(1, channels * pixels * element_size)
    return int(min(num_classes, max(1, budget // per_class)))


class ChunkedL1Distance(torch.autograd.Function):
    """d[k, n] = ||D_k h_k[:, n] - x[:, n]||_1 ; see the module docstring.

    One [chunk, C, N] buffer is allocated per call and reused by every chunk: a fresh
    multi-MB tensor per chunk would be page-faulted (zeroed by the kernel) every time,
    which on CPU cost as much as the arithmetic. All elementwise steps run in place.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, dec: torch.Tensor, chunk: int) -> torch.Tensor:
        dtype = compute_dtype(x, codes, dec)
        # The sum over C is accumulated in at least float32 (C terms of bf16 would lose ~8 bits).
        out_dtype = torch.promote_types(dtype, torch.float32)
        ctx.input_dtypes = (x.dtype, codes.dtype, dec.dtype)
        x, codes, dec = x.to(dtype), codes.to(dtype), dec.to(dtype)
        num_classes, channels, pixels = codes.shape[0], x.shape[0], x.shape[1]
        chunk = max(1, min(chunk, num_classes))
        out = torch.empty(num_classes, pixels, dtype=out_dtype, device=x.device)
        buf = torch.empty(chunk, channels, pixels, dtype=dtype, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for k0 in range(0, num_classes, chunk):
                k1 = min(k0 + chunk, num_classes)
                r = buf[: k1 - k0]
                torch.bmm(dec[k0:k1], codes[k0:k1], out=r)
                r.sub_(x).abs_()
                torch.sum(r, dim=1, dtype=out_dtype, out=out[k0:k1])
        ctx.save_for_backward(x, codes, dec)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, codes, dec = ctx.saved_tensors
        need_x, need_codes, need_dec = ctx.needs_input_grad[:3]
        chunk, num_classes = ctx.chunk, codes.shape[0]
        grad_out = grad_out.to(x.dtype)
        # grad_x sums K terms: accumulate in float32 even when the chunks run in bf16/fp16.
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        grad_x = torch.zeros_like(x, dtype=acc_dtype) if need_x else None
        grad_codes = torch.empty_like(codes) if need_codes else None
        grad_dec = torch.empty_like(dec) if need_dec else None
        buf = torch.empty(chunk, *x.shape, dtype=x.dtype, device=x.device)
        class_sum = torch.empty_like(x, dtype=acc_dtype) if need_x and chunk > 1 else None
        with torch.autocast(x.device.type, enabled=False):
            for k0 in range(0, num_classes, chunk):
                k1 = min(k0 + chunk, num_classes)
                # Recompute the residual and turn it in place into dL/d(Dh) = sign(r) * g.
                g = buf[: k1 - k0]
                torch.bmm(dec[k0:k1], codes[k0:k1], out=g)
                g.sub_(x).sign_().mul_(grad_out[k0:k1].unsqueeze(1))
                if need_x:
                    grad_x.sub_(g[0] if k1 - k0 == 1 else torch.sum(g, dim=0, dtype=acc_dtype, out=class_sum))
                if need_codes:
                    torch.bmm(dec[k0:k1].transpose(1, 2), g, out=grad_codes[k0:k1])
                if need_dec:
                    torch.bmm(g, codes[k0:k1].transpose(1, 2), out=grad_dec[k0:k1])
        x_dt, codes_dt, dec_dt = ctx.input_dtypes
        return (
            None if grad_x is None else grad_x.to(x_dt),
            None if grad_codes is None else grad_codes.to(codes_dt),
            None if grad_dec is None else grad_dec.to(dec_dt),
            None,
        )


def chunked_l1_distance(
    x: torch.Tensor, codes: torch.Tensor, dec: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """L1 reconstruction error of every class at every pixel, [K, N].

    Args:
        x: features [C, N] (channels first, pixels flattened).
        codes: last hidden activations of each class's decoder input, [K, L, N].
        dec: last decoder layer weights, [K, C, L].
        chunk: classes per chunk; None picks one from a byte budget (see `default_class_chunk`).
    """
    if chunk is None:
        element_size = torch.empty((), dtype=compute_dtype(x, codes, dec)).element_size()
        chunk = default_class_chunk(codes.shape[0], x.shape[0], x.shape[1], element_size, x.device)
    return ChunkedL1Distance.apply(x, codes, dec, int(chunk))


def uses_fused_l1(kernel: str, x: torch.Tensor) -> bool:
    """Whether `l1_distance(..., kernel=kernel)` on `x` runs the fused Triton kernels."""
    if kernel not in L1_KERNELS:
        raise ValueError(f"l1_kernel must be one of {L1_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return FUSED_L1_IS_FASTER_ON_CUDA and _TRITON_INSTALLED and x.is_cuda
    return kernel == "triton"


def l1_distance(
    x: torch.Tensor, codes: torch.Tensor, dec: torch.Tensor, chunk: int | None = None, kernel: str = "auto"
) -> torch.Tensor:
    """[K, N] L1 reconstruction errors by the chunked path or the fused Triton kernels.

    kernel: "chunked", "triton" (fused; CUDA, or TRITON_INTERPRET=1 on CPU; a clear
    ConfigError otherwise) or "auto" (see `FUSED_L1_IS_FASTER_ON_CUDA`). `chunk` only
    matters to the chunked path.
    """
    if uses_fused_l1(kernel, x):
        # start-up time: triton takes seconds to import and is only needed on this path
        from .cssr_l1_triton import triton_l1_distance, triton_l1_supported

        if kernel == "triton" or triton_l1_supported(x, codes, dec) is None:
            return triton_l1_distance(x, codes, dec)
    return chunked_l1_distance(x, codes, dec, chunk)
