"""`encfs status [MOUNTPOINT...] [--json]`: what every encfs mount on the machine is doing.

The mounts come from /proc/self/mounts (type fuse.encfs, fsname = backing dir); each
mount's daemon answers on its control channel (encfs/control.py). `assess` (pure) decides
whether a mount is healthy from its report. Exit status: 0 all healthy (or no mounts), 1
some mount unhealthy, 2 a MOUNTPOINT that is not an encfs mount. A live daemon that cannot
be asked (no control channel, or no permission) is "unknown", not unhealthy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from . import control
from .mounts import MountEntry, encfs_mounts, mount_of_mountpoint

CLIENT_TIMEOUT = control.KMS_TIMEOUT + 5.0
STARTUP_GRACE = 2.0


@dataclass
class MountStatus:
    """One mount: what the kernel says, what its daemon says, and what is wrong."""

    mount: MountEntry
    report: dict[str, Any] | None = None
    daemon_error: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def health(self) -> str:
        """healthy, unhealthy, or unknown: a live daemon that cannot be asked (one without
        a control channel, or one the caller may not ask) is not known to be unwell."""
        if self.problems:
            return "unhealthy"
        return "unknown" if self.report is None else "healthy"

    def as_dict(self) -> dict[str, Any]:
        return {"mountpoint": self.mount.mountpoint, "backing": self.mount.backing,
                "mount_options": self.mount.options, "health": self.health,
                "healthy": self.healthy,
                "problems": self.problems, "daemon_error": self.daemon_error,
                "daemon": self.report}


def query(backing: str, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Ask the daemon of the mount of ``backing`` for its report (OSError if it cannot)."""
    path = control.socket_path(os.fsencode(backing))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        with control.addressable(path) as name:
            s.connect(name)
        s.sendall(b'{"op": "status"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError:
        raise OSError(f"the daemon's answer is not JSON ({len(data)} bytes)") from None
    if "error" in reply:
        raise OSError(f"the daemon refused the request: {reply['error']}")
    return reply


def _daemon_gone(mount: MountEntry) -> str | None:
    """Why the mount's daemon is known to be gone (the mountpoint is dead), or None."""
    try:
        os.statvfs(mount.mountpoint)  # statfs always reaches the daemon (stat may be cached)
    except OSError as st:
        if st.errno == 107:  # ENOTCONN: the kernel's connection to the daemon is gone
            return "daemon gone (transport endpoint is not connected); unmount with " \
                   f"fusermount3 -u {mount.mountpoint}"
    return None


def _daemon_error(mount: MountEntry, e: OSError) -> str:
    """Why a mount's daemon did not answer."""
    if isinstance(e, PermissionError):
        return "no permission to ask the daemon (run as root or as the mount's user)"
    if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
        return "the daemon does not answer on its control channel " \
               f"({os.fsdecode(control.socket_path(os.fsencode(mount.backing)))})"
    return f"the daemon does not answer: {e}"


def assess(report: dict[str, Any]) -> list[str]:
    """What is wrong with a mount, from its daemon's report (empty: healthy)."""
    problems = []
    kms = report.get("kms", {})
    if kms.get("reachable") is False:
        problems.append(f"KMS unreachable at {kms.get('endpoint')}: {kms.get('error')}")
    for key in report.get("keys", []):
        if key.get("revoked_here"):
            problems.append(f"key {key['key_id']} revoked ({key['revoked_here']}): its files "
                            "cannot be opened")
        elif key.get("state") not in ("enabled", "unknown") and kms.get("reachable"):
            problems.append(f"key {key['key_id']} is {key['state']}")
    return problems


def collect(mountpoints: Sequence[str]) -> tuple[list[MountStatus], list[str]]:
    """Status of the named mounts (all encfs mounts when none is named), and the names
    that are not encfs mounts."""
    if mountpoints:
        found, unknown = [], []
        for mp in mountpoints:
            entry = mount_of_mountpoint(mp)
            if entry is None:
                unknown.append(mp)
            else:
                found.append(entry)
    else:
        found, unknown = encfs_mounts(), []
    out = []
    for entry in found:
        st = MountStatus(entry)
        try:
            st.report = _query_new_mount(entry)
            st.problems = assess(st.report)
        except OSError as e:
            gone = _daemon_gone(entry)
            st.daemon_error = gone or _daemon_error(entry, e)
            st.problems = [gone] if gone else []
        out.append(st)
    return out, unknown


def _query_new_mount(entry: MountEntry) -> dict[str, Any]:
    """`query`, with a grace period for a mount that just started: its mountpoint is live
    a moment before its control channel listens."""
    deadline = time.monotonic() + STARTUP_GRACE
    while True:
        try:
            return query(entry.backing)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            os.statvfs(entry.mountpoint)  # a dead daemon: ENOTCONN at once, no waiting
            time.sleep(0.05)


# --- the table for people ---------------------------------------------------------------

def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render(st: MountStatus) -> str:
    lines = [f"{st.mount.mountpoint}: {st.health.replace('unhealthy', 'UNHEALTHY')}",
             f"  backing     {st.mount.backing}",
             f"  options     {st.mount.options}"]
    r = st.report
    if r is None:
        lines.append(f"  daemon      {st.daemon_error}")
        lines += [f"  problem     {p}" for p in st.problems]
        return "\n".join(lines)
    kms = r["kms"]
    reach = "reachable" if kms["reachable"] else f"UNREACHABLE ({kms['error']})"
    lines += [f"  daemon      pid {r['pid']}, uid {r['uid']}, up {r['uptime_s']:.0f} s",
              f"  settings    key {r['settings']['key']}, key cache ttl "
              f"{r['settings']['key_cache_ttl']:g} s"
              + (", shared backing" if r['settings']['shared_backing'] else ""),
              f"  kms         {kms['endpoint']}: {reach}, latency {_ms(kms['latency_ms'])}",
              f"  files       {r['open_files']} open; {r['deks_cached']} DEKs cached, "
              f"{r['deks_prepared']} prepared; journal {r['journal_pending']} pending"]
    keys = [["CMK", "alias", "state", "revoked here", "open", "cached", "prepared"]]
    keys += [[k["key_id"] + (" (default)" if k["default"] else ""), k.get("alias") or "-",
              k["state"],
              k["revoked_here"] or "-", str(k["open_files"]), str(k["deks_cached"]),
              str(k["deks_prepared"])] for k in r["keys"]]
    lines += ["  keys"] + _table(keys, "    ")
    reqs = [["requests", "count", "p50", "p90", "p99", "max"]]
    ordered = [op for op in r["requests"] if op != "all"] + ["all"]
    reqs += [[op, str(s["count"]), _ms(s["p50_ms"]), _ms(s["p90_ms"]), _ms(s["p99_ms"]),
              _ms(s["max_ms"])] for op in ordered if (s := r["requests"].get(op))]
    lines += _table(reqs, "    ")
    if r["last_errors"]:
        lines.append("  last errors")
        lines += [f"    {e['level']}: {e['message']}" for e in r["last_errors"]]
    for p in st.problems:
        lines.append(f"  problem     {p}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="encfs status",
                                description="Show every encfs mount (or the named ones): KMS, "
                                "keys, caches, journal, request latencies, last errors. Exit "
                                "status 1 when a mount is unhealthy.")
    p.add_argument("mountpoints", nargs="*", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    args = p.parse_args(argv)
    statuses, unknown = collect(args.mountpoints)
    for mp in unknown:
        print(f"encfs status: {mp} is not an encfs mount", file=sys.stderr)
    try:
        _print(statuses, unknown, args.json)
    except BrokenPipeError:  # `encfs status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if unknown:
        return 2
    return 0 if all(s.healthy for s in statuses) else 1


def _print(statuses: list[MountStatus], unknown: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"healthy": all(s.healthy for s in statuses),
                          "mounts": [s.as_dict() for s in statuses]}, indent=1))
    elif not statuses and not unknown:
        print("no encfs mounts")
    else:
        print("\n\n".join(render(s) for s in statuses))
    sys.stdout.flush()
