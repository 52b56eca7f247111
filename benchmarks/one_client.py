"""Latency at one client, measured in turns: every server up at once, idle but for one request
at a time, each turn sending a few requests in a row to each server.

    python -m benchmarks.one_client                      # the default model, 20 turns
    python -m benchmarks.one_client --vs HEAD~3          # and the service at an earlier commit
    python -m benchmarks.one_client --model m.onnx --turns 50

A single client's latency is a few milliseconds, and this machine's speed drifts by more than
the gaps between the servers from one minute to the next: measured one server after another,
the order decides. Taken in turns of PER_TURN requests, every server meets the machine in much
the same state. The 640x480 JPEGs go over a keep-alive connection from a blocking client that
costs each server the same; the order of the servers rotates from turn to turn. Results go to
docs/one_client.json and docs/ONE-CLIENT.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.run import DOCS, ROOT, SIZES, photos, port_flag, servers, start
from benchmarks.side_by_side import remove_worktree, this_commit, worktree
from harness.servers import free_port

WARM_UP_TURNS = 2
"""Turns sent first and not counted: connections, caches and each server's first calls."""

PER_TURN = 20
"""Requests in a row to one server in each turn. One request per turn measured each server
just after the others had run, its memory out of the caches: a server spread over several
processes paid for it more than a single process did, which no lone client meets."""

Post = Callable[[bytes], None]
"""Sends one image to one server and waits for its answer (raising unless it is a 200)."""


def by_turns(
    posts: dict[str, Post], images: Sequence[bytes], turns: int, per_turn: int = PER_TURN
) -> dict[str, list[float]]:
    """Seconds per request of each server, `turns` x `per_turn` requests each (after
    WARM_UP_TURNS): each turn sends `per_turn` requests to each server in an order that rotates
    from turn to turn, so that no server always follows the same one."""
    names = list(posts)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(WARM_UP_TURNS + turns):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            for request in range(per_turn):
                image = images[(turn * per_turn + request) % len(images)]
                started = time.perf_counter()
                posts[name](image)
                if turn >= WARM_UP_TURNS:
                    seconds[name].append(time.perf_counter() - started)
    return seconds


def summary(seconds: dict[str, list[float]], service: str = "service") -> dict[str, Any]:
    """Each server's p50 and p90 in ms, and the service's p50 less each other server's."""
    table: dict[str, Any] = {}
    for name, times in seconds.items():
        ordered = sorted(times)
        table[name] = {
            "requests": len(ordered),
            "p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p90_ms": round(ordered[int(len(ordered) * 0.9)] * 1000, 3),
        }
    ours = table[service]["p50_ms"]
    for name, row in table.items():
        if name != service:
            row["service_p50_minus_this_ms"] = round(ours - row["p50_ms"], 3)
    return table


CLOSED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
"""How a keep-alive connection the server closed while it waited its turn shows (uvicorn
closes idle ones after 5 s): sent again on a new connection."""


def poster(port: int, route: str) -> Post:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def send(image: bytes) -> http.client.HTTPResponse:
        connection.request("POST", route, body=image, headers={"content-type": "image/jpeg"})
        return connection.getresponse()

    def post(image: bytes) -> None:
        try:
            response = send(image)
        except CLOSED:
            connection.close()
            response = send(image)
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{route} answered {response.status}")

    return post


def measure(model: Path, turns: int, earlier: tuple[str, Path] | None) -> dict[str, list[float]]:
    """Start every server (and the service at the `earlier` commit's checkout), then measure."""
    listed = [(name, command, env, route, ROOT) for name, command, env, route in servers(model)]
    if earlier is not None:
        commit, checkout = earlier
        _, command, env, route, _ = listed[0]
        env = {**env, "PYTHONPATH": str(checkout)}
        listed.append((f"service at {commit}", command, env, route, checkout))
    processes, posts = [], {}
    try:
        for name, command, env, route, cwd in listed:
            port = free_port()
            ready = "/v1/models" if name == "kserve" else "/docs"
            url = f"http://127.0.0.1:{port}"
            processes.append(start([*command, *port_flag(name, port)], env, url, ready, cwd=cwd))
            posts[name] = poster(port, route)
        return by_turns(posts, photos(SIZES["640x480"]), turns)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)


def report(table: dict[str, Any], model: str, turns: int, commit: str) -> str:
    lines = [
        "# Latency at one client",
        "",
        f"`python -m benchmarks.one_client` at {commit}: {model}, {turns} turns of "
        f"{PER_TURN} requests to each server (every server up at once, one request at a time; "
        "the order of the servers rotating from turn to turn), 640x480 JPEG over loopback from a "
        "blocking client. See benchmarks/one_client.py for why in turns.",
        "",
        "| server | p50 ms | p90 ms | service p50 minus this |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in table.items():
        gap = row.get("service_p50_minus_this_ms")
        shown = "" if gap is None else f"{gap:+.2f} ms"
        lines.append(f"| {name} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/shapes-vit.onnx"))
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--vs", metavar="COMMIT", help="also the service at this commit")
    args = parser.parse_args(argv)
    model = args.model.resolve()
    with tempfile.TemporaryDirectory() as scratch:
        earlier = None
        if args.vs:
            earlier = (args.vs, worktree(args.vs, Path(scratch) / "earlier"))
        try:
            seconds = measure(model, args.turns, earlier)
        finally:
            if earlier is not None:
                remove_worktree(earlier[1])
    table = summary(seconds)
    commit = this_commit()
    results = {"model": model.name, "commit": commit, "turns": args.turns, "servers": table}
    (DOCS / "one_client.json").write_text(json.dumps(results, indent=2) + "\n")
    (DOCS / "ONE-CLIENT.md").write_text(report(table, model.name, args.turns, commit))
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
