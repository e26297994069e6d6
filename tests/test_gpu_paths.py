"""What can be checked of the GPU paths on a CPU: the TensorRT static support check against the
pinned onnx-tensorrt matrix, the TensorRT provider's options, and device-resident (IOBinding)
timing, which ONNX Runtime also runs on the CPU."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_cpu_infer
import onnx_trt_infer
from moebench import tensorrt_support
from moebench.measuring import clock
from moebench.runners import onnx_runtime
from moebench.test_set import load_test_set
from conftest import one_line_error, run_script, without_gpus


def test_support_matrix_is_pinned_with_its_version_and_source():
    matrix = tensorrt_support.support_matrix()
    assert matrix["parser"] == "onnx-tensorrt 10.1-GA"
    assert matrix["source"].startswith("https://github.com/onnx/onnx-tensorrt/blob/")
    assert matrix["operators"]["NonZero"]["types"] == ["FP32", "FP16"]


def test_default_graph_is_all_tensorrt_operators_and_the_loop_graph_is_not(tiny_models):
    dense = onnx.load(str(tiny_models / "model.onnx"))
    assert {"TopK", "ScatterElements", "ConstantOfShape", "Gemm"} <= {n.op_type for n in dense.graph.node}
    assert tensorrt_support.unsupported_nodes(dense) == []
    loop = tensorrt_support.unsupported_nodes(onnx.load(str(tiny_models / "model.loop.onnx")))
    assert loop and {op for _, op, _ in loop} == {"NonZero"}
    assert all("BOOL" in why for _, _, why in loop)


def test_the_check_refuses_a_computed_top_k(tmp_path):
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "one", "two"], ["k"]),
             helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=1)]
    graph = helper.make_graph(nodes, "computed-k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("values", TensorProto.FLOAT, None)],
                              [helper.make_tensor("one", TensorProto.INT64, [1], [1]),
                               helper.make_tensor("two", TensorProto.INT64, [1], [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    problems = [why for _, op, why in tensorrt_support.unsupported_nodes(model) if op == "TopK"]
    assert problems == ["TopK's K is computed, not a constant"]


def test_trt_check_only_needs_no_gpu_and_exits_by_its_verdict(tiny_models):
    dense = run_script("onnx_trt_infer.py", "--model", str(tiny_models / "model.onnx"), "--check-only")
    assert dense.returncode == 0 and "all 14 nodes supported by onnx-tensorrt 10.1-GA" in dense.stdout
    loop = run_script("onnx_trt_infer.py", "--model", str(tiny_models / "model.loop.onnx"), "--check-only")
    assert loop.returncode == 1 and "NonZero on BOOL" in loop.stdout


def test_trt_without_its_provider_says_how_to_install_it(tiny_models):
    line = one_line_error(run_script("onnx_trt_infer.py", "--model", str(tiny_models / "model.onnx"),
                                     env=without_gpus()))
    assert "TensorrtExecutionProvider is not available" in line
    assert "requirements-gpu.txt" in line and "tensorrt-cu13==10.16.1.11" in line


def test_tensorrt_options_follow_the_provider_documentation():
    args = onnx_trt_infer.parse_args(["--batch-size", "256", "--fp16", "--engine-cache", "cache"])
    options = tensorrt_support.tensorrt_options(args.device_id, args.fp16, args.batch_size, args.max_batch,
                                                args.engine_cache)
    assert options["trt_profile_min_shapes"] == "pixels:1x1x28x28"
    assert options["trt_profile_opt_shapes"] == "pixels:256x1x28x28"
    assert options["trt_profile_max_shapes"] == "pixels:10000x1x28x28"
    assert options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == "cache"


def test_resident_iobinding_runner_gives_session_run_logits(tiny_models, mnist_dir):
    images, _ = load_test_set(mnist_dir, 700)
    with onnx_runtime.runner(str(tiny_models / "model.onnx")) as runner:
        host, resident = runner.clock("host"), runner.clock("resident")
        assert "IOBinding" in resident.timing and "host" in host.timing
        np.testing.assert_array_equal(clock.full_pass(resident, images, 256), clock.full_pass(host, images, 256))
        assert len(clock.time_single_images(resident, images, 5)) == 5


def test_cpu_script_prints_both_timing_modes(tiny_models, mnist_dir, tmp_path):
    results = tmp_path / "results.jsonl"
    records = onnx_cpu_infer.main(["--model", str(tiny_models / "model.onnx"), "--data-dir", mnist_dir,
                                   "--test-limit", "300", "--latency-runs", "20", "--quiet", "--timing", "both",
                                   "--json", str(results)])
    assert [r["timing"].split(":")[0] for r in records] == ["end to end from host numpy arrays", "device-resident"]
    assert records[0]["accuracy"] == records[1]["accuracy"]
    assert [json.loads(line)["timing"] for line in results.read_text().splitlines()] == [r["timing"] for r in records]


@pytest.mark.parametrize("script, flags", [
    ("onnx_cuda_infer.py", ["--model", "model.onnx"]),
    ("torch_infer.py", ["--model", "checkpoint.pt", "--device", "cuda"]),
    ("benchmark.py", ["--checkpoint", "checkpoint.pt", "--device", "cuda"]),
    ("train.py", ["--device", "cuda"])])
def test_gpu_scripts_without_a_gpu_say_so(tiny_models, script, flags):
    flags = [str(tiny_models / flag) if flag.startswith(("model", "checkpoint")) else flag for flag in flags]
    line = one_line_error(run_script(script, *flags, env=without_gpus()))
    assert "CUDA" in line and "requirements-gpu.txt" in line
