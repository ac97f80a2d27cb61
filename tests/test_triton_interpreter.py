"""vmoba's Triton kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter runs the kernels' own code (the keyed backend's row lists, atomics and masks;
the fused selection's bitwise searches) as NumPy, so the algorithms are checked without a GPU;
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
    from vmoba import KernelOptions, keyed
    from vmoba.reference import reference_attention

    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    B, C, V, H, D = 2, 3, 256, 2, 16  # two key tiles per block
    L = C * V
    options = KernelOptions(keyed_scan=64)  # the row lists' compaction in many steps
    valid = torch.rand(L) > 0.1  # padded slots: keys masked, queries never picked
    sel = (torch.rand(B, H, L, C) < 0.4) | (torch.arange(L)[:, None] // V == torch.arange(C))
    sel[0, 1, :, 2], sel[0, 1, 2 * V :, 0] = False, True  # a key block nobody picked (its rows pick 0)
    inputs = [torch.randn(B, L, H, D, dtype=torch.float16, requires_grad=True) for _ in range(3)]
    out = keyed.keyed_attention(*inputs, sel, V, valid, options=options)
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

ROW_LISTS = """
    import torch
    from vmoba import keyed

    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    B, H, C, V = 2, 3, 5, 64
    L = C * V
    valid = torch.rand(L) > 0.2
    for sel, rows_per_block in [(torch.rand(B, H, L, C) < 0.3, 1), (torch.rand(B, H, C, C) < 0.5, V)]:
        sel[0, 0, :, 1] = False  # a block nobody picked: an empty list
        starts, rows = keyed.row_lists(sel, valid, V, scan=64)  # the compaction in many steps
        per_token = sel.repeat_interleave(rows_per_block, dim=2) & valid[:, None]  # [B, H, L, C]
        want = [torch.nonzero(column).flatten() for column in per_token.transpose(2, 3).reshape(-1, L)]
        counts = torch.tensor([len(w) for w in want])
        assert torch.equal(starts, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
        assert torch.equal(rows[: int(starts[-1])].long(), torch.cat(want))
        # The same pass without the bit columns (the statistics' per-block counts).
        assert torch.equal(keyed.column_counts(per_token, valid).flatten().long(), counts)
"""

ROW_MAX = """
    import torch
    from vmoba import keyed
    from vmoba.reference import token_mask

    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    B, C, V, H, D = 1, 3, 128, 2, 32
    L = C * V
    valid = torch.rand(L) > 0.1
    sel = (torch.rand(B, H, L, C) < 0.5) | (torch.arange(L)[:, None] // V == torch.arange(C))
    qb, kb, vb = (torch.randn(B, L, H, D, dtype=torch.float16) * valid[:, None, None] for _ in range(3))
    starts, rows = keyed.row_lists(sel, valid, V)
    mask = token_mask(sel, V, valid) & valid[:, None]  # [B, H, L, L], padded query rows empty
    logits = torch.einsum("bqhd,bkhd->bhqk", qb.double(), kb.double()) * D**-0.5 * 1.4426950408889634
    true_max = logits.masked_fill(~mask, -torch.inf).amax(-1)  # [B, H, L], log2 units
    picked = mask.any(-1)
    offsets, usable = keyed.row_offsets(qb, kb)
    assert not bool(usable), "fp16 keeps the exact row max"
    assert (offsets.double()[picked] >= true_max[picked] - 1e-3).all(), "the norm bound is an upper bound"
    acc, row_sum = torch.zeros(qb.shape), torch.zeros(B, H, L)
    for skip in (True, False):
        stat = torch.full((B, H, L), -torch.inf)
        keyed._launch(0, qb, kb, vb, acc, stat, row_sum, starts, rows, valid.view(torch.uint8), skip=torch.tensor(skip))
        if skip:  # the pass ran no tiles
            assert (stat == -torch.inf).all()
        else:
            assert torch.allclose(stat.double()[picked], true_max[picked], atol=1e-3), "exact row max"
"""

SELECT = """
    import torch
    from vmoba import selection

    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    for B, H, R, C, V, k, tau in [(2, 3, 40, 10, 4, 4, 0.25), (1, 2, 64, 16, 4, 1, 0.6), (1, 1, 30, 5, 6, 9, 1.0)]:
        scores = torch.randn(B, H, R, C)
        ties = scores.clone()
        ties[0, 0] = (ties[0, 0] * 2).round() / 2  # many ties, and -0.0 next to 0.0
        ties[-1, -1, : R // 2] = 0.5  # whole rows of ties
        row_valid = torch.rand(R) > 0.2
        args = dict(scope="query", threshold=tau, topk=k)
        # Top-k: exactly the sort's picks, ties included.
        sort = selection.select_from_scores(ties, row_valid, V, selection="topk", **args)
        fused = selection._fused_select(ties, row_valid, V, "topk", tau, min(k, C) - 1)
        assert torch.equal(fused, sort), ("topk", B, H, R, C, k, (fused != sort).sum())
        # Threshold: the sort's picks up to a block at a cut within rounding of `need` (continuous scores
        # make that rare), and exactly on whole rows of ties.
        sort = selection.select_from_scores(scores, row_valid, V, selection="threshold", **args)
        fused = selection._fused_select(scores, row_valid, V, "threshold", tau, 0)
        differ = (fused != sort).sum(-1)
        assert differ.max() <= 1 and (differ > 0).sum() <= 1, ("threshold", B, H, R, C, tau, differ.sum())
        flat = ties[-1:, -1:, : R // 2]
        sort = selection.select_from_scores(flat, row_valid[: R // 2], V, selection="threshold", **args)
        assert torch.equal(selection._fused_select(flat, row_valid[: R // 2], V, "threshold", tau, 0), sort)
    # A tie group across the cut: need = 0.5 - 0.1 / 4.1; 1.0 and the first two 0.7s reach it.
    row = torch.tensor([[[[0.1, 1.0, 0.7, 0.7, 0.7, 0.7, 0.0, 0.2]]]])
    args = dict(selection="threshold", scope="query", threshold=0.5, topk=1)
    want = torch.tensor([[[[True, True, True, True, False, False, False, False]]]])
    assert torch.equal(selection.select_from_scores(row, torch.ones(1, dtype=torch.bool), 8, **args), want)
    assert torch.equal(selection._fused_select(row, torch.ones(1, dtype=torch.bool), 8, "threshold", 0.5, 0), want)
    # The own block alone passes tau (need = 0): only the best other block, the lower of two tied ones.
    row = torch.tensor([[[[1.0, 0.5, 0.9, 0.9, 0.0]]]])
    args["threshold"] = 0.1
    want = torch.tensor([[[[True, False, True, False, False]]]])
    assert torch.equal(selection.select_from_scores(row, torch.ones(1, dtype=torch.bool), 5, **args), want)
    assert torch.equal(selection._fused_select(row, torch.ones(1, dtype=torch.bool), 5, "threshold", 0.1, 0), want)
"""


@pytest.mark.parametrize(
    "script",
    [KEYED, ROW_LISTS, ROW_MAX, SELECT],
    ids=[
        "keyed_attention_vs_fp64",
        "keyed_row_lists_vs_nonzero",
        "keyed_row_max_or_bound",
        "fused_selection_vs_sort",
    ],
)
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
