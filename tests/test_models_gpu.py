"""Model-side kernels on a GPU: the fused (compiled) Wan RoPE against a float64 reference."""

import pytest
import torch

from models.attention import _wan_rope, wan_rope

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("length", [4096, 9000])  # two lengths: the second compile is shape-dynamic
def test_fused_wan_rope_matches_float64_forward_and_backward(length):
    x = torch.randn(2, length, 12, 128, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(1, length, 1, 64, device="cuda") * 100  # Wan's angles reach ~100 rad
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    grad_out = torch.randn_like(x)

    def fwd_bwd(fn, dtype):
        leaf = x.to(dtype).requires_grad_()
        out = fn(leaf, cos.to(dtype), sin.to(dtype))
        return out, torch.autograd.grad(out, leaf, grad_out.to(dtype))[0]

    ref = fwd_bwd(_wan_rope, torch.float64)
    fused = fwd_bwd(wan_rope, torch.bfloat16)
    eager = fwd_bwd(_wan_rope, torch.bfloat16)
    for got, base, want in zip(fused, eager, ref):
        assert got.dtype == torch.bfloat16
        err, base_err = ((t.double() - want).abs().max().item() for t in (got, base))
        # bf16 rounding of the output is the only error source: the fused kernel is as accurate as eager.
        assert err <= 2 * base_err + 1e-3, (err, base_err)
        assert err < 0.05 * want.abs().max().item()
