"""The benchmarks run end to end on tiny sizes and write valid JSON, and the PyTorch reference
(benchmarks/torch_reference.py) computes what the JAX unit and head compute on the same weights,
so the timings compare the same function."""

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accelerator_check  # noqa: E402
import hem_unit  # noqa: E402
import plan_table  # noqa: E402
import torch_reference  # noqa: E402
import train_step  # noqa: E402

from hemnet_jax.models import create_model  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402


@pytest.mark.heavy(seconds=25)
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


@pytest.mark.heavy(seconds=40)
def test_train_step_benchmark_writes_json(tmp_path):
    """JAX on every device, and PyTorch (child process) on one device with the per-device batch,
    in one run; speedup compares images/s per device."""
    path = tmp_path / "train_step.json"
    train_step.main(["--quick", "--peak_tflops", "1", "--json", str(path)])
    (row,) = json.loads(path.read_text())["rows"]
    assert row["images_per_s"] > 0 and np.isfinite(row["loss"])
    assert row["xla_tflop_per_step_per_device"] > 0 and row["compiled_peak_gib"] > 0
    assert 0 < row["mfu"] < 1 and row["devices"] == jax.device_count()
    assert row["torch_device"] == "cpu" and row["torch_batch"] == row["batch"] // row["devices"]
    assert row["torch_images_per_s"] > 0 and np.isfinite(row["torch_loss"])
    assert row["speedup"] == pytest.approx(
        row["images_per_s"] / row["devices"] / row["torch_images_per_s"])


@pytest.mark.heavy(seconds=45)
def test_accelerator_check_tiny(tmp_path):
    """The accelerator check's one JSON: the train step with MFU, memory and PyTorch beside it,
    and the HEM core against float64, where bfloat16 features cost orders of magnitude more
    error than float32 (on this CPU both float32 settings are exact float32 matmuls)."""
    path = tmp_path / "check.json"
    accelerator_check.main(["--tiny", "--peak_tflops", "1", "--json", str(path)])
    result = json.loads(path.read_text())
    step = result["train_step"]
    assert step["backbone"] == "resnet_tiny" and 0 < step["mfu"] < 1
    assert step["compiled_peak_gib"] > 0 and step["torch_images_per_s"] > 0
    assert step["speedup"] == pytest.approx(
        step["images_per_s"] / step["devices"] / step["torch_images_per_s"])
    rows = {(r["variant"], r["setting"]): r for r in result["hem_core_precision"]}
    assert set(rows) == {(v, s) for v in ("hem", "em")
                         for s in ("float32", "float32_highest", "bfloat16")}
    for variant in ("hem", "em"):
        f32, bf16 = rows[variant, "float32"], rows[variant, "bfloat16"]
        assert 0 < f32["out_rel_err"] < 1e-5 and 1e-4 < bf16["out_rel_err"] < 1e-2
    assert rows["hem", "bfloat16"]["grad_rel_err"] > 100 * rows["hem", "float32"]["grad_rel_err"]
    assert "grad_rel_err" not in rows["em", "float32"]  # EM's loop is gradient-free


def test_train_step_benchmark_without_torch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_step.importlib.util, "find_spec", lambda name: None)
    assert train_step.torch_in_child(["--quick"]) is None
    assert "PyTorch is not installed" in capsys.readouterr().out


def test_peak_table():
    assert train_step.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert train_step.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert train_step.peak_tflops("NVIDIA H200") == 989.0
    assert train_step.peak_tflops("TPU v5 lite") == 197.0
    assert train_step.peak_tflops("TPU v5") == 459.0
    assert train_step.peak_tflops("cpu") is None


@pytest.mark.parametrize("variant", ["hem", "em"])
@pytest.mark.parametrize("module", ["unit", "head"])
def test_torch_reference_matches_jax(module, variant, default_cpu_emitters):
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


@pytest.mark.heavy(seconds=20)
@pytest.mark.parametrize("stem", ["deep", "torchvision"])
def test_torch_hemnet_matches_jax(stem):
    """The whole PyTorch network (dilated ResNet + head, `model_from_config`), run in float64 on
    the JAX model's weights, computes the JAX HEMNet's logits: in eval mode, and in a
    training-mode forward (BatchNorm on batch statistics, bases and running means updated) with
    the same input gradient. Odd input size (33): strided convs and the max pool must pad and
    round as PyTorch does; a wrong dilation or padding moves logits by 1e-2 or more.

    Tolerances: eval agrees to 2e-7 (logits of scale 0.4). Training mode agrees to 2e-4 (scale
    1.8) and input gradients to 1.5e-4 (scale 0.1): the JAX side's float32 rounding, amplified
    by BatchNorm over 50 values per channel in layer4; Flax's one-pass variance
    E[x^2] - E[x]^2 is most of it (two-pass: 1e-4)."""
    m = tiny_config().model
    m.stem, m.dropout, m.bn_momentum = stem, 0.0, 0.5
    model = create_model(m, hem_unit.NUM_CLASSES)
    # Jitted, as training and evaluation run it: op by op, each of the network's ops compiles
    # on its own (this test took 16 s instead of 8.5, measured).
    train_forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=hem_unit.MUTABLE))
    images = jax.random.normal(jax.random.key(0), (2, 33, 33, 3))
    variables = jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(1), images)
    # Running statistics from other images, so that eval-mode BatchNorm normalises real
    # activations (the initial ones leave the head's ReLUs dead and the logits constant).
    _, stats = train_forward(variables, jax.random.normal(jax.random.key(2), images.shape))
    variables = {**variables, **stats}
    net = torch_reference.load_flax(
        torch_reference.model_from_config(m, hem_unit.NUM_CLASSES), variables).double()
    images_t = torch.tensor(np.asarray(images).transpose(0, 3, 1, 2), dtype=torch.float64,
                            requires_grad=True)
    to_nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731

    net.eval()
    with torch.no_grad():
        logits_t = to_nhwc(net(images_t))
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])(variables, images)
    assert logits_t.std() > 0.1  # not a constant map
    np.testing.assert_allclose(logits, logits_t, rtol=1e-5, atol=1e-6)

    def loss(images):
        out, updates = train_forward(variables, images)
        return jnp.mean(jnp.square(out["logits"])), (out["logits"], updates)

    (_, (logits, updates)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(images)
    net.train()
    logits_t = net(images_t)
    logits_t.square().mean().backward()
    np.testing.assert_allclose(logits, to_nhwc(logits_t), rtol=0, atol=1e-3)
    np.testing.assert_allclose(grad, to_nhwc(images_t.grad), rtol=0, atol=5e-4)
    np.testing.assert_allclose(updates["bases"]["hem"]["mu"], net.hem.mu.numpy(),
                               rtol=1e-5, atol=1e-6)
    # Running means only: PyTorch keeps the unbiased running variance, Flax the biased one.
    bn = updates["batch_stats"]["backbone"]["layer4_2"]["bn3"]
    np.testing.assert_allclose(bn["mean"], net.backbone.layer4[2].bn3.running_mean.numpy(),
                               rtol=1e-5, atol=1e-5)


def test_torch_reference_has_no_aux_head():

    m = tiny_config().model
    m.aux_head = True
    with pytest.raises(ValueError, match="aux_head"):
        torch_reference.model_from_config(m, 3)


def test_torch_reference_rejects_an_unknown_backbone():
    m = tiny_config().model
    m.backbone = "resnet34"
    with pytest.raises(ValueError, match=r"'resnet34'.*resnet101"):
        torch_reference.model_from_config(m, 3)


def test_compiled_tables_in_the_readme_are_the_jsons(tmp_path):
    """benchmarks/README.md's compiled-plan, HEM/EM and host-feed tables are what
    `plan_table.py --readme` writes from benchmarks/plans/*.json, row for row."""
    copy = tmp_path / "README.md"
    shutil.copy(plan_table.README, copy)
    plan_table.write_readme(copy)
    assert copy.read_text() == plan_table.README.read_text()
    names = [p.stem for p in plan_table.PLANS_DIR.glob("*.json") if p.stem in plan_table.ROWS]
    assert len(names) > 30 and all(f"| {name} |" in copy.read_text() for name in names)
