"""Default locations and identifiers shared by the daemon, its CLI and its clients.

One place decides them so that `kms serve`, `kms ...` and `encfs mount` agree without flags.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The project id a local user never has to type. Huawei project ids are 32 hex characters;
#: a local emulator has exactly one project, so a readable constant serves better.
DEFAULT_PROJECT_ID = "local"

SOCKET_ENV = "KMS_SOCKET"
PROJECT_ENV = "KMS_PROJECT_ID"
DATA_DIR_ENV = "KMS_DATA_DIR"


def default_socket_path() -> str:
    """`$KMS_SOCKET`, else `$XDG_RUNTIME_DIR/encfs-kms.sock`, else `/run/encfs-kms/kms.sock` for root,
    else a per-user path under /tmp."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "encfs-kms.sock")
    if os.geteuid() == 0:
        return "/run/encfs-kms/kms.sock"
    return f"/tmp/encfs-kms-{os.geteuid()}/kms.sock"


def default_data_dir() -> str:
    """`$KMS_DATA_DIR`, else `$XDG_DATA_HOME/encfs-kms`, else `~/.local/share/encfs-kms`."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return os.path.join(base, "encfs-kms")


def default_project_id() -> str:
    return os.environ.get(PROJECT_ENV) or DEFAULT_PROJECT_ID
