"""Stage names on stderr for long library calls: ExecuTorch lowering runs for tens of seconds to
minutes and upstream prints nothing meanwhile. A stage that runs past `AFTER_S` seconds is named: a
live elapsed-time line on a terminal, one line when it ends elsewhere; shorter stages print nothing.
The CLI, which shows its own steps, passes progress=False."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator, TextIO

AFTER_S = 2.0


class Stages:
    def __init__(self, what: str, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.what, self.enabled = what, enabled
        self.stream = stream or sys.stderr
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        label, t0, stop = f"{self.what}: {name}", time.perf_counter(), threading.Event()

        def tick() -> None:
            if stop.wait(AFTER_S):
                return
            while not stop.wait(0.5):
                self.stream.write(f"\r{label} ... {time.perf_counter() - t0:.0f} s")
                self.stream.flush()

        ticker = threading.Thread(target=tick, daemon=True) if self.live else None
        if ticker is not None:
            ticker.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            elapsed = time.perf_counter() - t0
            if elapsed >= AFTER_S:
                line = f"{label} ... {'done' if ok else 'FAILED'} in {elapsed:.1f} s"
                self.stream.write(f"\r{line}\033[K\n" if self.live else line + "\n")
                self.stream.flush()
