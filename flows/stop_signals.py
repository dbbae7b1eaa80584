"""SIGINT and SIGTERM of the command line: the flow it runs stops and tears its cluster down.

Its own module, light to import: the command line takes the signals before the slow
imports, and the flow (flows/ray_cluster.py) asks it whether to stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading


class SignalStop:
    """SIGINT and SIGTERM of the command line, one way each time.

    The first one asks the running flow to stop: it cancels what is bringing the
    cluster up or holding it, tears the cluster down, and the process exits with
    128 + the signal. Later ones only say that the teardown is under way. The
    handler never raises: a KeyboardInterrupt or Prefect's TerminationSignal
    raised wherever the main thread happens to be can cut a teardown short, abort
    asyncio.run's cleanup, or be swallowed by an event loop callback. It also
    replaces a SIGINT inherited as ignored (`cmd &` in a non-interactive shell),
    which Python, and so asyncio's own Ctrl-C handling, would keep ignoring.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event: asyncio.Event | None = None
        self._previous: dict | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> bool:
        """Take SIGINT and SIGTERM (main thread only); False if already taken."""
        if self._previous is not None or threading.current_thread() is not threading.main_thread():
            return False
        self.signum, self.loop, self.event = None, None, None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return True

    def uninstall(self) -> None:
        for sig, handler in (self._previous or {}).items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = None

    def attach(self) -> None:
        """Called in the flow's event loop: from now on a signal sets self.event there."""
        self.event = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        if self.signum is not None:
            self.event.set()

    def stop_event(self) -> asyncio.Event | None:
        """The event to stop on. While installed, the first loop that asks is the flow's that
        the command line runs: it attaches there (a signal that came first sets the event at
        once). None in any other loop, and when not installed: a deployment run, where
        Prefect's own signal handling applies."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if self._previous is not None and self.loop is None:
            self.attach()
        return self.event if self.loop is running else None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            _say(f"{name}: the cluster is being torn down; the flow exits when that is done")
            return
        self.signum = signum
        _say(f"{name}: stopping, tearing the cluster down")
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._fire)
            except RuntimeError:  # the loop is closed: the flow is over
                pass

    def _fire(self) -> None:
        if self.event is not None:
            self.event.set()


def _say(text: str) -> None:
    """For signal handlers: one write(2), no buffered stream that the handler may have interrupted."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


STOP = SignalStop()
