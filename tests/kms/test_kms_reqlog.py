"""kms/reqlog.py: the batched per-request log line keeps logging's shape and order, stays
bounded, and is off below INFO. (End to end, test_kms_server and test_kms_audit_aad read the
lines of a real kms serve.)"""

import io
import logging
import re

from kms import reqlog
from kms.reqlog import RequestLog


def _logger(level: int, stream: io.StringIO) -> logging.Logger:
    lg = logging.getLogger(f"kms-reqlog-test-{level}-{id(stream)}")
    lg.propagate = False
    lg.setLevel(level)
    h = logging.StreamHandler(stream)
    h.setFormatter(logging.Formatter("%(asctime)s kms %(levelname)s %(message)s"))
    lg.handlers[:] = [h]
    return lg


def test_lines_batched_in_order_with_other_records():
    out = io.StringIO()
    lg = _logger(logging.INFO, out)
    rl = RequestLog(lg, out)
    assert rl.enabled
    rl.line("uid=0 POST create-datakey key=k1 -> 200 0.1ms")
    rl.line("uid=0 POST decrypt-datakey key=k1 -> 200 0.1ms")
    assert out.getvalue() == ""                 # queued, not written per request
    lg.warning("a warning")                     # flushes the queued lines first
    rl.line("uid=0 POST create-datakey key=k2 -> 200 0.1ms")
    rl.close()
    lines = out.getvalue().splitlines()
    assert [ln.split(" kms ", 1)[1] for ln in lines] == [
        "INFO uid=0 POST create-datakey key=k1 -> 200 0.1ms",
        "INFO uid=0 POST decrypt-datakey key=k1 -> 200 0.1ms",
        "WARNING a warning",
        "INFO uid=0 POST create-datakey key=k2 -> 200 0.1ms"]
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} kms ")
    assert all(stamp.match(ln) for ln in lines), lines
    assert not lg.filters                       # close() removed the ordering filter


def test_queue_bounded():
    out = io.StringIO()
    rl = RequestLog(_logger(logging.INFO, out), out)
    for i in range(reqlog.MAX_PENDING + 10):
        rl.line(f"r{i}")
    assert out.getvalue().count("\n") == reqlog.MAX_PENDING     # written once the queue was full
    rl.close()
    assert out.getvalue().count("\n") == reqlog.MAX_PENDING + 10


def test_off_below_info():
    out = io.StringIO()
    rl = RequestLog(_logger(logging.WARNING, out), out)
    assert not rl.enabled
    rl.close()
    assert out.getvalue() == ""
