"""Theoretical FLOPs of full attention vs VMoBA for a Wan-2.1-shaped DiT at a given video size.

Counts matrix products only (2 FLOPs per multiply-add), per transformer block: self-attention projections
(q, k, v, o), attention scores and weighted sum (4 L^2 D_model dense; times the density for VMoBA), the
VMoBA gate (query-to-block-mean scores: 2 L C D_model at token granularity, 2 C^2 D_model at block),
cross-attention to the text tokens, and the feed-forward network. Training = 3x the forward FLOPs
(backward ~2x), so the ratios are the same for both. The paper reports 2.92x for 93x576x1024.

Example:
    python scripts/flops.py --frames 93 --height 576 --width 1024 --density 0.25
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=93, help="video frames (default 93)")
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--vae-stride", type=int, nargs=3, default=[4, 8, 8], help="VAE compression (t, h, w)")
    p.add_argument("--patch", type=int, nargs=3, default=[1, 2, 2], help="transformer patch size (t, h, w)")
    p.add_argument("--layers", type=int, default=30, help="Wan-2.1-1.3B: 30")
    p.add_argument("--dim", type=int, default=1536, help="model width (Wan-2.1-1.3B: 1536)")
    p.add_argument("--ffn-dim", type=int, default=8960, help="feed-forward width (Wan-2.1-1.3B: 8960)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--density", type=float, default=0.25, help="fraction of (query, key) pairs VMoBA attends")
    p.add_argument(
        "--block-tokens", type=int, default=128, help="tokens per VMoBA block (sets the gate cost)"
    )
    p.add_argument("--granularity", choices=["token", "block"], default="token")
    return p.parse_args(argv)


def latent_tokens(args) -> tuple[tuple[int, int, int], int]:
    """(T, H, W) token grid after the VAE (causal in time: 1 + (F - 1) / st) and patching, and T*H*W."""
    st, sh, sw = args.vae_stride
    pt, ph, pw = args.patch
    grid = ((1 + (args.frames - 1) // st) // pt, args.height // sh // ph, args.width // sw // pw)
    return grid, grid[0] * grid[1] * grid[2]


def block_flops(L: int, args, density: float | None) -> dict[str, float]:
    """Forward FLOPs of one transformer block by part; density None = full attention."""
    d, S = args.dim, args.text_tokens
    parts = {
        "self-attn projections": 4 * 2 * L * d * d,
        "self-attn scores+values": 4 * L * L * d * (1.0 if density is None else density),
        "cross-attn": 2 * 2 * L * d * d + 2 * 2 * S * d * d + 4 * L * S * d,
        "ffn": 2 * 2 * L * d * args.ffn_dim,
    }
    if density is not None:
        C = -(-L // args.block_tokens)
        parts["vmoba gate"] = 2 * (L if args.granularity == "token" else C) * C * d
    return parts


def main(argv=None):
    args = parse_args(argv)
    grid, L = latent_tokens(args)
    full = block_flops(L, args, None)
    sparse = block_flops(L, args, args.density)
    total_full, total_sparse = (sum(p.values()) * args.layers for p in (full, sparse))
    attn_full = full["self-attn scores+values"]
    attn_sparse = sparse["self-attn scores+values"] + sparse["vmoba gate"]
    print(f"video {args.frames}x{args.height}x{args.width} -> latent tokens {grid} = {L:,}")
    print(f"{'part (per block, forward)':28s} {'full TFLOPs':>12s} {'VMoBA TFLOPs':>13s}")
    for name in sparse:
        print(f"{name:28s} {full.get(name, 0) / 1e12:12.3f} {sparse[name] / 1e12:13.3f}")
    print(f"model forward: full {total_full / 1e12:.1f} TFLOPs, VMoBA {total_sparse / 1e12:.1f} TFLOPs")
    print(
        f"speed-up (FLOPs): whole model {total_full / total_sparse:.2f}x, self-attention {attn_full / attn_sparse:.2f}x"
    )


if __name__ == "__main__":
    main()
