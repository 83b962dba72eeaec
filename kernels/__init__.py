"""Triton kernels that fuse the MoPs gate with the prompt interpolation, and their PyTorch references.

- ``reference``: the op in plain PyTorch (the semantics; the MoPs module's CPU path computes the same).
- ``gate_interpolate``: the Triton kernels and their ``torch.autograd.Function``s. Importing it
  imports Triton, so ``mops.mixture`` does so only on CUDA; tests run it on CPU through Triton's
  interpreter (``TRITON_INTERPRET=1`` set before the import).
"""
