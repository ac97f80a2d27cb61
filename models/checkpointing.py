"""Activation checkpointing of a model's transformer blocks, optionally keeping attention outputs.

With activation checkpointing every block's forward runs twice, and attention is most of a block's forward
at long sequences. `enable_checkpointing(model, keep_attention=True)` keeps each block's attention output
and the tensors its backward needs through the checkpoint (memory for speed, docs/training.md), so the
recompute takes the kept output instead of running the kernel again.

The state lives on an `AttentionKeeper` attached to the model (`keeper_of(model)`), shared by the
checkpoint function and the model's attention kernels (`models.attention.LayerAttention`), whichever of
`enable_checkpointing` and `install_attention` runs first, and across re-installs of the attention.
"""

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from diffusers.models.modeling_utils import ModelMixin

from models.families import family_of


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


class AttentionKeeper:
    """The attention outputs kept by the block the checkpoint is running (its forward or its recompute).

    `kept` maps layer index -> output; it is None outside such a block or in one that keeps nothing.
    """

    def __init__(self):
        self.kept: dict[int, torch.Tensor] | None = None

    def checkpoint_function(self, keep: set[torch.nn.Module] | None) -> Callable:
        """A `gradient_checkpointing_func` for diffusers: non-reentrant `torch.utils.checkpoint` of one
        block call that gives the call a dict of its own, live while the checkpoint's graph is, if the block
        is in `keep` (None: every block)."""

        def checkpoint(block, *args):
            # None for the blocks that keep nothing: their attention runs as under plain checkpointing.
            kept = {} if keep is None or block in keep else None

            def run(*inputs):
                outer, self.kept = self.kept, kept
                try:
                    return block(*inputs)
                finally:
                    self.kept = outer

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

        return checkpoint

    def attend(
        self,
        layer_idx: int,
        attend: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        num_text: int,
    ) -> torch.Tensor:
        """`attend(q, k, v, num_text)` of layer `layer_idx`, or in a keeping block's recompute the output its
        forward kept. In the forward the kernel runs under saved-tensor hooks of its own, so the checkpoint
        neither drops nor counts what the kernel saves for its backward."""
        kept = self.kept
        if kept is None or not torch.is_grad_enabled():
            return attend(q, k, v, num_text)
        if layer_idx in kept:  # the recompute
            return kept.pop(layer_idx)
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            out = attend(q, k, v, num_text)
        kept[layer_idx] = out
        return out


def keeper_of(model: ModelMixin) -> AttentionKeeper:
    """The model's `AttentionKeeper`, created on first use."""
    keeper = getattr(model, "_attention_keeper", None)
    if keeper is None:
        keeper = model._attention_keeper = AttentionKeeper()
    return keeper


def enable_checkpointing(
    model: ModelMixin, keep_attention: bool = False, keep_blocks: int | None = None
) -> None:
    """diffusers' activation checkpointing of every transformer block (non-reentrant `torch.utils.checkpoint`).

    With `keep_attention`, each block call gets a dict of its own, live while the checkpoint's graph is:
    in the block's forward every `LayerAttention` runs its kernel and keeps the output there; the
    checkpoint's recompute, which runs the same block call again, takes the kept output instead of running
    the kernel. Costs the kept tensors (at 55K tokens 0.6-0.85 GB per Wan-1.3B block), so `keep_blocks`
    limits it to the model's first that many blocks (None: every block); the others are checkpointed
    plainly. `keep_blocks` needs a model of a registered family (`models.families`).
    """
    if keep_blocks is not None and keep_blocks < 0:
        raise ValueError(
            f"enable_checkpointing: keep_blocks must be >= 0 or None (every block), got {keep_blocks}"
        )
    if not keep_attention:
        model.enable_gradient_checkpointing()
        return
    keep = None if keep_blocks is None else set(family_of(model).blocks(model)[:keep_blocks])
    model.enable_gradient_checkpointing(
        gradient_checkpointing_func=keeper_of(model).checkpoint_function(keep)
    )
