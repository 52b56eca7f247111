"""The server process's interpreter settings: the GIL's switch interval and the frozen heap."""

from __future__ import annotations

import json
import subprocess
import sys

from model_runtime.scheduling import GIL_SWITCH_INTERVAL_S

PROBE = """
import gc, json, sys, weakref
from model_runtime.scheduling import favour_the_event_loop

class Node:
    pass

def cycle() -> Node:
    node = Node()
    node.itself = node
    return node

before = cycle()
garbage_before = weakref.ref(before)
del before  # unreachable, not yet collected: freezing must not keep it
favour_the_event_loop()

after = cycle()  # a model loaded later, then unloaded
unloaded = weakref.ref(after)
del after
gc.collect()
print(json.dumps({
    "switch_interval": sys.getswitchinterval(),
    "frozen": gc.get_freeze_count(),
    "garbage_before_collected": garbage_before() is None,
    "later_garbage_collected": unloaded() is None,
}))
"""


def probe() -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_server_process_hands_the_gil_over_sooner_and_freezes_its_startup_heap() -> None:
    seen = probe()
    assert seen["switch_interval"] == GIL_SWITCH_INTERVAL_S
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 1000  # the modules, at least
    # garbage of before the freeze was collected first, not frozen with the live objects
    assert seen["garbage_before_collected"] is True
    # what is created after (a model, loaded then unloaded) is collected as ever
    assert seen["later_garbage_collected"] is True
