"""Run a daemon under a child subreaper (used by the test bed).

``python reaper.py CMD ARGS...`` marks itself PR_SET_CHILD_SUBREAPER, runs CMD
as its child, forwards SIGTERM/SIGINT/SIGHUP to it, and reaps every orphan that
the daemon leaves (slurmstepd, processes started over ssh, Ray's daemons...),
so none of them becomes a zombie that waits for PID 1 (which may never reap on
a container without an init).  Exits with CMD's status once CMD and every
orphan under it are gone.
"""

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: reaper.py CMD [ARGS...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"reaper: prctl failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
    child = 0

    def forward(sig, _frame):
        if child:
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    child = os.fork()
    if child == 0:
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            print(f"reaper: cannot run {argv[0]}: {e}", file=sys.stderr)
            os._exit(127)
    status = 0
    while True:
        try:
            pid, wstatus = os.wait()
        except ChildProcessError:
            break
        if pid == child:
            code = os.waitstatus_to_exitcode(wstatus)
            status = code if code >= 0 else 128 - code
            child = 0
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
