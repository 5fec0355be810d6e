"""What the backends' data-parallel launchers share (no framework imports)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>
_IFF_LOOPBACK = 0x8  # interface flag, from <net/if.h>

# Where every socket that data-parallel training listens on is bound: the processes all run on
# one node, and nothing else may reach them (a rendezvous store, gloo's pairs and NCCL's
# bootstrap accept anyone who connects).
LOOPBACK = "127.0.0.1"


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (the launcher) dies, so that a
    launcher killed outright (SIGKILL, OOM killer) leaves no worker training on its own and
    writing outputs after the job was declared dead. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def loopback_interface() -> str:
    """The name of this machine's loopback network interface ("lo" on Linux)."""
    if sys.platform == "darwin":
        return "lo0"
    for _, name in socket.if_nameindex():
        try:
            flags = int((Path("/sys/class/net") / name / "flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if flags & _IFF_LOOPBACK:
            return name
    return "lo"


def collectives_on_loopback() -> None:
    """Have gloo and NCCL open their sockets on the loopback interface, unless the user chose
    an interface (``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``). Left alone, gloo listens on
    whatever address the host name resolves to (often the node's LAN address) and NCCL's
    bootstrap on the first non-loopback interface. Call before the first collective."""
    interface = loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", f"={interface}")  # "=": this name exactly
