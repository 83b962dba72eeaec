"""Triton kernels for the MoPs gate fused with the prompt interpolation, forward and backward.

The op (``reference.py`` states it in PyTorch): from the pooled gate input x (B x d) and the
gate parameters W1 (d x r), b1, W2 (r x K), b2 and temperature tau,

    w = softmax((SiLU(x W1 + b1) W2 + b2) / tau)      B x K
    out[b] = sum_k w[b, k] P[k]                        B x m x d, with P the K x m x d experts.

Cost: with N = m * d, the mix moves K*N + B*N elements and the gate only B*d + d*r + r*K
(d = 4096, r = 128, K = 16, m = 100, B = 32: 20 M against 0.7 M), so the design streams P
and out exactly once and keeps everything else small:

forward, three launches
  1. ``_gate_h``      split-K over d: each program multiplies a row block of x by a slice of
                      W1's rows and writes a B x r partial (W1, d x r, is read once per 64
                      rows at r = 128, by ~one program per SM instead of through one).
  2. ``_gate_head``   per row block: h = sum of the partials + b1, then SiLU, W2, b2, /tau
                      and the softmax in registers. Writes only h (B x r, kept for the
                      backward instead of recomputing x W1) and w (B x K).
  3. ``_mix_fwd``     a grid over (N tiles, row blocks of up to 128 rows): loads the K x tile
                      slab of P and the row block's weights (cast to P's dtype, as
                      ``Mixture.forward`` does), one ``tl.dot`` with float32 accumulation,
                      writes the out tile. Up to B = 128, P is read once and out written once.
backward, two launches and a tiny sum
  4. ``_mix_bwd``     a grid over (N strips, row blocks): each program walks its strip tile by
                      tile, reading dout and P once, writing dP = w^T dout for the tile and
                      accumulating dw = dout P^T in registers; each strip writes one B x K
                      float32 partial, summed in PyTorch (2 strips per SM: at m d = 409,600
                      and K = 16 the partials are 2% of dout's bfloat16 bytes). Above 128
                      rows the row blocks add into dP atomically.
  5. ``_gate_bwd``    a grid over d tiles: softmax and SiLU backward from the saved h and w,
                      dx = dh W1^T and dW1 = x^T dh per d tile; program 0 also writes dW2,
                      db1 and db2. Touches only the gate-sized tensors.

Never materialised: the logits, SiLU(h), the B x K x N products, a float32 copy of P or out.
The two halves are separate ``torch.autograd.Function``s (``GateFunction``, ``MixFunction``)
joined by the B x K weights: splitting there costs no memory pass (the gate and the mix are
separate launches anyway, and the dw reduction over N must finish before the gate
backward), and it lets ``Mixture`` compute the weights and the prompt in its two steps.
``gate_interpolate`` is the whole op.

Accumulation is float32 for float32, bfloat16 and float16 inputs (float64 for float64, so
``gradcheck`` can run); float32 products use IEEE precision, not TF32.
``TRITON_INTERPRET=1`` (set before this module is imported) runs it all on CPU tensors.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

MAX_BLOCK_B = 128  # rows per mix program: P is re-read once per 128 rows of the batch
TILE_BUDGET = 16384  # elements of the largest register tile in the mix kernels
GATE_TILE = 8192  # elements of the gate's B x r tile: 64 rows at r = 128 (W1 re-read once per row block)
GATE_BLOCK_D = 64  # d rows of W1 per step of the gate's split-K loop
GATE_BWD_BLOCK_B = 16
GATE_BWD_TILE = 4096  # elements of the d x r tiles of W1 and dW1: 32 columns of d at r = 128, 128 programs at d = 4096
GATE_WARPS = 8
MIX_WARPS = 8  # the mix tiles are TILE_BUDGET elements: 8 warps keep them in registers
STRIPS_PER_SM = 2
INTERPRETER_PROGRAMS = 2  # stands in for the SM count under the interpreter: several splits and strips

_poison = False


@contextlib.contextmanager
def poisoned_outputs():
    """Fill every buffer the kernels must overwrite with NaN first, so that an element a
    kernel forgets to write fails a comparison instead of passing as leftover memory."""
    global _poison
    saved, _poison = _poison, True
    try:
        yield
    finally:
        _poison = saved


def _output(shape, dtype, device) -> torch.Tensor:
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(n))


def _acc_dtype(*tensors):
    is64 = any(t.dtype == torch.float64 for t in tensors)
    return (torch.float64, tl.float64) if is64 else (torch.float32, tl.float32)


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _INTERPRETED


def _mix_blocks(B: int, K: int, N: int) -> tuple[int, int, int]:
    block_b = min(_pow2(B), MAX_BLOCK_B)
    block_k = _pow2(K)
    block_n = min(TILE_BUDGET // max(block_b, block_k), _pow2(N))
    return block_b, block_k, max(16, block_n)


# ---------------------------------------------------------------------------- kernels
# The kernels call Triton builtins only. tl.zeros, tl.sum and tl.max are themselves @jit
# functions, decorated when triton.language is first imported: when another library imported
# Triton before TRITON_INTERPRET=1 was set, the interpreter cannot call them. tl.full and
# tl.reduce with Triton's own combine functions are the same operations (the interpreter runs
# those combines as NumPy reductions), and the helpers below are decorated with this module.
@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _dot(a, b, acc, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b (+ acc) accumulated in ACC. UPCAST multiplies bfloat16 operands as float32:
    Triton 3.9's interpreter multiplies bfloat16 dots as their raw uint16 bits. The result
    is the same math (a product of two bfloat16 values is exact in float32), so CPU tests
    check what the tensor cores compute; the GPU keeps bfloat16 operands."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, out_dtype=ACC, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, out_dtype=ACC, input_precision="ieee")
    return acc


@triton.jit
def _gate_h(x_ptr, w1_ptr, part_ptr, B, D, R, sxb, sxd, sw1d, sw1r, chunks_per_split,
            BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """One split of d: part[split, rows] = x[rows, d chunk] W1[d chunk] (split-K, so W1 is
    read by many SMs at once rather than streamed through one)."""
    split = tl.program_id(1)
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rr = tl.arange(0, BLOCK_R)
    row, r_ok = rb < B, rr < R
    h = tl.full((BLOCK_B, BLOCK_R), 0.0, dtype=ACC)
    for i in range(chunks_per_split):
        rd = (split * chunks_per_split + i) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        x = tl.load(x_ptr + rb[:, None] * sxb + rd[None, :] * sxd, mask=row[:, None] & d_ok[None, :], other=0.0)
        w1 = tl.load(w1_ptr + rd[:, None] * sw1d + rr[None, :] * sw1r, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        h = tl.dot(x.to(ACC), w1.to(ACC), h, out_dtype=ACC, input_precision="ieee")
    tl.store(part_ptr + (split * B + rb)[:, None] * R + rr[None, :], h, mask=row[:, None] & r_ok[None, :])


@triton.jit
def _gate_head(part_ptr, b1_ptr, w2_ptr, b2_ptr, h_ptr, w_ptr, B, R, K, splits, sw2r, sw2k, tau,
               BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """h = sum of the splits + b1, then SiLU, W2, b2, /tau and the softmax, all in registers."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    row, r_ok, k_ok = rb < B, rr < R, rk < K
    br = row[:, None] & r_ok[None, :]
    h = tl.full((BLOCK_B, BLOCK_R), 0.0, dtype=ACC)
    for split in range(splits):
        h += tl.load(part_ptr + (split * B + rb)[:, None] * R + rr[None, :], mask=br, other=0.0)
    h += tl.load(b1_ptr + rr, mask=r_ok, other=0.0).to(ACC)[None, :]
    a = h / (1.0 + tl.exp(-h))  # SiLU
    w2 = tl.load(w2_ptr + rr[:, None] * sw2r + rk[None, :] * sw2k, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    logits = tl.dot(a, w2.to(ACC), out_dtype=ACC, input_precision="ieee")
    logits += tl.load(b2_ptr + rk, mask=k_ok, other=0.0).to(ACC)[None, :]
    logits = tl.where(k_ok[None, :], logits / tau, float("-inf"))
    e = tl.exp(logits - _max(logits, 1)[:, None])
    w = e / _sum(e, 1)[:, None]
    tl.store(h_ptr + rb[:, None] * R + rr[None, :], h, mask=br)
    tl.store(w_ptr + rb[:, None] * K + rk[None, :], w, mask=row[:, None] & k_ok[None, :])


@triton.jit
def _mix_fwd(w_ptr, p_ptr, out_ptr, B, N, K, swb, swk,
             BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             ACC: tl.constexpr, UPCAST: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rk = tl.arange(0, BLOCK_K)
    row, n_ok, k_ok = rb < B, rn < N, rk < K
    w = tl.load(w_ptr + rb[:, None] * swb + rk[None, :] * swk, mask=row[:, None] & k_ok[None, :], other=0.0)
    p = tl.load(p_ptr + rk.to(tl.int64)[:, None] * N + rn[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    out = _dot(w.to(p.dtype), p, tl.full((BLOCK_B, BLOCK_N), 0.0, dtype=ACC), ACC, UPCAST)
    tl.store(out_ptr + rb.to(tl.int64)[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row[:, None] & n_ok[None, :])


@triton.jit
def _mix_bwd(w_ptr, p_ptr, dout_ptr, dp_ptr, dw_ptr, B, N, K, swb, swk, tiles_per_strip,
             BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
             UPCAST: tl.constexpr, NEED_DP: tl.constexpr, NEED_DW: tl.constexpr, ATOMIC_DP: tl.constexpr):
    strip = tl.program_id(0)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rk = tl.arange(0, BLOCK_K)
    row, k_ok = rb < B, rk < K
    wt = tl.load(w_ptr + rk[:, None] * swk + rb[None, :] * swb, mask=k_ok[:, None] & row[None, :], other=0.0)
    wt = wt.to(p_ptr.dtype.element_ty)  # K x rows: the weights as the forward used them
    dw = tl.full((BLOCK_B, BLOCK_K), 0.0, dtype=ACC)
    for i in range(tiles_per_strip):
        rn = (strip * tiles_per_strip + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        g = tl.load(dout_ptr + rb.to(tl.int64)[:, None] * N + rn[None, :], mask=row[:, None] & n_ok[None, :], other=0.0)
        p_at = rk.to(tl.int64)[:, None] * N + rn[None, :]
        p_mask = k_ok[:, None] & n_ok[None, :]
        if NEED_DP:
            dp = _dot(wt, g, tl.full((BLOCK_K, BLOCK_N), 0.0, dtype=ACC), ACC, UPCAST)
            if ATOMIC_DP:  # several row blocks share the tile: add into a zeroed accumulation buffer
                tl.atomic_add(dp_ptr + p_at, dp.to(dp_ptr.dtype.element_ty), mask=p_mask)
            else:
                tl.store(dp_ptr + p_at, dp.to(dp_ptr.dtype.element_ty), mask=p_mask)
        if NEED_DW:
            p = tl.load(p_ptr + p_at, mask=p_mask, other=0.0)
            dw = _dot(g, tl.trans(p), dw, ACC, UPCAST)
    if NEED_DW:
        tl.store(dw_ptr + (strip * B + rb)[:, None] * K + rk[None, :], dw, mask=row[:, None] & k_ok[None, :])


@triton.jit
def _gate_bwd(x_ptr, w1_ptr, w2_ptr, h_ptr, w_ptr, dw_ptr, dx_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
              B, D, R, K, sxb, sxd, sw1d, sw1r, sw2r, sw2k, tau,
              BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
              ACC: tl.constexpr):
    pid = tl.program_id(0)
    rd = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    d_ok, r_ok, k_ok = rd < D, rr < R, rk < K
    w1 = tl.load(w1_ptr + rd[:, None] * sw1d + rr[None, :] * sw1r, mask=d_ok[:, None] & r_ok[None, :], other=0.0).to(ACC)
    w2 = tl.load(w2_ptr + rr[:, None] * sw2r + rk[None, :] * sw2k, mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
    dw1 = tl.full((BLOCK_D, BLOCK_R), 0.0, dtype=ACC)
    dw2 = tl.full((BLOCK_R, BLOCK_K), 0.0, dtype=ACC)
    db1 = tl.full((BLOCK_R,), 0.0, dtype=ACC)
    db2 = tl.full((BLOCK_K,), 0.0, dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        row = rb < B
        bk = row[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + rb[:, None] * K + rk[None, :], mask=bk, other=0.0)
        g = tl.load(dw_ptr + rb[:, None] * K + rk[None, :], mask=bk, other=0.0)
        ds = w * (g - _sum(w * g, 1)[:, None]) / tau  # softmax backward, through the /tau
        h = tl.load(h_ptr + rb[:, None] * R + rr[None, :], mask=row[:, None] & r_ok[None, :], other=0.0)
        sig = 1.0 / (1.0 + tl.exp(-h))
        a = h * sig
        da = tl.dot(ds, tl.trans(w2), out_dtype=ACC, input_precision="ieee")
        dh = da * sig * (1.0 + h * (1.0 - sig))  # SiLU'(h)
        dw2 += tl.dot(tl.trans(a), ds, out_dtype=ACC, input_precision="ieee")
        db2 += _sum(ds, 0)
        db1 += _sum(dh, 0)
        x = tl.load(x_ptr + rb[:, None] * sxb + rd[None, :] * sxd, mask=row[:, None] & d_ok[None, :], other=0.0).to(ACC)
        dw1 = tl.dot(tl.trans(x), dh, dw1, input_precision="ieee")
        dx = tl.dot(dh, tl.trans(w1), out_dtype=ACC, input_precision="ieee")
        tl.store(dx_ptr + rb[:, None] * D + rd[None, :], dx.to(dx_ptr.dtype.element_ty), mask=row[:, None] & d_ok[None, :])
    tl.store(dw1_ptr + rd[:, None] * R + rr[None, :], dw1.to(dw1_ptr.dtype.element_ty), mask=d_ok[:, None] & r_ok[None, :])
    if pid == 0:  # the d-independent gradients: one program writes them
        tl.store(db1_ptr + rr, db1.to(db1_ptr.dtype.element_ty), mask=r_ok)
        tl.store(db2_ptr + rk, db2.to(db2_ptr.dtype.element_ty), mask=k_ok)
        tl.store(dw2_ptr + rr[:, None] * K + rk[None, :], dw2.to(dw2_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])


_INTERPRETED = not isinstance(_mix_fwd, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 at import


# ---------------------------------------------------------------------------- launchers
def _check_gate(x, W1, b1, W2, b2, temperature):
    if x.dim() != 2 or W1.dim() != 2 or W2.dim() != 2:
        raise ValueError(f"gate shapes: x {tuple(x.shape)}, W1 {tuple(W1.shape)}, W2 {tuple(W2.shape)}; expected 2-D")
    (B, D), (R, K) = x.shape, W2.shape
    if W1.shape != (D, R) or b1.shape != (R,) or b2.shape != (K,):
        raise ValueError(f"gate shapes: x {tuple(x.shape)}, W1 {tuple(W1.shape)}, b1 {tuple(b1.shape)}, "
                         f"W2 {tuple(W2.shape)}, b2 {tuple(b2.shape)} do not chain d -> r -> K")
    if not temperature > 0:
        raise ValueError(f"temperature {temperature}: expected a positive float")
    return B, D, R, K


def gate_forward(x, W1, b1, W2, b2, temperature: float):
    """(h = x W1 + b1, w) as the accumulation dtype."""
    B, D, R, K = _check_gate(x, W1, b1, W2, b2, temperature)
    acc, acc_tl = _acc_dtype(x, W1, b1, W2, b2)
    h, w = _output((B, R), acc, x.device), _output((B, K), acc, x.device)
    if B == 0:
        return h, w
    block_r = _pow2(R)
    block_b = min(_pow2(B), max(16, GATE_TILE // block_r))
    b_blocks, chunks = triton.cdiv(B, block_b), triton.cdiv(D, GATE_BLOCK_D)
    per_split = triton.cdiv(chunks, max(1, min(chunks, triton.cdiv(_programs(x.device), b_blocks))))
    splits = triton.cdiv(chunks, per_split)
    part = _output((splits, B, R), acc, x.device)
    _gate_h[(b_blocks, splits)](x, W1, part, B, D, R, *x.stride(), *W1.stride(), per_split, BLOCK_B=block_b,
                                BLOCK_D=GATE_BLOCK_D, BLOCK_R=block_r, ACC=acc_tl, num_warps=GATE_WARPS)
    _gate_head[(b_blocks,)](part, b1.contiguous(), W2, b2.contiguous(), h, w, B, R, K, splits, *W2.stride(),
                            float(temperature), BLOCK_B=block_b, BLOCK_R=block_r, BLOCK_K=_pow2(K), ACC=acc_tl,
                            num_warps=GATE_WARPS)
    return h, w


def gate_backward(dw, x, W1, W2, h, w, temperature: float, dtypes):
    """dw (B x K) -> (dx, dW1, db1, dW2, db2) in ``dtypes`` (the inputs' dtypes)."""
    (B, D), (R, K) = x.shape, W2.shape
    acc, acc_tl = _acc_dtype(h)  # the forward's accumulation dtype
    dev = x.device
    grads = [_output(shape, dt, dev) for shape, dt in zip(((B, D), (D, R), (R,), (R, K), (K,)), dtypes)]
    if B == 0:  # nothing to sum: zero gradients (dx is empty)
        return tuple(g.zero_() for g in grads)
    block_r = _pow2(R)
    block_d = max(16, GATE_BWD_TILE // block_r)
    _gate_bwd[(triton.cdiv(D, block_d),)](
        x, W1, W2, h, w, dw.to(acc).contiguous(), *grads, B, D, R, K, *x.stride(), *W1.stride(), *W2.stride(),
        float(temperature), BLOCK_B=GATE_BWD_BLOCK_B, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_K=_pow2(K),
        ACC=acc_tl, num_warps=GATE_WARPS)
    return tuple(grads)


def mix_forward(w, P2):
    """w (B x K), P2 (K x N, contiguous) -> out (B x N, P's dtype)."""
    (B, K), N = w.shape, P2.shape[1]
    out = _output((B, N), P2.dtype, P2.device)
    if B and N:
        block_b, block_k, block_n = _mix_blocks(B, K, N)
        _mix_fwd[(triton.cdiv(N, block_n), triton.cdiv(B, block_b))](
            w, P2, out, B, N, K, *w.stride(), BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k,
            ACC=_acc_dtype(P2)[1], UPCAST=_upcast(P2.dtype), num_warps=MIX_WARPS)
    return out


def _programs(device) -> int:
    """Programs that fill the GPU once: its SM count (the interpreter has no SMs to count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def mix_backward(dout2, w, P2, need_dp: bool, need_dw: bool):
    """dout (B x N, P's dtype, contiguous) -> (dP K x N or None, dw B x K float32/64 or None)."""
    (B, K), N = w.shape, P2.shape[1]
    acc, acc_tl = _acc_dtype(P2)  # the dots run in P's dtype (w is cast to it, as in the forward)
    if B == 0 or N == 0:  # nothing to sum
        return (P2.new_zeros((K, N)) if need_dp else None), (w.new_zeros((B, K), dtype=acc) if need_dw else None)
    block_b, block_k, block_n = _mix_blocks(B, K, N)
    n_tiles = triton.cdiv(N, block_n)
    per_strip = triton.cdiv(n_tiles, max(1, min(n_tiles, STRIPS_PER_SM * _programs(P2.device))))
    strips = triton.cdiv(n_tiles, per_strip)
    b_blocks = triton.cdiv(B, block_b)
    atomic = b_blocks > 1
    # Several row blocks add into one dP tile: accumulate in a zeroed float32 (float64) buffer.
    dp = torch.zeros((K, N), dtype=acc, device=P2.device) if atomic else _output((K, N), P2.dtype, P2.device)
    partial = _output((strips, B, K), acc, P2.device)
    _mix_bwd[(strips, b_blocks)](
        w, P2, dout2, dp, partial, B, N, K, *w.stride(), per_strip, BLOCK_B=block_b, BLOCK_N=block_n,
        BLOCK_K=block_k, ACC=acc_tl, UPCAST=_upcast(P2.dtype), NEED_DP=need_dp, NEED_DW=need_dw,
        ATOMIC_DP=atomic, num_warps=MIX_WARPS)
    return (dp.to(P2.dtype) if need_dp else None), (partial.sum(0) if need_dw else None)


# ---------------------------------------------------------------------------- autograd
class GateFunction(torch.autograd.Function):
    """x, W1, b1, W2, b2, temperature -> w (B x K, float32; float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, x, W1, b1, W2, b2, temperature: float):
        h, w = gate_forward(x, W1, b1, W2, b2, temperature)
        ctx.save_for_backward(x, W1, W2, h, w)
        ctx.temperature = float(temperature)
        ctx.dtypes = (x.dtype, W1.dtype, b1.dtype, W2.dtype, b2.dtype)
        return w

    @staticmethod
    def backward(ctx, dw):
        x, W1, W2, h, w = ctx.saved_tensors
        return *gate_backward(dw, x, W1, W2, h, w, ctx.temperature, ctx.dtypes), None


class MixFunction(torch.autograd.Function):
    """w (B x K), P (K x m x d) -> out (B x m x d, P's dtype) = sum_k w[:, k] P[k]."""

    @staticmethod
    def forward(ctx, w, P):
        if w.dim() != 2 or P.dim() != 3 or w.shape[1] != P.shape[0]:
            raise ValueError(f"mix shapes: w {tuple(w.shape)}, P {tuple(P.shape)}; expected B x K and K x m x d")
        K, m, d = P.shape
        P2 = P.contiguous().view(K, m * d)
        ctx.save_for_backward(w, P2)
        ctx.P_shape = P.shape
        return mix_forward(w, P2).view(w.shape[0], m, d)

    @staticmethod
    def backward(ctx, dout):
        w, P2 = ctx.saved_tensors
        dout2 = dout.to(P2.dtype).contiguous().view(w.shape[0], P2.shape[1])
        need_dw, need_dp = ctx.needs_input_grad
        dp, dw = mix_backward(dout2, w, P2, need_dp, need_dw)
        return (None if dw is None else dw.to(w.dtype)), (None if dp is None else dp.view(ctx.P_shape))


def gate_weights(x, W1, b1, W2, b2, temperature: float) -> torch.Tensor:
    """The MoPs gate alone (launches 1-2; backward launch 5)."""
    return GateFunction.apply(x, W1, b1, W2, b2, float(temperature))


def interpolate(w, P) -> torch.Tensor:
    """The mix alone (launch 3; backward launch 4)."""
    return MixFunction.apply(w, P)


def gate_interpolate(x, W1, b1, W2, b2, P, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op: (w B x K, out B x m x d); gradients for x, W1, b1, W2, b2 and P (and for
    any use of w beside out, which autograd adds to the mix's dw)."""
    w = gate_weights(x, W1, b1, W2, b2, temperature)
    return w, interpolate(w, P)
