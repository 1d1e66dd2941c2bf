"""Crash injection for the resume tests: the process kills itself (SIGKILL) at a named point.

    VISION_TOWER_FAULT=rows:3        once a shard has >= 3 rows on disk
    VISION_TOWER_FAULT=manifest:2    after shard >= 2 is renamed into place, before its manifest is written
    VISION_TOWER_FAULT=train_step:10 after optimizer step 10 of stage-1 training

Unset (always, outside tests) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def fault_point(point: str, value: int) -> None:
    spec = os.environ.get("VISION_TOWER_FAULT", "")
    name, _, at = spec.partition(":")
    if name == point and at.isdigit() and value >= int(at):
        os.kill(os.getpid(), signal.SIGKILL)
