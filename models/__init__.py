"""Model builders and attention processors that plug VMoBA into diffusers video DiTs.

Modules (imported explicitly, nothing eager here so `import models.config` stays light):

- `models.config`: `TransformerConfig`, `ModelConfig`, `AttentionConfig` (validated Hydra schemas).
- `models.families`: the registry of model families (`Family`, `FAMILIES`, `ARCHS`); one file per family
  (`models.families.wan`, `models.families.cogvideox`).
- `models.transformer`: `build_transformer(cfg)`.
- `models.attention`: `install_attention(model, cfg) -> AttentionController`, the full / VMoBA kernels.
- `models.checkpointing`: `enable_checkpointing(model, keep_attention, keep_blocks)`.
- `models.wan_block`: `fuse_wan_blocks(model)`, Wan blocks with their elementwise chains fused (CUDA).
- `models.encoders`: VAE and text encoder builders.
"""
