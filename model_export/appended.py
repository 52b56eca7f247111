"""Outputs appended to a finished graph (the rollout, the out-of-distribution score): their nodes
and constants carry a name prefix, so that removing them gives back the graph they were added
to, node for node; and the session that reads a graph's inner tensors to find where to attach
them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from model_contract.metadata import images_per_call
from model_runtime.load_check import run_bounded, time_bound
from model_runtime.model_file import check_model_bytes
from model_runtime.options import IN_PROCESS

CPU = "CPUExecutionProvider"


def remove_appended(proto: onnx.ModelProto, output: str, prefix: str) -> bool:
    """Remove `output` and the nodes and initializers named under `prefix/` (in place);
    whether the graph had that output."""
    if not any(o.name == output for o in proto.graph.output):
        return False
    ours = f"{prefix}/"
    kept_outputs = [o for o in proto.graph.output if o.name != output]
    kept_nodes = [n for n in proto.graph.node if not n.name.startswith(ours)]
    kept_initializers = [i for i in proto.graph.initializer if not i.name.startswith(ours)]
    del proto.graph.output[:]
    proto.graph.output.extend(kept_outputs)
    del proto.graph.node[:]
    proto.graph.node.extend(kept_nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept_initializers)
    return True


class BoundedSession:
    """A CPU session of a graph being imported or exported, each of whose runs is stopped past
    the load-time checks' bound for a file of its size: its graph is not trusted yet."""

    def __init__(self, session: ort.InferenceSession, model_bytes: int) -> None:
        self._session = session
        self._seconds = time_bound(IN_PROCESS, model_bytes)

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(v) for v in run_bounded(self._session, names, feeds, self._seconds)]


def session_with_outputs(
    proto: onnx.ModelProto, names: list[str]
) -> tuple[BoundedSession, str, int | None]:
    """A CPU session of a copy of `proto` answering the named inner tensors too; its input and
    the images a call must hold: its fixed batch size, or one for an int8 graph (as the service
    runs it, ModelMetadata.images_per_call); None where any number will do."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.metadata_props[:]  # a changed copy: a seal the file carries would not match it
    existing = {output.name for output in probe.graph.output}
    probe.graph.output.extend(
        helper.make_empty_tensor_value_info(name) for name in names if name not in existing
    )
    initializers = {i.name for i in probe.graph.initializer}
    (graph_input,) = [i for i in probe.graph.input if i.name not in initializers]
    batch_dim = graph_input.type.tensor_type.shape.dim[0]
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failing run is raised, and said in one line
    data = probe.SerializeToString()
    check_model_bytes(data, max_metadata_bytes=IN_PROCESS.max_metadata_bytes)
    session = ort.InferenceSession(data, options, providers=[CPU])
    batch = batch_dim.dim_value if batch_dim.HasField("dim_value") else None
    precision = {p.key: p.value for p in proto.metadata_props}.get("precision")
    return BoundedSession(session, len(data)), graph_input.name, batch or images_per_call(precision)
