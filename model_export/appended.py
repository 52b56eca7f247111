"""Outputs appended to a finished graph (the rollout, the out-of-distribution score): their nodes
and constants carry a name prefix, so that removing them gives back the graph they were added
to, node for node."""

from __future__ import annotations

import onnx


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
