"""The fused MoPs gate + interpolation kernels against their PyTorch reference in float64.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; on a machine
with CUDA (and TRITON_INTERPRET unset) they run compiled on the GPU. Every kernel output is
poisoned with NaN before each run, so an element a kernel fails to write fails the test.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from mops.gates import MoPsGate
from mops.kernels.reference import gate_interpolate_reference, mops_gate_params
from mops.mixture import Mixture, MixtureConfig

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
MODULE = "mops.kernels.gate_interpolate"


def _load_kernels():
    """The kernel module, its ``@triton.jit`` kernels built for the interpreter unless on a GPU.
    Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. at import (re-import it in
    case another test imported it for the GPU); the variable is set again around each test
    (``_interpreter``), since Triton also consults it at launch, and is restored after. Triton
    itself may have been imported earlier in the session (llm-compressor imports it): the
    kernels use no @jit helper of triton.language, so that does not matter."""
    if ON_GPU:
        return importlib.import_module(MODULE)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        sys.modules.pop(MODULE, None)
        return importlib.import_module(MODULE)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


gi = _load_kernels()


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")

# Relative error ||got - ref|| / ||ref|| allowed per input dtype: the reference runs in float64
# on the same (rounded) inputs, so these cover rounding the weights, outputs and gradients.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float64: 1e-12}
TAU = 0.7

# (B, d, r, K, m): B = 1, K = 1, shapes off every block size (16 rows, 64 columns of d, the
# 16-wide K and r pads, the mix tiles), several gate row blocks (B = 37), two mix row blocks
# (B = 130 > 128: dP summed atomically), and a large m * d (Llama-7B's d = 4096, m = 100).
FIXED = [(1, 64, 16, 1, 3), (5, 70, 20, 3, 7), (37, 100, 48, 5, 9), (130, 33, 17, 6, 5)]
LARGE = (2, 4096, 64, 4, 100)


def _random_shapes(n: int, seed: int = 6):
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    return [(draw(1, 40), draw(3, 200), draw(1, 70), draw(1, 17), draw(1, 12)) for _ in range(n)]


SHAPES = FIXED + _random_shapes(3)


def _inputs(B, d, r, K, m, dtypes, seed=0):
    """x, W1, b1, W2, b2, P at MoPs-like scales (unit-variance x, 1/sqrt(fan-in) weights)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, d), (d, r), (r,), (r, K), (K,), (K, m, d)]
    scales = [1.0, d**-0.5, 0.5, r**-0.5, 0.5, 1.0]
    return [(torch.randn(s, generator=g) * c).to(DEVICE, dt)
            for s, c, dt in zip(shapes, scales, dtypes)]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape
    assert torch.isfinite(got).all(), "non-finite output: an element was left unwritten (NaN poison) or overflowed"
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


def _run(fn, inputs, gw, gout):
    """(w, out, grads of every input) for loss = <out, gout> + <w, gw>: w's own gradient
    (a use of the weights beside the prompt) adds to the mix's."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    w, out = fn(*leaves, TAU)
    ((out * gout.to(out.dtype)).sum() + (w * gw.to(w.dtype)).sum()).backward()
    return w, out, [t.grad for t in leaves]


def _compare(inputs, tol):
    B, K = inputs[0].shape[0], inputs[3].shape[1]
    m, d = inputs[5].shape[1:]
    g = torch.Generator().manual_seed(1)
    gout, gw = torch.randn(B, m, d, generator=g).to(DEVICE), torch.randn(B, K, generator=g).to(DEVICE)
    with gi.poisoned_outputs():
        w, out, grads = _run(gi.gate_interpolate, inputs, gw, gout)
    rw, rout, rgrads = _run(gate_interpolate_reference, [t.double() for t in inputs], gw.double(), gout.double())
    assert out.dtype == inputs[5].dtype and out.shape == (B, m, d)
    errors = {"w": _rel(w, rw), "out": _rel(out, rout)}
    for name, got, ref, inp in zip(("dx", "dW1", "db1", "dW2", "db2", "dP"), grads, rgrads, inputs):
        assert got.dtype == inp.dtype
        errors[name] = _rel(got, ref)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors over {tol}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-d{}-r{}-K{}-m{}".format(*s))
def test_forward_and_gradients_match_float64_reference(shape, dtype):
    _compare(_inputs(*shape, [dtype] * 6), TOLERANCE[dtype])


def test_large_prompt():
    """Llama-7B's m * d (409,600 elements per prompt): many tiles per strip, several splits of d.
    float32 only (the dtype the module's experts have); the interpreter needs ~5 s for it."""
    _compare(_inputs(*LARGE, [torch.float32] * 6), TOLERANCE[torch.float32])


def test_mixed_dtypes_cast_like_the_module():
    """bfloat16 pooled input, float32 gate, float16 experts: w float32, out and dP float16."""
    dtypes = [torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.float32, torch.float16]
    _compare(_inputs(9, 50, 24, 4, 6, dtypes), TOLERANCE[torch.bfloat16])


def test_non_contiguous_inputs():
    B, d, r, K, m = 6, 40, 20, 3, 5
    x, W1, b1, W2, b2, P = _inputs(B, d, r, K, m, [torch.float32] * 6)
    views = [torch.stack([x, x], 2)[:, :, 0],  # strided columns
             W1.t().contiguous().t(),  # an nn.Linear weight seen as d x r
             torch.stack([b1, b1], 1)[:, 0],
             W2.t().contiguous().t(),
             b2,
             P.permute(1, 0, 2).contiguous().permute(1, 0, 2)]  # K x m x d with m outermost in memory
    assert not any(v.is_contiguous() for v in (views[0], views[1], views[2], views[3], views[5]))
    assert all(torch.equal(v, t) for v, t in zip(views, (x, W1, b1, W2, b2, P)))
    _compare(views, TOLERANCE[torch.float32])


def test_empty_prompt():
    """m = 0: an empty out, zero dP, and the gate's gradients from w alone."""
    inputs = _inputs(3, 20, 8, 2, 1, [torch.float32] * 6)
    inputs[5] = torch.zeros(2, 0, 20, device=DEVICE)
    with gi.poisoned_outputs():
        w, out = gi.gate_interpolate(*[t.requires_grad_() for t in inputs], TAU)
        (w.sum() + out.sum()).backward()
    assert out.shape == (3, 0, 20) and inputs[5].grad.shape == (2, 0, 20)
    assert torch.isfinite(inputs[0].grad).all()


@pytest.mark.parametrize("shape", [(3, 17, 5, 3, 2), (1, 6, 2, 1, 2)], ids=["B3-K3", "B1-K1"])
def test_gradcheck_float64(shape):
    """Finite differences of the kernels themselves (fast mode: random directions, so the
    interpreter runs a few dozen forwards instead of one per input element)."""
    inputs = [t.requires_grad_() for t in _inputs(*shape, [torch.float64] * 6)]
    assert torch.autograd.gradcheck(lambda *t: gi.gate_interpolate(*t, TAU), inputs, fast_mode=True)


def test_bad_shapes_are_refused():
    x, W1, b1, W2, b2, P = _inputs(2, 8, 4, 3, 2, [torch.float32] * 6)
    with pytest.raises(ValueError, match="chain"):
        gi.gate_interpolate(x, W1.t(), b1, W2, b2, P, TAU)
    with pytest.raises(ValueError, match="mix shapes"):
        gi.gate_interpolate(x, W1, b1, W2, b2, P[:2], TAU)
    with pytest.raises(ValueError, match="temperature"):
        gi.gate_interpolate(x, W1, b1, W2, b2, P, 0.0)


def test_reference_is_the_mops_module():
    """The reference's semantics are MoPsGate.from_pooled followed by Mixture.forward."""
    torch.manual_seed(0)
    mixture = Mixture(MixtureConfig(n_experts=3, prompt_len=4, gate="mops", combine="interpolate", gate_hidden=16, temperature=TAU), 24,
                      init=torch.randn(3, 4, 24))
    assert isinstance(mixture.gate, MoPsGate)
    pooled = torch.randn(5, 24)
    w = mixture.gate.from_pooled(pooled, mixture.experts())
    prompt, bias = mixture(w)
    rw, rprompt = gate_interpolate_reference(pooled, *mops_gate_params(mixture.gate)[:4], mixture.experts(),
                                             mops_gate_params(mixture.gate)[4])
    assert bias is None
    torch.testing.assert_close(rw, w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rprompt, prompt, rtol=1e-6, atol=1e-6)


def test_kernels_on_the_mops_module_parameters():
    """What Mixture runs on CUDA (the gate kernel on its nn.Linear weights, then the mix
    kernel on its experts) equals its PyTorch path, gradients into its parameters included."""
    torch.manual_seed(0)
    config = MixtureConfig(n_experts=4, prompt_len=3, gate="mops", combine="interpolate", gate_hidden=20, temperature=TAU)
    mixture = Mixture(config, 40, init=torch.randn(4, 3, 40)).to(DEVICE)
    pooled = torch.randn(6, 40, device=DEVICE)
    target = torch.randn(6, 3, 40, device=DEVICE)

    def grads(weights_fn, mix_fn):
        mixture.zero_grad()
        w = weights_fn()
        prompt = mix_fn(w)
        ((prompt - target) ** 2).sum().backward()
        return w.detach(), prompt.detach(), {k: p.grad.clone() for k, p in mixture.named_parameters()}

    with gi.poisoned_outputs():
        ours = grads(lambda: gi.gate_weights(pooled, *mops_gate_params(mixture.gate)),
                     lambda w: gi.interpolate(w, mixture.experts()))
    torch_path = grads(lambda: mixture.gate.from_pooled(pooled, mixture.experts()), lambda w: mixture(w)[0])
    assert ours[2].keys() == torch_path[2].keys() == {"experts.weight", "gate.down.weight", "gate.down.bias",
                                                      "gate.up.weight", "gate.up.bias"}
    errors = {"w": _rel(ours[0], torch_path[0]), "prompt": _rel(ours[1], torch_path[1]),
              **{k: _rel(ours[2][k], torch_path[2][k]) for k in ours[2]}}
    assert max(errors.values()) <= TOLERANCE[torch.float32], errors


def test_mops_module_on_cpu_never_imports_triton():
    """The CPU path of Mixture is PyTorch only: Triton is imported lazily, on CUDA."""
    code = ("import sys, torch\n"
            "from mops.mixture import Mixture, MixtureConfig\n"
            "m = Mixture(MixtureConfig(n_experts=3, prompt_len=2, gate='mops', combine='interpolate', gate_hidden=8), 8)\n"
            "w = m.gate_weights(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), 2)\n"
            "assert m(w)[0].shape == (2, 2, 8)\n"
            "print('triton' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
