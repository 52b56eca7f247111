"""What serving gRPC costs HTTP: this tree with VIT_GRPC_PORT on and off, in interleaved pairs.

    python -m benchmarks.grpc_cost            # about 3 minutes on 2 cores

Both servers run side by side (one idle while the other is measured), raw JPEG uploads to
/v1/classify at 16 clients and at 1 client; the result is the median of the rounds' ratios.
Writes docs/grpc_cost.json.
"""

from __future__ import annotations

import argparse

from benchmarks.pairs import compare
from benchmarks.run import ROOT, SIZES, photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    model = ROOT / "models" / "shapes-vit.onnx"
    cpu = '["CPUExecutionProvider"]'
    variants = {
        "gRPC on": (model, {"VIT_PROVIDERS": cpu}),
        "gRPC off": (model, {"VIT_PROVIDERS": cpu, "VIT_GRPC_PORT": "0"}),
    }
    compare(variants, photos(SIZES["640x480"]), args.rounds, args.seconds, "grpc_cost.json")


if __name__ == "__main__":
    main()
