"""Who runs first on saturated cores: the event loop, then the decoders, then onnxruntime.

The event loop is the only thread that accepts connections, answers health checks and refuses
work; every image passes through it twice. When it wakes a decoder or an inference thread, the
kernel by default lets the woken thread preempt it on its core, and the loop then waits ~1 ms
(one decode) with answers and uploads in hand. Decoders and inference threads are batch work:
marked so, they wait for a free core instead.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

from model_runtime.platform import missing_protection

logger = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.0005
"""How long a thread holding the GIL keeps it from another that asks (Python's default: 5 ms).
The batching threads hold it only to form batches and split the answers; at the default the
event loop can wait 5 ms behind them with requests in hand. At 0.5 ms the service did 1.9%
more images/s at 16 clients (median of six interleaved pairs, each higher)."""


def run_as_batch_work(nice: int = 0) -> None:
    """The calling thread (on Linux, a thread's policy and niceness are its own) as batch work:
    `SCHED_BATCH`, which never preempts a running thread when it wakes, and `nice` added to its
    niceness. Elsewhere, or where a sandbox forbids it, the thread runs as it was."""
    if sys.platform != "linux":
        return
    if nice:
        os.nice(nice)
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as error:
        logger.warning("could not mark this thread as batch work: %s", error)


def favour_the_event_loop() -> None:
    """The server process's GIL handed over sooner (GIL_SWITCH_INTERVAL_S), and what is alive
    before the models load (the modules, the app and its routes) kept out of the collector's
    full collections: under load Python runs one every few seconds, and over the whole heap it
    stopped the event loop for ~30 ms each time; over what requests and models create, ~1 ms.
    Models are loaded after, so an unloaded one is collected as ever. Where threads cannot be
    marked batch work (`run_as_batch_work`), says so once."""
    if sys.platform != "linux":
        missing_protection(
            f"inference threads and decoding workers are not batch work on {sys.platform}: "
            "SCHED_BATCH and a thread's own niceness (VIT_INFERENCE_NICE) are Linux's, so on "
            "saturated cores they can hold up the event loop's answers and refusals"
        )
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()
