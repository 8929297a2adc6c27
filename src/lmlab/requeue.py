"""SLURM time limits and preemption under submitit (`hydra/launcher=slurm|local`): checkpoint,
requeue, resume.

SLURM sends submitit's signal (USR2, `signal_delay_s` before the time limit, or on preemption
with `scancel --signal=USR2`). submitit's own handler would requeue the job at once, losing the
steps since the last periodic checkpoint. The bridge installed here turns the signal into
Lightning's graceful stop instead (the SIGTERM path: `ResumeCheckpoint` saves `last.ckpt` at the
end of the current step, the record says `preempted`); `main()` then hands over to submitit's
handler, which asks the launcher's `checkpoint()` for a resubmission of the same job, runs
`scontrol requeue` and exits. The requeued job lands in the same run directory and resumes from
`last.ckpt` (`resumed_from` in its record). How many timeouts are requeued is the launcher's
`max_num_timeout`; preemptions are always requeued.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Any

log = logging.getLogger("lmlab")


class RequeueBridge:
    def __init__(self, signum: int, submitit_handler: Any):
        self.signum = signum
        self.submitit_handler = submitit_handler
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        term = signal.getsignal(signal.SIGTERM)
        if type(term).__module__.startswith("lightning."):
            # The Trainer is running: its SIGTERM handler makes it stop after this step, and
            # lmlab's checkpoint callback saves last.ckpt on the way out.
            log.warning("%s: stopping at the end of this step to checkpoint and requeue",
                        signal.Signals(signum).name)
            term(signal.SIGTERM, frame)
        else:
            # Not training (preparing data, or evaluating after fit): nothing newer to save.
            self.requeue()

    def requeue(self) -> None:
        """submitit's handler: resubmission via the launcher's checkpoint(), `scontrol requeue`,
        then exit. On ranks other than 0 it returns and the job step is ended by the requeue."""
        self.submitit_handler(self.signum, None)


def install_requeue_bridge() -> RequeueBridge | None:
    """Inside a submitit job, put the bridge in front of submitit's preemption handler."""
    if "submitit" not in sys.modules:  # a submitit job has imported it before calling us
        return None
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:
        return None
    signum = env._usr_sig()
    current = signal.getsignal(signum)
    if isinstance(current, RequeueBridge):
        return current
    if not callable(current):
        return None
    bridge = RequeueBridge(signum, current)
    signal.signal(signum, bridge)
    return bridge
