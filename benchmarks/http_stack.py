"""uvicorn's HTTP stacks A/B: httptools + uvloop against h11 + asyncio, in interleaved pairs.

    python -m benchmarks.http_stack            # about 3 minutes on 2 cores

Both servers run side by side (one idle while the other is measured), the load generator in
this process on the same cores. Each round measures one stack then the other at 16 clients and
at 1 client; the result is the median of the rounds' ratios, since this machine's speed drifts
by more than the gaps measured. Writes docs/http_stack.json.
"""

from __future__ import annotations

import argparse

from benchmarks.pairs import compare
from benchmarks.run import ROOT, SIZES, photos

STACKS = {"httptools+uvloop": ("httptools", "uvloop"), "h11+asyncio": ("h11", "asyncio")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    model = ROOT / "models" / "shapes-vit.onnx"
    variants = {
        name: (
            model,
            {
                "VIT_PROVIDERS": '["CPUExecutionProvider"]',
                "VIT_HTTP_PARSER": http_parser,
                "VIT_EVENT_LOOP": loop,
            },
        )
        for name, (http_parser, loop) in STACKS.items()
    }
    compare(variants, photos(SIZES["640x480"]), args.rounds, args.seconds, "http_stack.json")


if __name__ == "__main__":
    main()
