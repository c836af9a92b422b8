"""The daemon's one line per request on stderr, made cheap: batched, written once per flush.

Through ``logging`` each line cost ~50 µs of a ~400 µs request (a LogRecord, findCaller's stack
walk, the formatter, the handler lock and one write(2) to stderr per line). Here a line is one
f-string appended to a list; the server's periodic flusher (the audit flush, every 50 ms) writes
the batch with one write(2). The line keeps logging's shape ("<asctime> kms INFO <message>"),
stays at INFO (operators and tests read it; ``--log-level warning`` turns it off) and is not a
security record: the audit record in audit.db is (docs/KMS.md "Audit"). Lines of the last
flush interval can be lost on kill -9; the audit rows of that interval are queued the same way.

Ordering: any other record of the ``kms`` logger (a warning, say) flushes the pending request
lines first (a logger filter), so the log reads in order.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

MAX_PENDING = 4096      # lines; beyond, written at once (memory stays bounded under any load)


class RequestLog:
    def __init__(self, logger: logging.Logger, stream: TextIO | None = None) -> None:
        self._logger = logger
        self._stream = stream
        self._pending: list[str] = []
        self._second = -1
        self._prefix = ""
        self.enabled = logger.isEnabledFor(logging.INFO)
        if self.enabled:
            logger.addFilter(self._before_other_record)

    def _before_other_record(self, record: logging.LogRecord) -> bool:
        self.flush()
        return True

    def line(self, message: str) -> None:
        """Queue ``message`` as one INFO line (the caller checks ``enabled`` first)."""
        now = time.time()
        sec = int(now)
        if sec != self._second:
            self._second = sec
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
        self._pending.append(f"{self._prefix},{int((now - sec) * 1000):03d} kms INFO {message}\n")
        if len(self._pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        stream = self._stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass        # stderr gone (closed pipe): the audit record is the durable one

    def close(self) -> None:
        self.flush()
        if self.enabled:
            self._logger.removeFilter(self._before_other_record)
