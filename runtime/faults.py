"""Crash points for exactly-once tests: a real SIGKILL of the current process at a named step.

Set CKL_CRASH_AT to a step name (e.g. `after_inject`) and the process kills itself when it reaches that
step, exactly as an OOM kill or a lost node would. Unset, `crash_point` does nothing.
"""

import os
import signal

CRASH_ENV = "CKL_CRASH_AT"


def crash_point(step: str) -> None:
    """SIGKILL this process if CKL_CRASH_AT names `step`."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
