"""Faults the tests inflict on real processes."""

from __future__ import annotations

import resource
import signal


def limit_file_size(limit: int):
    """A preexec_fn for a child whose disk is full past `limit` bytes per file (no root, no mounts needed).

    RLIMIT_FSIZE makes a write past the limit fail with EFBIG once SIGXFSZ (which would kill the process)
    is ignored; the ignored disposition survives the exec of the child's program.
    """

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply
