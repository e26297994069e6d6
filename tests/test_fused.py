"""The fused INT8 custom operator, on every path this CPU has (amx, vnni, avx2, portable): exactly the
integer arithmetic it claims (against a numpy reference of the same quantization), the same answers
on every path, the same answer for a row in any batch, held to the fp32 model it stands in for
(argmax agreement >= 99.9%, accuracy within 0.3 points), and safe at its C++ boundary."""
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from moebench import checkpoint, export, fused
from moebench.runners import onnx_runtime
from moebench.cli import UserError
from data import load_split
from conftest import ROOT

IMAGES = 10000  # the agreement criterion is a rate: on a 2000-image slice a few near-tied images decide it
KERNELS = fused.available_kernels()  # every path this CPU has (all four on an Intel Xeon with AMX), never a skip
# The integer sums are exact on every path; the float parts (dequantization, gate, second layer) run
# in another order on each, so logits may differ by float32 rounding.
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def trained(small_models):
    model, structure, _ = checkpoint.load_model(str(small_models / "checkpoint.pt"))
    return model, structure, {kernel: fused.FusedInt8(model, structure, kernel) for kernel in KERNELS}


@pytest.fixture(scope="module")
def test_set(mnist_dir):
    return load_split("test", mnist_dir, IMAGES)


def reference(model, structure, pixels):
    """The operator's arithmetic in numpy: uint8 pixels and int8 weights, exact integer products."""
    (embed_q, embed_scale, embed_bias, gate_w, fc1_q, fc1_scale, fc1_bias, fc2_q, fc2_scale, fc2_b,
     head_bias) = [t.numpy() for t in fused.pack(model, structure, "vnni")]

    def unpack(packed):  # (K/4, N, 4) -> (K, N)
        k4, n, _ = packed.shape
        return packed.transpose(0, 2, 1).reshape(4 * k4, n).astype(np.int64)

    def as_uint8(rows):  # values >= 0 -> (uint8 values, one scale per row)
        scale = np.where(rows.max(1) > 0, rows.max(1) / 255, 1).astype(np.float32)
        return np.clip(np.rint(rows * (1 / scale)[:, None]), 0, 255).astype(np.int64), scale
    a = np.clip(np.rint(pixels.reshape(len(pixels), -1).astype(np.float32) * np.float32(255)), 0, 255).astype(np.int64)
    emb = np.maximum(0, (a @ unpack(embed_q)).astype(np.float32) * embed_scale + embed_bias)
    logits_gate = emb @ gate_w[:, :structure["EXPERTS"]]
    order = np.argsort(-logits_gate, axis=1, kind="stable")[:, :structure["TOP"]]
    top = np.take_along_axis(logits_gate, order, 1)
    weights = np.exp(top - top.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    q, scale = as_uint8(emb)
    fc1, fc2 = [unpack(w) for w in fc1_q], [unpack(w) for w in fc2_q]
    out = np.tile(head_bias, (len(pixels), 1)).astype(np.float64)
    gates = np.zeros((len(pixels), structure["EXPERTS"]), np.float32)
    for row in range(len(pixels)):
        for slot, expert in enumerate(order[row]):
            hidden = np.maximum(0, (q[row] @ fc1[expert]) * scale[row] * fc1_scale[expert] + fc1_bias[expert])
            hidden_q, hidden_scale = as_uint8(hidden[None].astype(np.float32))
            second = (hidden_q[0] @ fc2[expert]) * hidden_scale[0] * fc2_scale[expert]
            out[row] += weights[row, slot] * (second[:out.shape[1]] + fc2_b[expert])
            gates[row, expert] = weights[row, slot]
    return out, gates


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_kernel_computes_what_its_quantization_says(trained, test_set, kernel):
    model, structure, ops = trained
    pixels = test_set[0][:300]
    logits, gates = ops[kernel](pixels)
    expected_logits, expected_gates = reference(model, structure, pixels.numpy())
    np.testing.assert_allclose(logits.numpy(), expected_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gates.numpy(), expected_gates, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_path_gives_the_fastest_path_s_answers(trained, test_set, kernel):
    _, _, ops = trained
    pixels = test_set[0]
    best_logits, best_gates = ops[KERNELS[0]](pixels)
    logits, gates = ops[kernel](pixels)
    assert float((logits - best_logits).abs().max()) <= LOGIT_TOLERANCE
    assert torch.equal(gates > 0, best_gates > 0)  # the same experts for every image
    assert float((gates - best_gates).abs().max()) <= 1e-5
    assert torch.equal(logits.argmax(1), best_logits.argmax(1))


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_python_binding_and_the_registered_torch_op_are_one_operator(trained, test_set, kernel):
    _, _, ops = trained
    op = ops[kernel]
    assert fused.build(kernel).kernel == kernel  # the build really is that path
    pixels = test_set[0][:300]
    through_torch_ops = getattr(torch.ops, f"moe_fused_{kernel}").int8_forward(pixels, op.tensors, op.top)
    for got, expected in zip(through_torch_ops, op(pixels)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("batch", [1, 3, 130, 700])
def test_a_row_gets_the_same_answer_in_any_batch(trained, test_set, batch, kernel):
    op = trained[2][kernel]
    pixels = test_set[0][:700]
    whole = op(pixels)[0]
    parts = torch.cat([op(pixels[i:i + batch])[0] for i in range(0, len(pixels), batch)])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_fused_path_keeps_the_fp32_model_s_answers(trained, test_set, kernel):
    model, _, ops = trained
    pixels, labels = test_set
    with torch.no_grad():
        fp32_logits, fp32_gates = model.eval()(pixels)
    logits, gates = ops[kernel](pixels)
    agreement = float((logits.argmax(1) == fp32_logits.argmax(1)).float().mean())
    fp32_accuracy = 100 * float((fp32_logits.argmax(1) == labels).float().mean())
    accuracy = 100 * float((logits.argmax(1) == labels).float().mean())
    assert agreement >= 0.999, agreement
    assert abs(accuracy - fp32_accuracy) <= 0.3, (accuracy, fp32_accuracy)
    assert float(((gates > 0) == (fp32_gates > 0)).all(1).float().mean()) >= 0.99  # routing kept


def test_tied_gate_logits_choose_the_experts_the_onnx_graph_chooses(small_models, test_set, tmp_path):
    """ONNX TopK takes the lower index among equal values; so must the operator. A zero gate ties
    every expert in every image: both take experts 0 and 1. Expert 3's gate column made a copy of
    expert 1's ties those two in every image: neither ever takes 3 without 1."""
    model, structure, _ = checkpoint.load_model(str(small_models / "checkpoint.pt"))
    pixels = test_set[0][:2000]
    for name, change in (("pair", lambda w: w[:, 3].copy_(w[:, 1])), ("all", lambda w: w.zero_())):
        with torch.no_grad():
            change(model.moe.w_gate)
        export.export(model, str(tmp_path / f"{name}.onnx"), "torchscript")
        session = onnx_runtime.create_session(str(tmp_path / f"{name}.onnx"), ["CPUExecutionProvider"])
        chosen = {"onnx": session.run(["gates"], {"pixels": pixels.numpy()})[0] > 0}
        chosen.update({kernel: fused.FusedInt8(model, structure, kernel)(pixels)[1].numpy() > 0 for kernel in KERNELS})
        for who, picks in chosen.items():
            if name == "all":
                assert picks[:, :2].all() and not picks[:, 2:].any(), who
            else:
                assert picks[:, 3].sum() > 0 and not (picks[:, 3] & ~picks[:, 1]).any(), who


@pytest.mark.parametrize("kernel", KERNELS)
def test_more_than_sixteen_experts_and_wide_layers_compute_what_the_quantization_says(test_set, kernel):
    """The gate in chunks of 16 experts and the grouping past 16 (the sweep's models larger than the
    caches take 64): a random 40-expert model, its gate spread so that experts past 16 are chosen."""
    import config
    from moe import build_model
    structure = {**config.defaults(), "EXPERTS": 40, "TOP": 3, "EMB_SIZE": 192, "HIDDEN_SIZE": 320}
    torch.manual_seed(0)
    model = build_model(structure).eval()
    with torch.no_grad():
        model.moe.w_gate.normal_(0, 1)
    pixels = test_set[0][:300]
    logits, gates = fused.FusedInt8(model, structure, kernel)(pixels)
    expected_logits, expected_gates = reference(model, structure, pixels.numpy())
    assert int((gates > 0).any(0)[16:].sum()) >= 10  # experts past the first 16 took rows
    np.testing.assert_allclose(logits.numpy(), expected_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gates.numpy(), expected_gates, rtol=1e-5, atol=1e-6)
    single = fused.FusedInt8(model, structure, kernel).logits(pixels[:1].numpy())  # the one-row path
    np.testing.assert_allclose(single, expected_logits[:1], rtol=1e-4, atol=1e-4)


def test_structures_the_kernel_cannot_take_are_one_clear_error(tiny_models):
    model, structure, _ = checkpoint.load_model(str(tiny_models / "checkpoint.pt"))  # EMB_SIZE 32
    with pytest.raises(UserError, match="multiples of 64"):
        fused.FusedInt8(model, structure)
    assert not fused.takes({**structure, "EMB_SIZE": 64, "HIDDEN_SIZE": 64, "EXPERTS": fused.MAX_EXPERTS + 1})


def test_the_path_is_picked_for_the_cpu_and_the_environment_can_force_one(monkeypatch):
    monkeypatch.delenv(fused.ENV, raising=False)
    assert fused.chosen_kernel() == KERNELS[0]
    monkeypatch.setattr(fused, "cpu_flags", lambda: {"avx2", "fma", "sse4_2"})  # an AVX2-only CPU
    assert fused.available_kernels() == (["avx2", "portable"] if fused.x86() else ["portable"])
    assert fused.unavailable_kernels()["vnni"].startswith("this CPU lacks avx512f, avx512bw, avx512_vnni")
    monkeypatch.setenv(fused.ENV, "portable")
    assert fused.chosen_kernel() == "portable"
    monkeypatch.setenv(fused.ENV, "vnni")
    with pytest.raises(UserError, match="MOE_FUSED_KERNEL=vnni: this CPU lacks avx512f"):
        fused.chosen_kernel()
    monkeypatch.setenv(fused.ENV, "sse")
    with pytest.raises(UserError, match="MOE_FUSED_KERNEL=sse: expected one of amx, vnni, avx2, portable"):
        fused.chosen_kernel()


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_non_contiguous_batch_gets_the_contiguous_batch_s_answers(trained, test_set, kernel):
    op = trained[2][kernel]
    pixels = test_set[0][:300]
    transposed = pixels.squeeze(1).transpose(1, 2).contiguous().transpose(1, 2).unsqueeze(1)
    every_other = torch.cat([pixels, pixels])[::2]
    for batch in (transposed, every_other):
        assert not batch.is_contiguous()
    for got, expected in zip(op(transposed), op(pixels)):
        assert torch.equal(got, expected)
    for got, expected in zip(op(every_other), op(torch.cat([pixels, pixels])[::2].contiguous())):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("change, message", [
    (lambda p, w, top: (p.double(), w, top), "pixels must be float32, got Double"),
    (lambda p, w, top: (p[:, :, :27], w, top), r"pixels must be \(N, 1, 28, 28\) or \(N, 784\), got \[5, 1, 27, 28\]"),
    (lambda p, w, top: (p.to("meta"), w, top), "pixels must be a CPU tensor, got meta"),
    (lambda p, w, top: (p, w[:9], top), "expected 11 weight tensors, got 9"),
    (lambda p, w, top: (p, w, 0), "needs 1 <= TOP <= EXPERTS <= 256, got TOP 0"),
    (lambda p, w, top: (p, w, 5), "needs 1 <= TOP <= EXPERTS <= 256, got TOP 5, EXPERTS 4"),
    (lambda p, w, top: (p, [w[0][:100]] + w[1:], top),
     r"weight embed_q must have shape \[(208, 64, 4|196, 64, 4|392, 64, 2|784, 64, 1)\]"),
    (lambda p, w, top: (p, w[:1] + [w[1].double()] + w[2:], top), "weight embed_scale must be Float, got Double"),
])
def test_the_operator_checks_its_inputs_at_the_c_boundary(trained, test_set, change, message):
    for op in trained[2].values():
        pixels, weights, top = change(test_set[0][:5], list(op.tensors), op.top)
        with pytest.raises(RuntimeError, match=message):
            op.op(pixels, weights, top)


def test_the_operator_lets_other_python_threads_run_while_it_computes(trained, test_set):
    """The pybind11 binding releases the GIL: a Python thread keeps counting during a long call."""
    op = trained[2][KERNELS[0]]
    big = test_set[0].repeat(20, 1, 1, 1)  # 200k images: about 0.1-0.5 s here
    ticks, running = [], threading.Event()

    def count():
        running.set()
        while running.is_set():
            ticks.append(time.perf_counter())
    counter = threading.Thread(target=count)
    counter.start()
    running.wait()
    started = time.perf_counter()
    op(big)
    ended = time.perf_counter()
    running.clear()
    counter.join()
    middle = (started + (ended - started) / 4, ended - (ended - started) / 4)
    assert sum(middle[0] <= t <= middle[1] for t in ticks) > 100, (ended - started, len(ticks))


ONE_THREAD = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch
from moebench import checkpoint, fused
torch.set_num_threads(1)
model, structure, _ = checkpoint.load_model({checkpoint!r})
op = fused.FusedInt8(model, structure, {kernel!r})
pixels = torch.rand(60000, 1, 28, 28)
op(pixels)
cpu, wall = time.process_time(), time.perf_counter()
for _ in range(3):
    op(pixels)
print((time.process_time() - cpu) / (time.perf_counter() - wall))
"""


@pytest.mark.parametrize("kernel", KERNELS)
def test_torch_set_num_threads_limits_the_operator(small_models, kernel):
    """Its threads are PyTorch's (at::parallel_for): with one thread the process uses one core."""
    code = ONE_THREAD.format(root=ROOT, checkpoint=str(small_models / "checkpoint.pt"), kernel=kernel)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cores_busy = float(done.stdout.strip().splitlines()[-1])
    assert cores_busy <= 1.15, cores_busy


def test_one_openmp_runtime_in_the_process(trained):
    """The operator links no OpenMP runtime of its own (ldd), so a process with PyTorch and every path
    of the operator holds only PyTorch's (checked in a process of its own: other engines, MNN's wheel
    among them, bring runtimes of their own, docs/engines.md)."""
    openmp = re.compile(r"lib(?:g|i)?omp[-.]")
    for kernel in KERNELS:
        linked = subprocess.run(["ldd", fused.build(kernel).__file__], capture_output=True, text=True, check=True)
        assert not openmp.search(linked.stdout), linked.stdout
    program = ("import re, torch; from moebench import fused; [fused.build(k) for k in fused.available_kernels()]; "
               "print('\\n'.join(line.split()[-1] for line in open('/proc/self/maps')))")
    found = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = {path for path in found.stdout.splitlines() if openmp.search(path)}
    assert len(loaded) == 1, loaded


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_prepared_operator_answers_numpy_as_the_torch_op_does_and_says_where_its_time_goes(trained, test_set,
                                                                                                 kernel):
    op = trained[2][kernel]
    for count in (1, 5, 300):  # one image runs on the register tiles; 300 on AMX's tiles where the CPU has them
        pixels = test_set[0][:count]
        for got, expected in zip(op.numpy(pixels.numpy()), op(pixels)):
            assert np.array_equal(got, expected.numpy())
        assert np.array_equal(op.logits(pixels.numpy()), op(pixels)[0].numpy())
    float64 = test_set[0][:5].numpy().astype(np.float64)  # not the input contract, and not silently cast
    for call, refused in ((op.numpy, [float64]), (op.logits, [float64, test_set[0][:10].numpy()[::2], [0.0] * 784])):
        for wrong in refused:  # op.logits reads the array's memory as it is: no copy of a strided array either
            with pytest.raises(TypeError, match="float32" if call is op.logits else ""):
                call(wrong)
        with pytest.raises(RuntimeError, match=r"pixels must be \(N, 1, 28, 28\) or \(N, 784\) float32"):
            call(np.zeros((5, 700), np.float32))
    phases = op.profile(test_set[0].numpy(), repeats=3)  # 157 blocks of rows: work for every thread
    assert list(phases) == op.phases and len(op.phases) == 7
    assert all(len(per_thread) == torch.get_num_threads() for per_thread in phases.values())
    assert all(seconds > 0 for seconds in phases["embedding"] + phases["experts' first layers"])  # every thread worked
    assert 0 < sum(phases["input quantization"]) < sum(sum(per_thread) for per_thread in phases.values())
