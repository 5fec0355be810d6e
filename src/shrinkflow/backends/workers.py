"""What the backends' data-parallel launchers share (no framework imports)."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (the launcher) dies, so that a
    launcher killed outright (SIGKILL, OOM killer) leaves no worker training on its own and
    writing outputs after the job was declared dead. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
