"""Provider planning: what is asked of onnxruntime, and every fallback reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from harness.servers import served
from model_runtime import options as options_module
from model_runtime.options import CPU, CUDA, IN_PROCESS, TENSORRT, RuntimeOptions
from model_runtime.providers import (
    NO_NVIDIA_DRIVER,
    ProviderPlan,
    nvidia_driver_present,
    plan_providers,
)
from model_runtime.session import ARENA_SHRINKAGE, ModelSession, default_thread_count
from tests.conftest import ROOT
from tests.service_support import cpu_settings, ready_client

ALL = {TENSORRT, CUDA, CPU}


def test_unavailable_providers_are_skipped_and_said() -> None:
    plan = plan_providers(RuntimeOptions(providers=(CUDA, CPU)), {CPU})
    assert plan.entries == ((CPU, {}),)
    assert plan.notes == (f"{CUDA} is not available in this onnxruntime build",)


def test_without_an_nvidia_driver_no_gpu_provider_is_asked_for() -> None:
    plan = plan_providers(
        RuntimeOptions(providers=(CUDA, CPU), tensorrt=True), ALL, gpu_present=False
    )
    assert plan.names == (CPU,)
    assert plan.notes == (f"{TENSORRT} {NO_NVIDIA_DRIVER}", f"{CUDA} {NO_NVIDIA_DRIVER}")


def test_a_cpu_machine_starts_without_a_library_error(served_model: Path) -> None:
    if nvidia_driver_present():
        pytest.skip("this machine has an NVIDIA driver: CUDA is rightly tried here")
    with served(served_model, ROOT, providers=f'["{CUDA}", "{CPU}"]') as server:
        log = server.output()
    assert "onnxruntime_providers_cuda" not in log and "[E:onnxruntime" not in log
    assert "WARNING" not in log
    assert f"serving on {CPU}: {CUDA} {NO_NVIDIA_DRIVER}" in log


def test_cuda_options_come_from_the_settings() -> None:
    options = RuntimeOptions(
        providers=(CUDA, CPU),
        cudnn_conv_algo_search="EXHAUSTIVE",
        gpu_mem_limit_bytes=2**30,
        arena_extend_strategy="kSameAsRequested",
        cuda_graph=True,
    )
    plan = plan_providers(options, ALL)
    assert plan.names == (CUDA, CPU) and plan.notes == () and plan.cuda_graph
    assert dict(plan.entries)[CUDA] == {
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
        "enable_cuda_graph": "1",
        "gpu_mem_limit": str(2**30),
    }
    assert not plan.without_cuda_graph("capture failed").cuda_graph


def test_tensorrt_goes_first_with_its_engine_cache(tmp_path: Path) -> None:
    plan = plan_providers(
        RuntimeOptions(providers=(CUDA, CPU), tensorrt=True, tensorrt_cache_dir=tmp_path), ALL
    )
    assert plan.names == (TENSORRT, CUDA, CPU)
    options = dict(plan.entries)[TENSORRT]
    assert options["trt_engine_cache_enable"] == "1"
    assert options["trt_engine_cache_path"] == str(tmp_path)
    without = plan_providers(RuntimeOptions(providers=(CUDA, CPU), tensorrt=True), {CUDA, CPU})
    assert without.names == (CUDA, CPU)
    assert without.notes == (f"{TENSORRT} is not available in this onnxruntime build",)


def test_cuda_graph_without_cuda_is_reported() -> None:
    plan = plan_providers(RuntimeOptions(providers=(CPU,), cuda_graph=True), ALL)
    assert plan.names == (CPU,) and not plan.cuda_graph
    assert plan.notes == ("cuda_graph needs the CUDA provider in use: off",)


def test_providers_that_did_not_load_are_reported_after_the_fact() -> None:
    plan = ProviderPlan(((CUDA, {}), (CPU, {})), ("earlier note",))
    assert plan.fallbacks((CPU,)) == (
        "earlier note",
        f"{CUDA} was requested but is not in use (its libraries did not load)",
    )
    assert plan.fallbacks((CUDA, CPU)) == ("earlier note",)
    graph = plan_providers(RuntimeOptions(providers=(CUDA, CPU), cuda_graph=True), ALL)
    assert graph.fallbacks((CPU,))[-1] == "cuda_graph needs the CUDA provider in use: off"
    assert graph.fallbacks((CUDA, CPU)) == ()


def test_every_gpu_option_falls_back_on_this_cpu_machine(served_model: Path) -> None:
    options = RuntimeOptions(tensorrt=True, cuda_graph=True, io_binding=True)
    session = ModelSession(served_model, options)
    if session.provider != CPU:
        pytest.skip("CUDA loaded here: this test is about a machine without a GPU")
    reported = " | ".join(session.fallbacks)
    for provider in (TENSORRT, CUDA):
        # onnxruntime-gpu lists them and fails to load them; plain onnxruntime lacks them.
        assert provider in reported
        assert (
            provider not in ort.get_available_providers()
            or "did not load" in reported
            or f"{provider} {NO_NVIDIA_DRIVER}" in reported
        )
    assert "cuda_graph" in reported
    assert session.runtime == {
        "engine": "onnxruntime",
        "lone_engine": "onnxruntime",
        "file_precision": "fp32",
        "provider": CPU,
        "inference_workers": "1",
        "intra_op_threads": str(default_thread_count()),
        "lone_call_spinning": "off",
        "cpu_memory_arena": "on",
        "precision": "fp32",
        "batch": "dynamic",
        "io_binding": "on",
        "cuda_graph": "off",
        "tensorrt": "off",
    }


def test_inference_workers_default_to_two_on_cpu_and_one_with_io_binding(
    served_model: Path,
) -> None:
    two = ModelSession(served_model, IN_PROCESS)
    assert two.inference_workers == 2
    # The two calls share the cores: each session call gets half of them (at least one).
    expected_threads = max(1, default_thread_count() // 2)
    assert two.runtime["intra_op_threads"] == str(expected_threads)
    three = IN_PROCESS.model_copy(update={"inference_workers": 3})
    assert ModelSession(served_model, three).inference_workers == 3
    bound = ModelSession(served_model, three.model_copy(update={"io_binding": True}))
    assert bound.inference_workers == 1
    assert bound.fallbacks[-1] == "inference_workers 3: 1 (IO binding runs one call at a time)"


def test_a_lone_call_session_gives_the_same_probabilities(served_model: Path) -> None:
    lone = IN_PROCESS.model_copy(update={"lone_call_spinning": True})
    session = ModelSession(served_model, lone)
    assert session.runtime["lone_call_spinning"] == "on"
    assert session.warm_up_batch_sizes() == (1, 2)  # one call through each session
    batch = np.random.default_rng(0).standard_normal((1, 3, 128, 128)).astype(np.float32)
    np.testing.assert_allclose(
        session.infer_alone(batch)["probabilities"], session.predict(batch), atol=1e-6
    )
    bound = ModelSession(served_model, lone.model_copy(update={"io_binding": True}))
    assert bound.runtime["lone_call_spinning"] == "off"  # bound calls go through the buckets
    plain = ModelSession(served_model, IN_PROCESS)
    assert plain.runtime["lone_call_spinning"] == "off" and plain.warm_up_batch_sizes() == (1,)


def test_the_cpu_arena_is_kept_whole_for_small_models_and_for_one_image_of_large_ones(
    served_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto: all of it up to ARENA_MAX_MODEL_BYTES of model file; above, a call of several
    images, on either session, gives back what the arena grew for it; on and off as said."""
    assert ModelSession(served_model, IN_PROCESS).runtime["cpu_memory_arena"] == "on"
    off = IN_PROCESS.model_copy(update={"cpu_memory_arena": "off", "lone_call_spinning": True})
    session = ModelSession(served_model, off)
    assert session.runtime["cpu_memory_arena"] == "off"
    batch = np.zeros((1, 3, 128, 128), np.float32)
    np.testing.assert_array_equal(
        session.infer_alone(batch)["probabilities"], session.predict(batch)
    )
    images = np.random.default_rng(4).random((3, 3, 128, 128), np.float32)
    reference = ModelSession(served_model, IN_PROCESS).predict(images)

    monkeypatch.setattr(options_module, "ARENA_MAX_MODEL_BYTES", served_model.stat().st_size - 1)
    calls: list[tuple[int, str]] = []
    run = ort.InferenceSession.run

    def recorded(
        self: ort.InferenceSession,
        names: list[str],
        feeds: dict[str, np.ndarray],
        options: ort.RunOptions | None = None,
    ) -> object:
        try:
            shrinks = options.get_run_config_entry(ARENA_SHRINKAGE) if options else ""
        except RuntimeError:  # onnxruntime's answer for an entry never set
            shrinks = ""
        calls.append((len(next(iter(feeds.values()))), shrinks))
        return run(self, names, feeds, options)

    monkeypatch.setattr(ort.InferenceSession, "run", recorded)
    large = ModelSession(served_model, IN_PROCESS.model_copy(update={"lone_call_spinning": True}))
    assert large.runtime["cpu_memory_arena"] == "kept for one image"
    calls.clear()
    np.testing.assert_array_equal(large.predict(images), reference)
    np.testing.assert_array_equal(large.infer_alone(images[:1])["probabilities"], reference[:1])
    np.testing.assert_array_equal(large.infer_alone(images)["probabilities"], reference)
    assert calls == [(3, "cpu:0"), (1, ""), (3, "cpu:0")]
    forced = IN_PROCESS.model_copy(update={"cpu_memory_arena": "on"})
    assert ModelSession(served_model, forced).runtime["cpu_memory_arena"] == "on"


def test_the_api_and_metrics_report_what_is_in_effect(served_model: Path) -> None:
    settings = cpu_settings(served_model, tensorrt=True, io_binding=True)
    with ready_client(settings) as client:
        (info,) = client.get("/v1/models").json()["models"]
        metrics = client.get("/metrics").text
    assert info["runtime"]["io_binding"] == "on" and info["runtime"]["tensorrt"] == "off"
    assert any(TENSORRT in fallback for fallback in info["fallbacks"])
    (line,) = [m for m in metrics.splitlines() if m.startswith("vit_model_info{")]
    assert 'io_binding="on"' in line and 'tensorrt="off"' in line
    (count,) = [m for m in metrics.splitlines() if m.startswith("vit_model_fallbacks{")]
    assert float(count.split()[-1]) == len(info["fallbacks"]) > 0
