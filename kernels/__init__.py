"""Fused Triton kernels (RMSNorm, SwiGLU, chunked linear + cross-entropy), installed as
`llmtrain.kernels`. Each has a plain PyTorch reference; importing this package never needs Triton."""
