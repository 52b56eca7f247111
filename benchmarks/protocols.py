"""HTTP raw uploads, HTTP OIP with binary tensor data, and OIP over gRPC, in one run, beside the
same HTTP routes served by an earlier commit.

    python -m benchmarks.protocols --baseline <commit>     # about 9 minutes on 2 cores

One server of this tree (HTTP and gRPC) and one of `--baseline` (checked out in a temporary
worktree, HTTP only) run side by side; each round measures every variant in turn at 16 clients
and at 1 client with the same 640x480 JPEGs, the load generator in this process on the same
cores, every other round in the reverse order. Every client is as light as Python allows: raw
keep-alive HTTP/1.1 sockets (vit_tools/bench.py) and, for gRPC, pre-serialized messages on one
grpc.aio channel. The result is the median of the rounds, and of the rounds' ratios, since this
machine's speed drifts by more than some of the gaps measured. Writes docs/protocols.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb  # the messages as tritonclient sends them

from benchmarks.run import ROOT, SIZES, closed_loop, photos, resident_mb, start
from benchmarks.side_by_side import remove_worktree, this_commit, worktree, write_results
from harness.servers import free_port
from vit_tools.bench import Body, Report, summarise

MODEL = "shapes-vit"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def oip_binary(image: bytes) -> Body:
    """One image as an OIP request with binary tensor data: a JSON header, then the element."""
    element = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(element)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return (
        header + element,
        "application/octet-stream",
        (("Inference-Header-Content-Length", str(len(header))),),
    )


def grpc_message(image: bytes) -> bytes:
    request = pb.ModelInferRequest(
        model_name=MODEL, raw_input_contents=[struct.pack("<I", len(image)) + image]
    )
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.outputs.add(name="probabilities")
    return request.SerializeToString()


async def grpc_load(target: str, messages: list[bytes], concurrency: int, seconds: float) -> Report:
    """Closed loop over gRPC: `concurrency` calls in flight on one channel, as tritonclient."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(INFER)
        started = time.perf_counter()
        stop_at = started + seconds
        sent = 0

        async def client() -> None:
            nonlocal sent
            while time.perf_counter() < stop_at:
                message = messages[sent % len(messages)]
                sent += 1
                begun = time.perf_counter()
                try:
                    await call(message, timeout=30)
                    statuses[200] += 1
                except grpc.aio.AioRpcError:
                    statuses[599] += 1
                latencies.append(time.perf_counter() - begun)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return summarise("closed", concurrency, latencies, statuses, elapsed, statuses[200])


def measure(variant: dict[str, Any], concurrency: int, seconds: float) -> Report:
    """One closed-loop run after a second of warm-up at the same concurrency."""
    if "grpc" in variant:
        asyncio.run(grpc_load(variant["grpc"], variant["messages"], concurrency, 1.0))
        return asyncio.run(grpc_load(variant["grpc"], variant["messages"], concurrency, seconds))
    return closed_loop(variant["url"], variant["bodies"], concurrency, seconds, variant["route"])


def serve(cwd: Path, grpc_port: int) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "--model",
        "models/shapes-vit.onnx",
        "--port",
        str(port),
    ]
    env = {
        "VIT_PROVIDERS": '["CPUExecutionProvider"]',
        "VIT_GRPC_PORT": str(grpc_port),
        "PYTHONPATH": str(cwd),
    }
    return url, start(command, env, url, cwd=cwd)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", required=True, help="the commit whose HTTP figures to compare"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    images = photos(SIZES["640x480"])
    raw: list[Body] = [(data, "image/jpeg") for data in images]
    binary = [oip_binary(data) for data in images]
    messages = [grpc_message(data) for data in images]
    infer = f"/v2/models/{MODEL}/infer"
    with tempfile.TemporaryDirectory() as scratch:
        old = worktree(args.baseline, Path(scratch) / "baseline")
        grpc_port = free_port()
        processes = []
        try:
            url, process = serve(ROOT, grpc_port)
            processes.append(process)
            old_url, old_process = serve(old, 0)
            processes.append(old_process)
            variants: dict[str, dict[str, Any]] = {
                "HTTP raw": {"url": url, "bodies": raw, "route": "/v1/classify"},
                "HTTP raw, baseline": {"url": old_url, "bodies": raw, "route": "/v1/classify"},
                "HTTP OIP binary": {"url": url, "bodies": binary, "route": infer},
                "HTTP OIP binary, baseline": {"url": old_url, "bodies": binary, "route": infer},
                "gRPC": {"grpc": f"127.0.0.1:{grpc_port}", "messages": messages},
            }
            rounds = []
            for number in range(args.rounds):
                result = {}
                # Every other round in the reverse order: the machine's speed drifts within one.
                order = list(variants.items())
                for name, variant in order if number % 2 == 0 else reversed(order):
                    at_16, at_1 = (
                        measure(variant, 16, args.seconds),
                        measure(variant, 1, args.seconds),
                    )
                    assert set(at_16.statuses) == {"200"} and set(at_1.statuses) == {"200"}, name
                    result[name] = {
                        "images_per_second_16": at_16.images_per_second,
                        "p50_ms_1": at_1.p50_ms,
                        "p99_ms_16": at_16.p99_ms,
                    }
                    print(f"{name:>26}: {at_16.line()}  |  {at_1.line()}", flush=True)
                rounds.append(result)
            memory = {
                "this tree": resident_mb(process.pid),
                "baseline": resident_mb(old_process.pid),
            }
        finally:
            for running in processes:
                running.terminate()
                running.wait(timeout=30)
            remove_worktree(old)

    def median(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    def ratio(judged: str, baseline: str) -> float:
        return statistics.median(
            r[judged]["images_per_second_16"] / r[baseline]["images_per_second_16"] for r in rounds
        )

    summary = {
        "baseline": args.baseline,
        "this_tree": this_commit(),
        "medians": {
            name: {
                key: round(median(name, key), 2)
                for key in ("images_per_second_16", "p50_ms_1", "p99_ms_16")
            }
            for name in variants
        },
        "grpc_over_http_oip_binary_16": round(ratio("gRPC", "HTTP OIP binary"), 3),
        "http_raw_over_baseline_16": round(ratio("HTTP raw", "HTTP raw, baseline"), 3),
        "http_oip_binary_over_baseline_16": round(
            ratio("HTTP OIP binary", "HTTP OIP binary, baseline"), 3
        ),
        "resident_mb": memory,
    }
    write_results("protocols", rounds, summary)


if __name__ == "__main__":
    main()
