"""Inference through onnxruntime IO binding, with buffers preallocated per batch-size bucket.

On a GPU a plain `session.run` allocates device memory for every call and copies through
temporaries; binding preallocated buffers avoids both, and it is what CUDA graphs require (a
captured graph replays on fixed addresses and shapes). Batch sizes are rounded up to a few
buckets (powers of two up to the largest batch), so the buffers, and the captured graphs, stay a
handful however the batcher's batch sizes vary. Padding rows are zeros and never returned.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from model_runtime.watchdog import watchdog


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below `max_batch_size`, then `max_batch_size` itself."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch_size)


class _Bucket:
    """One batch size's bound input and output buffers (and its CUDA graph's id)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        batch_size: int,
        input_name: str,
        outputs: dict[str, tuple[int, ...]],
        image_shape: tuple[int, ...],
        device: str,
        graph_id: int | None,
    ) -> None:
        self.batch_size = batch_size
        self.staging = np.zeros((batch_size, *image_shape), dtype=np.float32)
        self.input = ort.OrtValue.ortvalue_from_numpy(self.staging, device, 0)
        self.outputs = {
            name: ort.OrtValue.ortvalue_from_shape_and_type(
                (batch_size, *row), np.float32, device, 0
            )
            for name, row in outputs.items()
        }
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(input_name, self.input)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        self.run_options = ort.RunOptions()
        if graph_id is not None:
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def run(
        self, session: ort.InferenceSession, batch: np.ndarray, seconds: float
    ) -> dict[str, np.ndarray]:
        count = len(batch)
        self.staging[:count] = batch
        self.staging[count:] = 0.0
        if self.input.device_name() != "cpu":  # a CPU OrtValue shares `staging`'s memory
            self.input.update_inplace(self.staging)
        with watchdog().bounded(seconds, self.run_options) as options:
            session.run_with_iobinding(self.binding, options)
        return {name: value.numpy()[:count].copy() for name, value in self.outputs.items()}


class BucketedIoBinding:
    """`run(batch) -> outputs` through bound buffers; not thread-safe (one inference thread).
    `outputs` gives each bound output's shape per image (classes; the attention grid)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        input_name: str,
        outputs: dict[str, tuple[int, ...]],
        image_shape: tuple[int, ...],
        max_batch_size: int,
        device: str,
        cuda_graph: bool,
    ) -> None:
        self._session = session
        self.buckets = tuple(
            _Bucket(
                session,
                batch_size=size,
                input_name=input_name,
                outputs=outputs,
                image_shape=image_shape,
                device=device,
                graph_id=index if cuda_graph else None,
            )
            for index, size in enumerate(bucket_sizes(max_batch_size))
        )

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1].batch_size

    def run(self, batch: np.ndarray, seconds: float) -> dict[str, np.ndarray]:
        """Every bound output for a batch of at most `max_batch_size` images, stopped past
        `seconds` (InferenceOverran)."""
        for bucket in self.buckets:
            if len(batch) <= bucket.batch_size:
                return bucket.run(self._session, batch, seconds)
        raise ValueError(f"a batch of {len(batch)} exceeds the largest bucket")
