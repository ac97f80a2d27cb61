"""VMoBA: Video Mixture-of-Block Attention (standalone; imports only torch)."""
