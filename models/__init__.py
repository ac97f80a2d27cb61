"""Model builders and attention processors that plug VMoBA into diffusers video DiTs.

Modules (imported explicitly, nothing eager here so `import models.config` stays light):

- `models.config`: `TransformerConfig`, `ModelConfig`, `AttentionConfig` (validated Hydra schemas).
- `models.transformer`: `build_transformer(cfg)` and the named architectures `TRANSFORMER_ARCHS`.
- `models.attention`: `install_attention(model, cfg) -> AttentionController`, Wan processors.
- `models.wan_block`: `fuse_wan_blocks(model)`, Wan blocks with their elementwise chains fused (CUDA).
- `models.cogvideox`: the second family (CogVideoX, joint text+video attention).
- `models.encoders`: VAE and text encoder builders.
"""
