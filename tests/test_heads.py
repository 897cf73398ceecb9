"""Heads: the batched/chunked CSSR head equals the reference per-class loop, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cssr_dist.models import CSSRHead, LinearHead, chunked_l1_distance, l2_distance_closed_form, reference_cssr_logits
from cssr_dist.models.cssr_l1_function import CPU_CHUNK_BYTES, default_class_chunk


pytestmark = pytest.mark.usefixtures("one_torch_thread")


B, C, H, W, K, L = 2, 12, 3, 4, 7, 5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _head(dtype: torch.dtype, **kw) -> CSSRHead:
    torch.manual_seed(0)
    return CSSRHead(C, K, latent=L, **kw).to(dtype)


def _logits_and_grads(head: CSSRHead, x: torch.Tensor, weights: torch.Tensor, reference: bool):
    """Logits and d(sum(weights*logits))/d(x, every parameter), via the head or the reference loop."""
    x = x.detach().clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    if reference:
        feats = head.projection(x)
        logits = reference_cssr_logits(
            feats, list(head.encoders), list(head.decoders), sign=1 if head.scale > 0 else -1,
            gamma=abs(head.scale), distance=head.distance, clamp=head.clamp,
        )
    else:
        feats, logits = head(x)
    (logits * weights).sum().backward()
    grads = {"x": x.grad.clone()} | {n: p.grad.clone() for n, p in head.named_parameters()}
    return feats.detach(), logits.detach(), grads


@pytest.mark.parametrize("sign", [1, -1], ids=["rcssr", "pcssr"])
@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("projection_dim", [None, 10], ids=["noproj", "proj"])
@pytest.mark.parametrize("class_chunk", [None, 3])
def test_head_matches_reference_loop_float64(sign, distance, projection_dim, class_chunk):
    head = _head(torch.float64, sign=sign, distance=distance, projection_dim=projection_dim, class_chunk=class_chunk)
    torch.manual_seed(1)
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    weights = torch.randn(B, K, H, W, dtype=torch.float64)
    feats, out, grads = _logits_and_grads(head, x, weights, reference=False)
    _, ref, ref_grads = _logits_and_grads(head, x, weights, reference=True)
    assert out.shape == (B, K, H, W)
    assert feats.shape == (B, projection_dim or C, H, W)
    assert torch.all(torch.sign(out) == sign)  # rcssr logits are +distances, pcssr -distances
    assert rel_err(out, ref) < 1e-5
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_head_matches_reference_float32(distance):
    head = _head(torch.float32, sign=-1, distance=distance, class_chunk=2)
    torch.manual_seed(2)
    x, weights = torch.randn(B, C, H, W), torch.randn(B, K, H, W)
    _, out, grads = _logits_and_grads(head, x, weights, reference=False)
    _, ref, ref_grads = _logits_and_grads(head, x, weights, reference=True)
    assert rel_err(out, ref) < 1e-5
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 2e-4, name


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_hidden_layers_and_active_clamp_match_reference(distance):
    # A small clamp saturates part of the map: clamped entries must get zero gradient in both.
    head = _head(torch.float64, sign=1, distance=distance, hidden=(9, 6), clamp=0.9, gamma=0.1)
    torch.manual_seed(3)
    x, weights = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, K, H, W, dtype=torch.float64)
    _, out, grads = _logits_and_grads(head, x, weights, reference=False)
    _, ref, ref_grads = _logits_and_grads(head, x, weights, reference=True)
    assert [tuple(p.shape) for p in head.encoders] == [(K, 9, C), (K, 6, 9), (K, L, 6)]
    assert [tuple(p.shape) for p in head.decoders] == [(K, 6, L), (K, 9, 6), (K, C, 9)]
    assert 0 < (out == 0.9).sum() < out.numel()  # the clamp is active on some, not all
    assert rel_err(out, ref) < 1e-5
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


def test_chunked_l1_function_gradcheck():
    torch.manual_seed(4)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    dec = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: chunked_l1_distance(a, b, c, chunk=3), (x, codes, dec))
    expected = (torch.einsum("kcl,kln->kcn", dec, codes) - x).abs().sum(1)
    assert torch.allclose(chunked_l1_distance(x, codes, dec), expected)


def test_l2_closed_form_equals_direct_squared_norm():
    torch.manual_seed(5)
    f64 = torch.float64
    x, codes, dec = torch.randn(6, 5, dtype=f64), torch.randn(4, 3, 5, dtype=f64), torch.randn(4, 6, 3, dtype=f64)
    expected = (torch.einsum("kcl,kln->kcn", dec, codes) - x).square().sum(1)
    assert rel_err(l2_distance_closed_form(x, codes, dec), expected) < 1e-12


def _saved_numel(fn) -> int:
    """Elements autograd keeps for backward while `fn` runs (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_l1_and_l2_never_keep_the_full_reconstruction_for_backward():
    k, c, lat, b, hw = 40, 96, 2, 4, 64
    torch.manual_seed(6)
    x = torch.randn(b, c, 8, 8, requires_grad=True)
    full = b * k * c * hw  # the [B, K, C, HW] tensor a naive batched head would save
    for distance in ("l1", "l2"):
        head = CSSRHead(c, k, latent=lat, distance=distance, class_chunk=4)
        saved = _saved_numel(lambda: head(x))
        assert saved < 0.15 * full, (distance, saved, full)
    head = CSSRHead(c, k, latent=lat)
    loop_saved = _saved_numel(lambda: reference_cssr_logits(x, head.encoders[0], head.decoders[0]))
    assert loop_saved > full  # the reference loop does keep it: the test can tell the difference


def test_default_chunk_follows_byte_budget():
    cpu = torch.device("cpu")
    per_class = 512 * 64 * 49 * 4  # ImageNet scale: 6.4 MB per class
    chunk = default_class_chunk(1000, 512, 64 * 49, 4, cpu)
    assert chunk * per_class <= CPU_CHUNK_BYTES < (chunk + 1) * per_class
    assert default_class_chunk(1000, 2048, 64 * 49, 4, cpu) == 1  # never below one class
    assert default_class_chunk(10, 16, 8, 4, cpu) == 10  # tiny: all classes at once
    assert default_class_chunk(1000, 512, 49, 4, torch.device("meta")) == 1000


def test_head_under_cpu_bf16_autocast_is_close_to_fp32():
    head = _head(torch.float32, sign=-1, class_chunk=3)
    torch.manual_seed(7)
    x = torch.randn(B, C, H, W, requires_grad=True)
    _, ref = head(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, out = head(x)
    assert out.dtype == torch.float32
    assert rel_err(out.detach(), ref.detach()) < 2e-2
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad.dtype == torch.float32 for p in head.parameters())


def test_linear_head_is_scaled_1x1_conv_without_bias():
    torch.manual_seed(8)
    head = LinearHead(C, K, gamma=0.5)
    x = torch.randn(B, C, H, W)
    feats, logits = head(x)
    assert feats is x and head.classifier.bias is None
    assert torch.allclose(logits, 0.5 * F.conv2d(x, head.classifier.weight), atol=1e-6)
    head = LinearHead(C, K, projection_dim=6)
    feats, logits = head(x)
    conv, bn = head.projection[0], head.projection[1]
    assert conv.bias is None and feats.shape == (B, 6, H, W) and logits.shape == (B, K, H, W)
    assert torch.allclose(feats, F.leaky_relu(F.batch_norm(conv(x), None, None, training=True), 0.01), atol=1e-5)
    assert torch.allclose(logits, F.conv2d(feats, head.classifier.weight), atol=1e-5)


def test_bad_head_arguments_raise():
    with pytest.raises(ValueError, match="sign"):
        CSSRHead(C, K, sign=0)
    with pytest.raises(ValueError, match="distance"):
        CSSRHead(C, K, distance="cos")
