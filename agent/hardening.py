"""Process hardening done first thing in every ``tpp-agent`` process (the daemon is ``tpp-agent serve``).

A core dump of the agent or of a CLI holds what its memory held: the PIN the PKCS#11 module was given, access
tokens, bank answers. So no core is written (``RLIMIT_CORE`` 0, which a crash handler cannot raise back when the
hard limit is 0 too) and the process is not dumpable (``PR_SET_DUMPABLE`` 0: no core whatever the limit, and
no other process of the same user may ``ptrace`` it or read its memory through ``/proc``). The unit file sets
``LimitCORE=0`` as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource

_PR_SET_DUMPABLE = 4


def no_core_dumps() -> None:
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
