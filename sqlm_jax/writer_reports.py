"""What orbax's and tensorstore's writers print while a checkpoint read or write fails (tracebacks
from their event loops and threads): silenced, or held for a log file (sqlm_jax.checkpoints)."""
from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time
import traceback


@contextlib.contextmanager
def quiet():
    """Silences the tracebacks orbax's and tensorstore's event loops print when a read fails (the
    failure itself is raised and reported in one line)."""
    hook, loggers = sys.unraisablehook, [logging.getLogger(n) for n in ("asyncio", "absl")]
    levels = [lg.level for lg in loggers]
    sys.unraisablehook = lambda _: None
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class Reports(logging.Handler):
    """What orbax's writers report while a checkpoint is written: their log records (absl's and
    asyncio's loggers) and the exceptions raised in their threads and callbacks (sys.unraisablehook,
    threading.excepthook), held instead of printed."""

    LOGGERS = ("absl", "asyncio")

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []  # formatted at once: a hook's arguments must not outlive it

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def _unraisable(self, args) -> None:
        where = f"{args.err_msg or 'Exception ignored in'}: {args.object!r}\n" if args.object is not None else ""
        self.texts.append(where + "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                                      args.exc_traceback)))

    def _thread(self, args) -> None:
        name = args.thread.name if args.thread is not None else "?"
        self.texts.append(f"Exception in thread {name}:\n" + "".join(traceback.format_exception(
            args.exc_type, args.exc_value, args.exc_traceback)))

    @contextlib.contextmanager
    def held(self):
        loggers = [logging.getLogger(name) for name in self.LOGGERS]
        saved = [(lg.propagate, lg.handlers) for lg in loggers]
        hooks = sys.unraisablehook, threading.excepthook
        for lg in loggers:
            lg.propagate, lg.handlers = False, [self]
        sys.unraisablehook, threading.excepthook = self._unraisable, self._thread
        try:
            yield self
        finally:
            sys.unraisablehook, threading.excepthook = hooks
            for lg, (propagate, handlers) in zip(loggers, saved):
                lg.propagate, lg.handlers = propagate, handlers

    def settle(self, quiet_s: float = 0.25, limit_s: float = 3.0) -> None:
        """Waits, up to `limit_s`, until the writers have reported nothing for `quiet_s`: their threads
        report after the save has failed, and their failed tasks, never retrieved, when collected
        (collected here, so not on the console as the process exits)."""
        start = since = time.monotonic()
        count = -1
        while time.monotonic() - start < limit_s:
            gc.collect()
            if len(self.records) + len(self.texts) != count:
                count, since = len(self.records) + len(self.texts), time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.05)

    def replay(self) -> None:
        """Reports as they would have appeared (a save that succeeded shows its warnings as ever)."""
        for record in self.records:
            logging.getLogger(record.name).handle(record)
        for text in self.texts:
            sys.stderr.write(text)

    def take(self) -> str:
        """The reports so far as text, forgotten (with the records, their tracebacks' frames)."""
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s")
        text = "".join(formatter.format(r) + "\n" for r in self.records) + "".join(self.texts)
        self.records, self.texts = [], []
        return text
