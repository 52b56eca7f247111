"""Sessions are planned before any is built, from the load check's report, and each is built
once: the plan decides threads, calls at once, bound buffers and the lone-call session, and
says what it gave up and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from model_runtime.graph_check import GraphContract
from model_runtime.options import CPU, CUDA, IN_PROCESS, RuntimeOptions
from model_runtime.providers import ProviderPlan
from model_runtime.session import ModelSession
from model_runtime.session_plan import ModelFacts, plan_sessions
from tests.onnx_models import metadata_for

CPU_ONLY = ProviderPlan(((CPU, {}),))
CUDA_GRAPHS = ProviderPlan(((CUDA, {"enable_cuda_graph": "1"}), (CPU, {})))


def facts(**graph: Any) -> ModelFacts:
    contract = {
        "input_name": "pixels",
        "output_name": "logits",
        "fixed_batch_size": None,
        "output_width": 3,
        "output_type": "tensor(float)",
        **graph,
    }
    return ModelFacts(1_000_000, GraphContract(**contract), metadata_for(["a", "b", "c"], 32))


def test_on_the_cpu_two_calls_share_the_cores_and_a_lone_call_gets_them_all() -> None:
    plan = plan_sessions(RuntimeOptions(intra_op_threads=0), CPU_ONLY, facts())
    assert plan.provider == CPU and plan.inference_workers == 2
    assert plan.lone_call and plan.threads_per_call == max(1, plan.all_threads // 2)
    assert plan.fallbacks == ()


def test_threads_asked_for_are_each_calls_own() -> None:
    plan = plan_sessions(RuntimeOptions(intra_op_threads=3), CPU_ONLY, facts())
    assert (plan.threads_per_call, plan.all_threads) == (3, 3)


def test_bound_buffers_run_one_call_at_a_time_and_say_so() -> None:
    options = RuntimeOptions(io_binding=True, inference_workers=3)
    plan = plan_sessions(options, CPU_ONLY, facts())
    assert plan.io_binding and plan.inference_workers == 1 and not plan.lone_call
    assert plan.fallbacks == ("inference_workers 3: 1 (IO binding runs one call at a time)",)


def test_a_graph_the_buffers_cannot_serve_is_planned_without_them_with_the_reason() -> None:
    options = RuntimeOptions(io_binding=True)
    plan = plan_sessions(options, CPU_ONLY, facts(fixed_batch_size=1))
    assert not plan.io_binding and plan.inference_workers == 2
    assert plan.fallbacks == ("io_binding and cuda_graph: off (the graph fixes the batch at 1)",)


def test_cuda_graphs_need_the_cuda_provider_in_use() -> None:
    options = RuntimeOptions(cuda_graph=True)
    on_cuda = plan_sessions(options, CUDA_GRAPHS, facts())
    assert on_cuda.cuda_graph and on_cuda.io_binding and on_cuda.inference_workers == 1
    on_cpu = plan_sessions(options, CUDA_GRAPHS, facts(), provider=CPU)
    assert not on_cpu.cuda_graph and not on_cpu.io_binding


@pytest.mark.parametrize(
    ("options", "built"),
    [
        (RuntimeOptions(providers=(CPU,)), 2),  # the main session and the lone-call one
        (IN_PROCESS, 1),
        (RuntimeOptions(providers=(CPU,), io_binding=True), 1),
    ],
    ids=["lone-call", "in-process", "io-binding"],
)
def test_each_session_is_built_once(
    served_model: Path, monkeypatch: pytest.MonkeyPatch, options: RuntimeOptions, built: int
) -> None:
    """In this process: the load check's session is in a process of its own."""
    made: list[ort.SessionOptions] = []
    real = ort.InferenceSession

    def counting(*args: Any, **kwargs: Any) -> ort.InferenceSession:
        made.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    session = ModelSession(served_model, options)
    assert len(made) == built
    assert made[0].intra_op_num_threads == session.plan.threads_per_call
