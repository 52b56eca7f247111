"""What the benchmarks that compare this tree with an earlier commit share: the earlier commit
checked out beside this one, this tree's commit named in the results, and the results written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.run import DOCS, ROOT


def worktree(commit: str, folder: Path) -> Path:
    """`commit` checked out in `folder`, with the bundled model (which git does not hold)."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), commit],
        check=True,
        capture_output=True,
    )
    (folder / "models").mkdir(exist_ok=True)
    (folder / "models" / "shapes-vit.onnx").write_bytes(
        (ROOT / "models" / "shapes-vit.onnx").read_bytes()
    )
    return folder


def remove_worktree(folder: Path) -> None:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=False
    )


def this_commit() -> str:
    """The commit this tree is at, as the results name it."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip()


def write_results(name: str, rounds: list[Any], summary: dict[str, Any]) -> None:
    """docs/<name>.json with every round and the summary; the summary printed."""
    DOCS.mkdir(exist_ok=True)
    (DOCS / f"{name}.json").write_text(
        json.dumps({"rounds": rounds, "summary": summary}, indent=2) + "\n"
    )
    print(json.dumps(summary, indent=2))
