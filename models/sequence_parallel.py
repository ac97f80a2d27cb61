"""Ulysses sequence parallelism for Wan transformers: one clip's tokens split over the ranks of a group.

Each of the P ranks of a sequence-parallel group holds the whole latent and runs the patch embedding, the
rotary table and the condition embedder (small and identical), then carries 1/P of the tokens through every
block: modulation, the FFN and cross-attention to the text are per token, so they run on the shard as they
are. Self-attention is the one place tokens meet: DeepSpeed-Ulysses (`DistributedAttention`) exchanges
sequence shards for head shards by an all-to-all, so each rank holds every token of H/P heads, runs the
installed kernel (VMoBA or full) on the whole token grid, and exchanges back. VMoBA's selection for a head
needs only that head's queries and keys, so scopes `query` and `head` select exactly what one rank would;
`block` and `overall` share a budget across heads and are refused. The output projection runs on the shard
too, and its output is gathered, so the loss is computed on the whole clip by every rank of the group.

Gradients: the gather's backward hands each rank the gradient of its own tokens (the loss is the same on
every rank), so each parameter's gradient on a rank covers its tokens only; DeepSpeed sums them over the
group and averages over data parallelism (`training.parallel.UlyssesMPU`).

A clip whose token count L does not divide by P is padded to `ceil(L / P) * P`: the padding rides along
the last rank's shard, is cut before attention (so no query or key sees it) and after the gather.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

SHARED_BUDGET_SCOPES = ("block", "overall")


class _Gather(torch.autograd.Function):
    """All-gather along dim 1 of `[B, n, ...]` shards into `[B, P*n, ...]`; backward keeps this rank's
    slice (every rank computes the same loss from the gathered tensor, so no sum is needed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.n = group, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = dist.get_rank(ctx.group) * ctx.n
        return grad[:, start : start + ctx.n].contiguous(), None


class SequenceShards:
    """This rank's share of a sequence of `length` tokens in an SP group of `size` ranks."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def local_len(self, length: int) -> int:
        return -(-length // self.size)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """`x: [B, L, ...]` (the same on every rank) -> this rank's `[B, ceil(L/P), ...]`, zero-padded."""
        n = self.local_len(x.shape[1])
        pad = n * self.size - x.shape[1]
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x[:, self.rank * n : (self.rank + 1) * n]

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """This rank's `[B, n, ...]` -> the whole `[B, length, ...]` (padding dropped)."""
        return _Gather.apply(x, self.group)[:, :length]


class UlyssesKernel:
    """A layer's attention kernel `(q, k, v: [B, n, H, D], num_text) -> [B, n, H, D]` on sequence shards:
    all-to-all to `[B, P*n, H/P, D]`, the wrapped kernel on the unpadded tokens, all-to-all back."""

    def __init__(self, kernel: Callable, shards: SequenceShards, num_tokens: Callable[[], int]):
        from deepspeed.sequence.layer import DistributedAttention

        self.kernel, self.shards, self.num_tokens = kernel, shards, num_tokens
        self.ulysses = DistributedAttention(self._local, shards.group, scatter_idx=2, gather_idx=1)

    def __getattr__(self, name):  # layer_idx, controller, ...: the wrapped kernel's
        return getattr(self.kernel, name)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        length = self.num_tokens()
        out = self.kernel(q[:, :length], k[:, :length], v[:, :length])
        return F.pad(out, (0, 0, 0, 0, 0, q.shape[1] - length))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text: int = 0) -> torch.Tensor:
        if num_text:
            raise ValueError("sequence parallelism supports video-only self-attention (Wan), not joint text")
        heads = q.shape[2]
        if heads % self.shards.size:
            raise ValueError(
                f"train.sequence_parallel={self.shards.size} must divide the attention heads ({heads})"
            )
        return self.ulysses(q, k, v, batch_dim_idx=0)


def enable_sequence_parallel(model: torch.nn.Module, controller, group) -> SequenceShards:
    """Run `model` (a Wan transformer with attention installed by `models.attention.install_attention`)
    with its tokens split over the ranks of process group `group`. Returns the shard bookkeeping.

    Hooks: every block's pre-hook takes this rank's rows of the rotary table (and, in the first block, of
    the hidden states); `proj_out`'s hook gathers its output; each self-attention processor's kernel is
    wrapped in a `UlyssesKernel`. The weights are untouched, so checkpoints are the same as without."""
    from diffusers import WanTransformer3DModel

    if not isinstance(model, WanTransformer3DModel):
        raise TypeError(f"train.sequence_parallel supports Wan transformers, not {type(model).__name__}")
    scope = getattr(controller.cfg, "scope", "query")
    if controller.cfg.type == "vmoba" and scope in SHARED_BUDGET_SCOPES:
        raise ValueError(
            f"attention.scope={scope!r} shares its selection budget across heads, which sequence parallelism "
            "splits over ranks; use scope=query or scope=head with train.sequence_parallel > 1"
        )
    shards = SequenceShards(group)
    grid = lambda: controller.grid  # noqa: E731  (set by the transformer's pre-hook at each forward)
    num_tokens = lambda: grid()[0] * grid()[1] * grid()[2]  # noqa: E731

    def shard_inputs(block, args):
        hidden, context, temb, rotary = args
        if temb.dim() == 4:  # Wan 2.2 TI2V: a timestep per token
            raise ValueError("sequence parallelism does not support per-token timesteps (Wan 2.2 TI2V)")
        if block is model.blocks[0]:
            hidden = shards.shard(hidden)
        rotary = tuple(shards.shard(f) for f in rotary) if rotary is not None else None
        return hidden, context, temb, rotary

    def gather_output(module, args, out):
        return shards.gather(out, num_tokens())

    for block in model.blocks:
        processor = block.attn1.processor
        processor.kernel = UlyssesKernel(processor.kernel, shards, num_tokens)
        block.register_forward_pre_hook(shard_inputs)
    model.proj_out.register_forward_hook(gather_output)
    return shards
