"""Fused Triton L1 kernel, run by Triton's CPU interpreter: same values and gradients as the
chunked path and the reference loop, at odd sizes that exercise every mask.

TRITON_INTERPRET is set before the kernel module is imported: Triton decides when a kernel
is decorated whether it is compiled or interpreted (the module is re-imported if an earlier
test imported it without the interpreter).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import cssr_dist.models.cssr_l1_triton as fused  # noqa: E402
from cssr_dist.errors import ConfigError  # noqa: E402
from cssr_dist.models import CSSRHead, reference_cssr_logits  # noqa: E402
from cssr_dist.models import cssr_l1_function as l1  # noqa: E402

if type(fused._l1_forward_kernel).__name__ != "InterpretedFunction":
    fused = importlib.reload(sys.modules["cssr_dist.models.cssr_l1_triton"])


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    """One intra-op thread (2-core box); TRITON_INTERPRET restored for later modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(c: int, n: int, k: int, latent: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c, n, generator=g).to(dtype)
    codes = torch.randn(k, latent, n, generator=g).tanh().to(dtype)
    dec = (torch.randn(k, c, latent, generator=g) / latent**0.5).to(dtype)
    weights = torch.randn(k, n, generator=g)
    return x, codes, dec, weights


def value_and_grads(fn, x, codes, dec, weights, dtype=None):
    """fn(x, codes, dec) and d(sum(weights * fn))/d(x, codes, dec), inputs cast to `dtype`."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, codes, dec)]
    out = fn(*leaves)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), [t.grad for t in leaves]


# (C, N, K, L, tiles): C, N and L are never multiples of a tile, so every load and store is
# masked at its tail; L=5 / 20 / 33 pad to 16 / 32 / 64; 16x16 tiles give several tiles per axis.
ODD_SIZES = [(37, 45, 3, 5, (16, 16)), (70, 33, 2, 20, (32, 16)), (19, 50, 2, 33, None)]


@pytest.mark.parametrize("c,n,k,latent,tiles", ODD_SIZES, ids=["L5-16x16", "L20-32x16", "L33-default"])
def test_fused_matches_chunked_and_exact_in_float32(c, n, k, latent, tiles):
    x, codes, dec, weights = inputs(c, n, k, latent, torch.float32)
    out, grads = value_and_grads(lambda *t: fused.triton_l1_distance(*t, blocks=tiles), x, codes, dec, weights)
    chunk_out, chunk_grads = value_and_grads(lambda *t: l1.chunked_l1_distance(*t, chunk=2), x, codes, dec, weights)
    exact, exact_grads = value_and_grads(l1.chunked_l1_distance, x, codes, dec, weights.double(), torch.float64)
    assert out.dtype == torch.float32 and out.shape == (k, n)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    assert rel_err(out, exact) < 1e-6 and rel_err(out, chunk_out) < 1e-5
    for name, g, cg, eg in zip(("x", "codes", "dec"), grads, chunk_grads, exact_grads):
        assert rel_err(g, eg) < 1e-5, name
        assert rel_err(g, cg) < 2e-4, name


def test_fused_bf16_inputs_are_exact_products_with_float32_sums():
    """bf16 x bf16 products are exact in float32: the forward must equal float64 arithmetic on
    the same bf16 values; gradients are rounded once, to bf16, when stored."""
    c, n, k, latent = 37, 45, 3, 5
    x, codes, dec, weights = inputs(c, n, k, latent, torch.bfloat16, seed=1)
    out, grads = value_and_grads(lambda *t: fused.triton_l1_distance(*t, blocks=(16, 32)), x, codes, dec, weights)
    # The reference sees the same bf16-rounded g as the kernel (and as the chunked path).
    exact, exact_grads = value_and_grads(l1.chunked_l1_distance, x, codes, dec,
                                         weights.bfloat16().double(), torch.float64)
    chunk_out, chunk_grads = value_and_grads(l1.chunked_l1_distance, x, codes, dec, weights)
    assert out.dtype == torch.float32 and [g.dtype for g in grads] == [torch.bfloat16] * 3
    assert rel_err(out, exact) < 1e-6
    assert rel_err(chunk_out, exact) < 2e-2  # the chunked path rounds D h - x to bf16: looser
    for name, g, eg, cg in zip(("x", "codes", "dec"), grads, exact_grads, chunk_grads):
        assert rel_err(g, eg) < 5e-3, name  # bf16 rounding of the stored gradient (2^-9)
        # The chunked path's bf16 residual flips some signs: a few % off, never closer than ours.
        assert rel_err(g, eg) <= rel_err(cg, eg) < 6e-2, name


def test_fused_under_autocast_matches_chunked_under_autocast():
    x, codes, dec, weights = inputs(40, 36, 4, 16, torch.float32, seed=2)

    def under_autocast(fn):
        def run(*t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*t)
        return run

    out, grads = value_and_grads(under_autocast(fused.triton_l1_distance), x, codes, dec, weights)
    chunk_out, chunk_grads = value_and_grads(under_autocast(l1.chunked_l1_distance), x, codes, dec, weights)
    # Autocast rounds the inputs and g to bf16; after that the kernel's arithmetic is exact
    # products with float32 sums, stored in the inputs' float32.
    rounded = [t.bfloat16() for t in (x, codes, dec)]
    exact, exact_grads = value_and_grads(l1.chunked_l1_distance, *rounded, weights.bfloat16().double(), torch.float64)
    assert out.dtype == torch.float32 and [g.dtype for g in grads] == [torch.float32] * 3
    assert rel_err(out, exact) < 1e-6 and rel_err(out, chunk_out) < 2e-2
    for name, g, cg, eg in zip(("x", "codes", "dec"), grads, chunk_grads, exact_grads):
        assert rel_err(g, eg) < 1e-5, name
        assert rel_err(g, cg) < 6e-2, name  # the chunked path's bf16 residual flips some signs


def test_head_with_fused_kernel_matches_reference_loop():
    """Whole head in float32: projection, a hidden layer and an active clamp around the kernel."""
    b, c, h, w, k, latent = 2, 21, 3, 5, 4, 6
    torch.manual_seed(3)
    head = CSSRHead(c, k, latent=latent, hidden=(9,), projection_dim=17, clamp=0.7, sign=-1, l1_kernel="triton")
    x = torch.randn(b, c, h, w)
    weights = torch.randn(b, k, h, w)
    results = []
    for reference in (False, True):
        xg = x.clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        if reference:
            feats = head.projection(xg)
            logits = reference_cssr_logits(feats, list(head.encoders), list(head.decoders), sign=-1, gamma=0.1,
                                           clamp=0.7)
        else:
            _, logits = head(xg)
        (logits * weights).sum().backward()
        results.append((logits.detach(), {"x": xg.grad} | {n: p.grad.clone() for n, p in head.named_parameters()}))
    (out, grads), (ref, ref_grads) = results
    assert 0 < (out == -0.7).sum() < out.numel()  # the clamp is active on some entries only
    assert rel_err(out, ref) < 1e-5
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 2e-4, name


def test_backward_runs_only_the_kernels_it_needs(monkeypatch):
    """A frozen backbone without projection gives x no gradient: the grad-x kernel (K recomputes) is skipped."""
    launched = []
    launch = fused._launch
    monkeypatch.setattr(fused, "_launch", lambda name, *a: (launched.append(name), launch(name, *a))[1])
    x, codes, dec, weights = inputs(20, 18, 2, 4, torch.float32, seed=4)
    codes.requires_grad_()
    dec.requires_grad_()
    out = fused.triton_l1_distance(x, codes, dec)
    (out * weights).sum().backward()
    assert launched == ["forward", "codes", "dec"]
    _, (_, codes_grad, dec_grad) = value_and_grads(l1.chunked_l1_distance, x, codes, dec, weights)
    assert rel_err(codes.grad, codes_grad) < 1e-5 and rel_err(dec.grad, dec_grad) < 1e-5


def test_fused_keeps_only_its_inputs_for_backward():
    x, codes, dec, _ = inputs(30, 20, 5, 4, torch.float32)
    x.requires_grad_()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused.triton_l1_distance(x, codes, dec)
    assert sum(seen.values()) == x.numel() + codes.numel() + dec.numel()  # no [K, C, N] residual


def test_auto_picks_fused_on_cuda_as_measured_and_chunked_off_cuda(monkeypatch):
    x = torch.randn(3, 2)
    assert l1.FUSED_L1_IS_FASTER_ON_CUDA is True  # H200 measurement, 2026-12-04 (docs/benchmarks/head.md)
    assert not l1.uses_fused_l1("auto", x)  # CPU tensors: chunked whatever the constant says
    assert not l1.uses_fused_l1("chunked", x)
    assert l1.uses_fused_l1("triton", x)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(l1, "_TRITON_INSTALLED", True)
    assert l1.uses_fused_l1("auto", x)
    monkeypatch.setattr(l1, "FUSED_L1_IS_FASTER_ON_CUDA", False)
    assert not l1.uses_fused_l1("auto", x)
    with pytest.raises(ValueError, match="l1_kernel"):
        l1.uses_fused_l1("fast", x)
    with pytest.raises(ValueError, match="l1_kernel"):
        CSSRHead(8, 3, l1_kernel="fast")
    # The default head on CPU never reaches the fused kernel.
    monkeypatch.setattr(fused, "triton_l1_distance", lambda *a, **kw: pytest.fail("fused kernel called"))
    _, logits = CSSRHead(8, 3, latent=4)(torch.randn(1, 8, 2, 2))
    assert logits.shape == (1, 3, 2, 2)


def test_forced_fused_kernel_rejects_what_it_cannot_run(monkeypatch):
    x, codes, dec, _ = inputs(8, 6, 2, 4, torch.float32)
    with pytest.raises(ConfigError, match="float64.*model.l1_kernel=auto"):
        fused.triton_l1_distance(x.double(), codes.double(), dec.double())
    big = torch.zeros(2, fused.MAX_LATENT + 1, 6)
    with pytest.raises(ConfigError, match=f"at most {fused.MAX_LATENT}"):
        fused.triton_l1_distance(x, big, torch.zeros(2, 8, fused.MAX_LATENT + 1))
    with pytest.raises(ValueError, match="powers of two"):
        fused.triton_l1_distance(x, codes, dec, blocks=(16, 24))
    monkeypatch.setattr(fused, "interpreting", lambda: False)
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        CSSRHead(8, 2, latent=4, l1_kernel="triton")(torch.randn(1, 8, 2, 3))


# Run in a fresh process: there the kernels are compiled for CUDA (or interpreted on CPU,
# which proves this script on machines without a GPU). Odd sizes, both tile choices (fixed
# 16x16 and, on CUDA, the autotuner's), float32 and bfloat16, against the chunked path in
# float64 on the same (rounded) values.
COMPILED_CHECK = """
import sys, torch
from cssr_dist.models.cssr_l1_function import chunked_l1_distance
from cssr_dist.models.cssr_l1_triton import triton_l1_distance
device = torch.device(sys.argv[1])
def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
for dtype, out_tol, grad_tol in ((torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 5e-3)):
    for blocks in ((16, 16), None):
        g = torch.Generator().manual_seed(0)
        c, n, k, latent = 37, 45, 3, 5
        base = [torch.randn(c, n, generator=g), torch.randn(k, latent, n, generator=g).tanh(),
                torch.randn(k, c, latent, generator=g) / latent**0.5]
        weights = torch.randn(k, n, generator=g).to(device)
        leaves = [t.to(device, dtype).requires_grad_() for t in base]
        out = triton_l1_distance(*leaves, blocks=blocks)
        (out * weights).sum().backward()
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref = chunked_l1_distance(*ref_leaves)
        (ref * weights.to(dtype).double()).sum().backward()
        errs = [rel(out, ref)] + [rel(a.grad, b.grad) for a, b in zip(leaves, ref_leaves)]
        print(dtype, blocks, errs)
        assert errs[0] < out_tol and max(errs[1:]) < grad_tol, (dtype, blocks, errs)
print("compiled check ok")
"""


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_kernels_in_a_fresh_process(device, tmp_path):
    """On CUDA: the compiled kernels (not the interpreter) equal float64 arithmetic."""
    import subprocess

    from tests.helpers import ROOT, test_env

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the compiled kernels are checked on a GPU machine")
    env = test_env(tmp_path)
    env.pop("TRITON_INTERPRET", None)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", COMPILED_CHECK, device], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled check ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]
