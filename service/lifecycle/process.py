"""What every child process of the service does first."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys

PR_SET_PDEATHSIG = 1
LOG_FORMAT = "%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"


def configure_logging(role: str, level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT.format(role=role), force=True)


def configure_child(role: str, log_level: str) -> None:
    """Log with the role in each line; die with the supervisor; leave Ctrl-C to the supervisor.

    A terminal's Ctrl-C reaches the whole process group: only the supervisor acts on it (it drains
    every process in order). If the supervisor itself is killed, the kernel sends this process SIGTERM
    (Linux ``PR_SET_PDEATHSIG``), so no front-end keeps serving a port nobody supervises.
    """
    configure_logging(role, log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
