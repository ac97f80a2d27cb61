"""vmoba's Triton kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter runs the kernels' own code (the keyed backend's scan, ring buffer, atomics and masks;
the fused top-k's bitwise search) as NumPy, so the algorithms are checked without a GPU;
tests/test_vmoba_gpu.py checks the compiled kernels. Each check runs in a subprocess: Triton reads
TRITON_INTERPRET when a kernel is first defined.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

KEYED = """
    import torch
    from vmoba import keyed
    from vmoba.reference import reference_attention

    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    B, C, V, H, D = 2, 3, 256, 2, 16  # two key tiles per block
    L = C * V
    valid = torch.rand(L) > 0.1  # padded slots: keys masked, queries never picked
    sel = (torch.rand(B, H, L, C) < 0.4) | (torch.arange(L)[:, None] // V == torch.arange(C))
    sel[0, 1, :, 2], sel[0, 1, 2 * V :, 0] = False, True  # a key block nobody picked (its rows pick 0)
    inputs = [torch.randn(B, L, H, D, dtype=torch.float16, requires_grad=True) for _ in range(3)]
    out = keyed.keyed_attention(*inputs, sel, V, valid)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference_attention(*exact, sel, V, valid) * valid[:, None, None]
    grad = torch.randn_like(ref) * valid[:, None, None]
    ref.backward(grad)
    out.backward(grad.half())
    errors = [(out.double() - ref).abs().max().item()]
    errors += [(t.grad.double() - e.grad).abs().max().item() for t, e in zip(inputs, exact)]
    assert (out[:, ~valid] == 0).all(), "padded query slots must be zero"
    assert (inputs[1].grad[0, 2 * V :, 1] == 0).all(), "an unpicked key block gets no gradient"
    assert max(errors) < 4e-3, errors
"""

TOPK = """
    import torch
    from vmoba import selection

    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    for B, H, R, C, V, k in [(2, 3, 40, 10, 4, 4), (1, 2, 64, 16, 4, 1), (1, 1, 30, 5, 6, 9)]:
        scores = torch.randn(B, H, R, C)
        scores[0, 0] = (scores[0, 0] * 2).round() / 2  # many ties, and -0.0 next to 0.0
        scores[-1, -1, : R // 2] = 0.5  # whole rows of ties
        row_valid = torch.rand(R) > 0.2
        args = dict(selection="topk", scope="query", threshold=0.25, topk=k)
        sort = selection.select_from_scores(scores, row_valid, V, **args)
        fused = selection._fused_topk(scores, row_valid, V, min(k, C) - 1)
        assert torch.equal(fused, sort), (B, H, R, C, k, (fused != sort).sum())
"""


@pytest.mark.parametrize("script", [KEYED, TOPK], ids=["keyed_attention_vs_fp64", "fused_topk_vs_sort"])
def test_triton_kernel_in_the_interpreter(script):
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
