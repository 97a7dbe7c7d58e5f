"""Runs kopf's watches on an event loop of their own, in a thread, and starts them again when they fail.

kopf gives up for good when one of its watch streams fails with an error it does not retry: a 404
for a custom resource while a restarted API server has not registered the CRDs again is enough
("Watcher for ... has failed", then "Multidimensional multitasker has failed"); it then winds down,
or wedges, and while winding down it cancels every task of its event loop that it did not find
there when it started. On a loop of its own it cannot touch the controller's tasks (the work queue,
the servers, the pod watches), and it can be started again. The handlers run on kopf's loop and
hand each event to the controller's loop (``call_soon_threadsafe`` keeps them in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import kopf

log = logging.getLogger("elasti.controller")

RESTART_BACKOFF = (0.5, 30.0)  # first and longest pause before kopf is started again
WIND_DOWN = 10.0  # how long a failed kopf may take to end by itself before it is cancelled
HEALTHY_AFTER = 60.0  # a run this long resets the backoff
FAILURE_LOGGERS = ("kopf._core.reactor.running", "kopf._core.reactor.orchestration")  # where "has failed" is said


class _FailureSpotter(logging.Handler):
    """kopf reports a fatal watcher failure only in its log; this tells the supervisor at once."""

    def __init__(self, runner: KopfRunner) -> None:
        super().__init__(logging.ERROR)
        self.runner = runner

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "has failed" in msg:
            self.runner._failed(msg)


class _NotMainThread(logging.Filter):
    """kopf warns on every start that it sets no signal handlers off the main thread: that is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "running not in the main thread" not in record.getMessage()


class KopfRunner:
    def __init__(
        self,
        registry: Callable[[], Awaitable[kopf.OperatorRegistry]],
        settings: Callable[[], kopf.OperatorSettings],
        *,
        namespaces: list[str],
    ) -> None:
        """``registry()`` runs on the caller's event loop before each start of kopf (the handlers
        depend on which optional APIs are served)."""
        self._registry = registry
        self._caller: asyncio.AbstractEventLoop | None = None
        self._last_registry: kopf.OperatorRegistry | None = None
        self._run_stop: asyncio.Event | None = None
        self._settings = settings
        self._namespaces = namespaces
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: asyncio.Event | None = None
        self._reason = ""
        self.started = threading.Event()  # kopf's watches are up (the first time)
        self._stopping = threading.Event()  # also seen before the thread's loop exists
        self.restarts = 0
        self._spotter = _FailureSpotter(self)
        self._quiet = _NotMainThread()

    def start(self) -> None:
        self._caller = asyncio.get_running_loop()
        for name in FAILURE_LOGGERS:
            logging.getLogger(name).addHandler(self._spotter)
        logging.getLogger("kopf._core.reactor.running").addFilter(self._quiet)
        self._thread = threading.Thread(target=self._main, name="kopf", daemon=True)
        self._thread.start()

    def restart(self, reason: str) -> None:
        """Stops kopf gracefully and starts it again at once (with a fresh registry)."""
        self._in_kopf_loop(self._restart, reason)

    def _restart(self, reason: str) -> None:
        if self._run_stop is not None and not self._run_stop.is_set():
            log.info("restarting kopf's watches: %s", reason)
            self._run_stop.set()

    def _in_kopf_loop(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn, *args)

    async def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        self._in_kopf_loop(self._stop_all)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                log.warning("kopf's watches did not stop within %.0fs", timeout)
        for name in FAILURE_LOGGERS:
            logging.getLogger(name).removeHandler(self._spotter)
        logging.getLogger("kopf._core.reactor.running").removeFilter(self._quiet)

    def _stop_all(self) -> None:
        for ev in (self._stop, self._run_stop):
            if ev is not None:
                ev.set()

    def _failed(self, reason: str) -> None:
        loop, failure = self._loop, self._failure
        if loop is None or failure is None or loop.is_closed():
            return
        if threading.current_thread() is self._thread:
            self._reason = self._reason or reason
            failure.set()
        else:
            loop.call_soon_threadsafe(self._failed, reason)

    def _main(self) -> None:
        asyncio.run(self._supervise())

    async def _supervise(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        pause = RESTART_BACKOFF[0]
        while not (self._stop.is_set() or self._stopping.is_set()):
            self._failure = asyncio.Event()
            self._reason = ""
            self._run_stop = asyncio.Event()
            begun = time.monotonic()
            try:
                await self._run_once()
            except Exception as exc:  # never let the thread die: the controller would go deaf
                self._reason = f"{type(exc).__name__}: {exc}"
            if self._stop.is_set() or self._stopping.is_set():
                break
            if self._run_stop.is_set() and not self._failure.is_set():
                continue  # a restart asked for: no pause
            self.restarts += 1
            if time.monotonic() - begun > HEALTHY_AFTER:
                pause = RESTART_BACKOFF[0]
            log.error(
                "kopf's watches stopped (%s); starting them again in %.1fs (restart %d)",
                self._reason or "no reason given",
                pause,
                self.restarts,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), pause)
            pause = min(pause * 2, RESTART_BACKOFF[1])

    async def _get_registry(self) -> kopf.OperatorRegistry:
        assert self._caller is not None
        try:
            fut = asyncio.run_coroutine_threadsafe(self._registry(), self._caller)  # type: ignore[arg-type]
            self._last_registry = await asyncio.wrap_future(fut)
        except Exception as exc:
            if self._last_registry is None:
                raise
            log.warning("could not tell which APIs are served (%s); watching what was watched before", exc)
        return self._last_registry

    async def _run_once(self) -> None:
        assert self._run_stop is not None and self._failure is not None
        registry = await self._get_registry()
        if self._stopping.is_set():
            return
        settings = self._settings()
        # Never SIGKILL the process when kopf ends for a reason other than the stop flag: this
        # runner starts it again instead.
        settings.process.ultimate_exiting_timeout = None
        ready = asyncio.Event()
        operator = asyncio.create_task(
            kopf.operator(
                registry=registry,
                settings=settings,
                standalone=True,
                clusterwide=not self._namespaces,
                namespaces=self._namespaces,
                stop_flag=self._run_stop,
                ready_flag=ready,
            ),
            name="kopf-operator",
        )
        ready_wait = asyncio.create_task(ready.wait())
        ready_wait.add_done_callback(lambda t: None if t.cancelled() else self.started.set())
        failure_wait = asyncio.create_task(self._failure.wait())
        try:
            await asyncio.wait({operator, failure_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not operator.done():  # kopf said it failed: let it end, or end it
                await asyncio.wait({operator}, timeout=WIND_DOWN)
            if not operator.done():
                operator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await operator
                except Exception as exc:
                    self._reason = self._reason or f"{type(exc).__name__}: {exc}"
        finally:
            for t in (ready_wait, failure_wait):
                t.cancel()
