"""Triton kernels that fuse the MoPs gate with the prompt interpolation, and their PyTorch references."""
