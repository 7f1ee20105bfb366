"""The benchmarks run end to end on tiny sizes and write valid JSON, and the PyTorch reference
(benchmarks/torch_reference.py) computes what the JAX unit and head compute on the same weights,
so the timings compare the same function."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hem_unit  # noqa: E402
import torch_reference  # noqa: E402
import train_step  # noqa: E402


def test_hem_unit_benchmark_writes_json(tmp_path):
    path = tmp_path / "hem_unit.json"
    # The unit is timed in the remat table (and checked against PyTorch below): skipped here.
    hem_unit.main(["--quick", "--modules", "core,head", "--json", str(path)])
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert {(r["module"], r["variant"]) for r in rows} == {
        (m, v) for m in ("core", "head") for v in ("hem", "em")
    }
    for r in rows:
        for key in ("jax_fwd_ms", "jax_fwdbwd_ms", "torch_fwd_ms", "torch_fwdbwd_ms"):
            assert r[key] > 0, key
        assert r["speedup_fwdbwd"] == pytest.approx(r["torch_fwdbwd_ms"] / r["jax_fwdbwd_ms"])
    fit = next(f for f in result["growth"] if (f["module"], f["metric"]) == ("core", "flops_fwd"))
    assert fit["n"] == pytest.approx(1.0, abs=0.1)  # XLA's FLOPs of the EM loop: linear in N
    assert {(r["t"], r["remat"]) for r in result["remat"]} == {
        (t, remat) for t in (1, 2) for remat in (False, True)
    }


def test_train_step_benchmark_writes_json(tmp_path):
    path = tmp_path / "train_step.json"
    train_step.main(["--quick", "--peak_tflops", "1", "--json", str(path)])
    (row,) = json.loads(path.read_text())["rows"]
    assert row["images_per_s"] > 0 and np.isfinite(row["loss"])
    assert row["xla_tflop_per_step_per_device"] > 0 and row["compiled_peak_gib"] > 0
    assert 0 < row["mfu"] < 1 and row["devices"] == jax.device_count()


def test_peak_table():
    assert train_step.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert train_step.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert train_step.peak_tflops("NVIDIA H200") == 989.0
    assert train_step.peak_tflops("TPU v5 lite") == 197.0
    assert train_step.peak_tflops("TPU v5") == 459.0
    assert train_step.peak_tflops("cpu") is None


@pytest.mark.parametrize("variant", ["hem", "em"])
@pytest.mark.parametrize("module", ["unit", "head"])
def test_torch_reference_matches_jax(module, variant):
    """Training-mode forward, updated bases, and gradients w.r.t. input and a conv kernel."""
    args = hem_unit.parse_args(["--quick"])
    point = {"side": 5, "k": 4, "c": 8, "t": 3, "batch": 2}
    m = hem_unit.model_config(variant, point, args)
    m.dropout = 0.0
    shape = hem_unit.input_shape(module, point, args)
    x = jax.random.normal(jax.random.key(0), shape)
    model = hem_unit.jax_module(module, m)
    variables = model.init(jax.random.key(1), x, train=False)
    hem_name = ("hem",) if module == "head" else ()

    def loss(params, x):
        out, updates = model.apply({**variables, "params": params}, x, train=True,
                                   mutable=hem_unit.MUTABLE)
        out = out["logits"] if module == "head" else out
        return jnp.mean(jnp.square(out)), (out, updates)

    (_, (out, updates)), (grad_params, grad_x) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(variables["params"], x)

    net = (torch_reference.unit_from_config(m, shape[-1]) if module == "unit"
           else torch_reference.head_from_config(m, shape[-1], hem_unit.NUM_CLASSES))
    torch_reference.load_flax(net, variables).train()
    x_t = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
    out_t = net(x_t) if module == "unit" else net(x_t, size=shape[1:3])
    out_t.square().mean().backward()

    to_nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    np.testing.assert_allclose(to_nhwc(out_t), out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_nhwc(x_t.grad), grad_x, rtol=1e-3, atol=1e-6)
    unit_t = net if module == "unit" else net.hem
    kernel = grad_params
    for name in (*hem_name, "conv_in", "kernel"):
        kernel = kernel[name]
    grad_t = unit_t.conv_in.weight.grad  # None for em: conv_in only feeds the gradient-free loop
    grad_t = torch.zeros_like(unit_t.conv_in.weight) if grad_t is None else grad_t
    np.testing.assert_allclose(
        grad_t.numpy(), np.asarray(kernel).transpose(3, 2, 0, 1),
        rtol=1e-3, atol=1e-6,
    )
    bases = updates["bases"]
    for name in (*hem_name, "mu"):
        bases = bases[name]
    np.testing.assert_allclose(unit_t.mu.numpy(), bases, rtol=1e-5, atol=1e-6)
