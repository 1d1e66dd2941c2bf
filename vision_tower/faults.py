"""Fault injection for the resume tests: the process signals itself at a named point.

    VISION_TOWER_FAULT=rows:3        SIGKILL once a shard has >= 3 rows on disk
    VISION_TOWER_FAULT=manifest:2    SIGKILL after shard >= 2 is renamed into place, before its manifest is written
    VISION_TOWER_FAULT=train_step:10 SIGKILL after optimizer step 10 of stage-1 training
    VISION_TOWER_FAULT=score_lines:4 SIGKILL once >= 4 score lines are fsynced (`vision-tower score`)
    VISION_TOWER_FAULT=rows:3:INT    the same point, SIGINT (Ctrl-C) instead; TERM for SIGTERM

Unset (always, outside tests) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def fault_point(point: str, value: int) -> None:
    spec = os.environ.get("VISION_TOWER_FAULT", "")
    name, _, rest = spec.partition(":")
    at, _, sig = rest.partition(":")
    if name == point and at.isdigit() and value >= int(at):
        signum = getattr(signal, f"SIG{sig or 'KILL'}")
        if sig:
            os.environ.pop("VISION_TOWER_FAULT")  # once: the interrupted run must be able to clean up
            if signal.getsignal(signum) is signal.SIG_IGN:  # inherited (`cmd &`, nohup): the fault would be a no-op
                raise RuntimeError(f"fault point {spec!r}: SIG{sig} is ignored in this process, so it cannot fire")
        os.kill(os.getpid(), signum)
