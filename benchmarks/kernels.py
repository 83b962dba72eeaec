"""The fused MoPs gate + interpolation kernels against their PyTorch reference, on a GPU.

For each size (Llama-7B's d = 4096 with K in {4, 8, 16}, m in {10, 100}, B in {1, 8, 32, 128};
the embedded SmolLM2-135M's d = 576 with K = 4, m in {10, 20}, B in {1, 8, 32}; gate width
r = 128) and dtype, times the forward and the forward + backward of

- ``fused``:    ``mops.kernels.gate_interpolate.gate_interpolate`` (the Triton kernels),
- ``eager``:    ``mops.kernels.reference.gate_interpolate_reference`` run eagerly,
- ``compiled``: the same reference under ``torch.compile``,

as the median of CUDA-event timings (milliseconds), with the speed-ups of the fused op and
the bandwidth floor: the bytes the op must move (P and out forward; dout, P and dP backward;
the gate's own tensors) divided by the copy bandwidth measured here on a 1 GiB
device-to-device copy. ``fused / floor`` shows the distance to that limit.

    python benchmarks/kernels.py                 # writes benchmarks/results/kernels_<gpu>.md
    python benchmarks/kernels.py --dtypes bfloat16 --skip-compile
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from mops.cli_common import run_cli
from mops.errors import UserError
from mops.kernels.reference import gate_interpolate_reference

RESULTS = Path(__file__).resolve().parent / "results"
GATE_HIDDEN = 128  # MixtureConfig's default gate width r
LLAMA7B = [(4096, K, m, B) for K in (4, 8, 16) for m in (10, 100) for B in (1, 8, 32, 128)]
EMBEDDED = [(576, 4, m, B) for m in (10, 20) for B in (1, 8, 32)]  # SmolLM2-135M: d = 576
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TAU = 1.0
DEVICE = "cuda"


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median over ``reps`` calls of the time between CUDA events recorded around one call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    """Bytes per millisecond of a 1 GiB device-to-device copy (one read + one write per byte)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda: dst.copy_(src), reps)


def floor_bytes(d: int, K: int, m: int, B: int, dtype: torch.dtype, backward: bool) -> int:
    """Bytes any implementation must move: forward reads P and writes out (plus x, W1, W2, w);
    the backward reads dout and P and writes dP (plus x, W1 read and dx, dW1 written)."""
    s, N, r = torch.empty((), dtype=dtype).element_size(), m * d, GATE_HIDDEN
    gate = s * (B * d + d * r + r * K) + 4 * B * K
    total = s * (K * N + B * N) + gate
    if backward:
        total += s * (B * N + 2 * K * N) + 2 * s * (B * d + d * r)
    return total


def make_inputs(d: int, K: int, m: int, B: int, dtype: torch.dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shapes = [(B, d), (d, GATE_HIDDEN), (GATE_HIDDEN,), (GATE_HIDDEN, K), (K,), (K, m, d)]
    scales = [1.0, d**-0.5, 0.1, GATE_HIDDEN**-0.5, 0.1, 1.0]
    inputs = [(torch.randn(s, generator=g, device=DEVICE) * c).to(dtype).requires_grad_() for s, c in zip(shapes, scales)]
    dout = torch.randn(B, m, d, generator=g, device=DEVICE).to(dtype)
    return inputs, dout


def timings(op, inputs, dout, reps: int) -> tuple[float, float]:
    """(forward ms, forward + backward ms); the backward returns the gradients of every input
    (``autograd.grad``, so no .grad accumulation is timed)."""

    def forward():
        with torch.no_grad():
            op(*inputs, TAU)

    def forward_backward():
        _, out = op(*inputs, TAU)
        torch.autograd.grad(out, inputs, dout)

    return median_ms(forward, reps), median_ms(forward_backward, reps)


def measure(sizes, dtypes, reps: int, compile_reference: bool, bandwidth: float) -> list[dict]:
    from mops.kernels.gate_interpolate import gate_interpolate

    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for d, K, m, B in sizes:
            inputs, dout = make_inputs(d, K, m, B, dtype)
            ops = {"fused": gate_interpolate, "eager": gate_interpolate_reference}
            if compile_reference:
                torch._dynamo.reset()  # one fresh compilation per size: no recompile limit, no dynamic shapes
                ops["compiled"] = torch.compile(gate_interpolate_reference, dynamic=False)
            times = {name: timings(op, inputs, dout, reps) for name, op in ops.items()}
            for mode, i in (("forward", 0), ("forward+backward", 1)):
                floor = floor_bytes(d, K, m, B, dtype, backward=i == 1) / bandwidth
                rows.append({"dtype": dtype_name, "d": d, "K": K, "m": m, "B": B, "mode": mode, "floor": floor,
                             **{name: t[i] for name, t in times.items()}})
            print(f"{dtype_name} d={d} K={K} m={m} B={B}: " + ", ".join(
                f"{name} {t[0]:.3f}/{t[1]:.3f} ms" for name, t in times.items()), file=sys.stderr)
    return rows


def table(rows: list[dict], compiled: bool) -> list[str]:
    head = "| dtype | d | K | m | B | mode | fused ms | eager ms |" + (" compiled ms |" if compiled else "")
    head += " eager / fused |" + (" compiled / fused |" if compiled else "") + " floor ms | fused / floor |"
    lines = [head, "|" + " --- |" * 6 + " ---: |" * (head.count("|") - 7)]
    for r in rows:
        cells = [r["dtype"], r["d"], r["K"], r["m"], r["B"], r["mode"], f"{r['fused']:.4f}", f"{r['eager']:.4f}"]
        if compiled:
            cells.append(f"{r['compiled']:.4f}")
        cells.append(f"{r['eager'] / r['fused']:.2f}")
        if compiled:
            cells.append(f"{r['compiled'] / r['fused']:.2f}")
        cells += [f"{r['floor']:.4f}", f"{r['fused'] / r['floor']:.2f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    p.add_argument("--sizes", default="llama7b,embedded", help="comma-separated: llama7b, embedded")
    p.add_argument("--reps", type=int, default=50, help="timed calls per measurement (median reported)")
    p.add_argument("--skip-compile", action="store_true", help="leave out torch.compile of the reference")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("no CUDA device: the Triton kernels are benchmarked on a GPU only "
                        "(tests/test_kernels.py checks them on CPU through Triton's interpreter)")
    dtypes = [t for t in args.dtypes.split(",") if t]
    if not dtypes or set(dtypes) - DTYPES.keys():
        raise UserError(f"--dtypes {args.dtypes!r}: expected a comma-separated subset of {', '.join(DTYPES)}")
    groups = {"llama7b": LLAMA7B, "embedded": EMBEDDED}
    names = [s for s in args.sizes.split(",") if s]
    if not names or set(names) - groups.keys():
        raise UserError(f"--sizes {args.sizes!r}: expected a comma-separated subset of {', '.join(groups)}")
    if args.reps < 1:
        raise UserError(f"--reps {args.reps}: expected at least 1")
    sizes = [s for n in names for s in groups[n]]

    gpu = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(args.reps)
    rows = measure(sizes, dtypes, args.reps, not args.skip_compile, bandwidth)
    command = " ".join(["python benchmarks/kernels.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        f"# Fused MoPs gate + interpolation kernels on {gpu}",
        "",
        (f"Made by `{command}`: torch {torch.__version__}, triton {_triton_version()}; gate width r = {GATE_HIDDEN}; "
         f"median of {args.reps} CUDA-event timings per cell, milliseconds. `fused`: the Triton kernels; `eager` and "
         "`compiled`: the PyTorch reference, eagerly and under `torch.compile`. forward+backward returns the "
         "gradients of x, W1, b1, W2, b2 and P. `floor`: the bytes the op must move divided by the measured "
         f"device-to-device copy bandwidth ({bandwidth / 1e6:.0f} GB/s)."),
        "",
        *table(rows, not args.skip_compile),
    ]
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = Path(args.out_dir) / f"kernels_{slug}.md"
    write_text_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(run_cli(main))
