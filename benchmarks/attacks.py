"""Each attack of tests/test_attacks.py repeated for a few seconds against a real server, with
health probes and an ordinary client running: the figures docs/RELIABILITY.md quotes.

    python -m benchmarks.attacks     # about a minute on 2 cores; writes docs/attacks.json
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness import attacks
from harness.servers import Server, served
from harness.watch import Watch
from model_export import shapes

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "shapes-vit.onnx"
SECONDS = 6.0
JPEG = shapes.sample(424242, 0).data
"""The ordinary client's upload, the same shapes image as tests/test_attacks.py sends."""


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) * 1000


def raw(data: bytes) -> Callable[[Server], httpx.Response]:
    def send(server: Server) -> httpx.Response:
        headers = {"content-type": "image/jpeg"}
        return httpx.post(f"{server.url}/v1/classify", content=data, headers=headers, timeout=60)

    return send


def multipart(data: bytes, count: int) -> Callable[[Server], httpx.Response]:
    files = [("file", (f"{i}", data, "image/tiff")) for i in range(count)]

    def send(server: Server) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/classify", files=files, timeout=60)

    return send


def binary_infer(name: str, datatype: str, shape: list[int], payload: bytes) -> Any:
    tensor = {"name": name, "shape": shape, "datatype": datatype}
    header = json.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": len(payload)}}]}
    ).encode()
    headers = {"inference-header-content-length": str(len(header))}

    def send(server: Server) -> httpx.Response:
        url = f"{server.url}/v2/models/shapes-vit/infer"
        return httpx.post(url, content=header + payload, headers=headers, timeout=60)

    return send


ATTACKS: dict[str, Callable[[Server], httpx.Response]] = {
    "none": lambda server: httpx.get(f"{server.url}/v2/health/live"),
    "tiled TIFF (146 B)": raw(attacks.tiled_tiff()),
    "repeated-scan progressive JPEG": raw(attacks.repeated_scan_jpeg()),
    "RLE BMP": raw(attacks.rle_bmp()),
    "16-bit 40 MP PNG": raw(attacks.sixteen_bit_png()),
    "multipart of 64 tiled TIFFs": multipart(attacks.tiled_tiff(), 64),
    "19 MB upload": raw(JPEG + b"\0" * (19 * 1024 * 1024)),
    "FP32 tensor of 3e38": binary_infer(
        "pixel_values", "FP32", [1, 3, 128, 128], np.full(49152, 3e38, "<f4").tobytes()
    ),
    "4.9 M empty BYTES elements": binary_infer("image", "BYTES", [1], b"\0\0\0\0" * 4_900_000),
}


def main() -> None:
    results: dict[str, Any] = {}
    with served(MODEL, ROOT) as server:
        for name, attack in ATTACKS.items():
            statuses: list[int] = []
            seconds: list[float] = []
            with Watch(server, JPEG) as watch:
                ends = time.monotonic() + SECONDS
                while time.monotonic() < ends:
                    started = time.perf_counter()
                    statuses.append(attack(server).status_code)
                    seconds.append(time.perf_counter() - started)
            results[name] = {
                "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
                "answer_s_max": max(seconds),
                "peak_resident_mib": watch.peak_bytes / 2**20,
                "health_ms_median": statistics.median(watch.health_seconds) * 1000,
                "health_ms_p99": p99(watch.health_seconds),
                "health_ms_max": max(watch.health_seconds) * 1000,
                "ordinary_statuses": {str(s): watch.ordinary.count(s) for s in set(watch.ordinary)},
                "ordinary_ms_p99": p99(watch.ordinary_seconds),
            }
            print(name, results[name], flush=True)
    out = ROOT / "docs" / "attacks.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
