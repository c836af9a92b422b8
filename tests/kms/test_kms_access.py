"""Identity over the Unix socket: a real connection from another uid (nobody), refused then
allowed through a grant by user name."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from encfs.pytest_plugin import short_tempdir, run_as_uid, start_kms_server
from kms.client import KmsClient, KmsError

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


def run_as(uid: int, fn):
    """Run fn() in a forked child that dropped to uid/gid ``uid``; return its result or raise its KmsError.

    A fork (rather than a new interpreter) because the venv's interpreter may live under a
    directory that 'nobody' cannot read; the modules are already loaded in the child.
    """
    kind, value = run_as_uid(uid, fn)
    if kind == "kms":
        raise KmsError(*value)
    if kind != "ok":
        raise AssertionError(f"child failed: {kind} {value}")
    return value


@pytest.fixture
def shared_kms():
    workdir = short_tempdir("kms-")
    os.chmod(workdir, 0o711)            # nobody may traverse to the socket, not list or read
    server = start_kms_server(workdir, extra_args=["--socket-mode", "666"])
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_other_uid_refused_then_allowed_by_grant(shared_kms):
    sock = shared_kms.socket_path
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666
    with shared_kms.client as owner:
        kid = owner.create_key("owner/key")["key_id"]
        dek, ct = owner.create_datakey(kid, aad="file-7")

    def use_key():
        with KmsClient(sock) as c:
            who = c.call("x-encfs-list-audit", {"limit": "1"})["records"]
            new_dek, new_ct = c.create_datakey(kid, aad="file-8")
            return {"dek": c.decrypt_datakey(kid, ct, aad="file-7"), "caller": who,
                    "roundtrip": c.decrypt_datakey(kid, new_ct, aad="file-8") == new_dek}

    with pytest.raises(KmsError) as e:
        run_as(NOBODY, use_key)
    assert (e.value.status, e.value.error_code) == (403, "KMS.0306")
    assert "uid=65534" in e.value.error_msg

    # nobody's own namespace: list-keys shows none of root's keys
    assert run_as(NOBODY, lambda: KmsClient(sock).call("list-keys", {})["total"]) == 0

    with shared_kms.client as owner:
        grant = owner.call("create-grant", {"key_id": kid, "grantee_principal": "nobody",
                                            "operations": ["create-datakey", "decrypt-datakey"]})["grant_id"]
    out = run_as(NOBODY, use_key)
    assert out["dek"] == dek and out["roundtrip"] is True

    # the grant does not extend to administration
    with pytest.raises(KmsError) as e:
        run_as(NOBODY, lambda: KmsClient(sock).call("disable-key", {"key_id": kid}))
    assert e.value.error_code == "KMS.0306"

    # the audit names the uid and the grant used
    with shared_kms.client as owner:
        recs = owner.call("x-encfs-list-audit", {"key_id": kid})["records"]
    made = [r for r in recs if r["caller"] == "uid=65534" and r["operation"] == "create-datakey"]
    assert (made[0]["outcome"], made[0]["error_code"], made[0]["grant_id"]) == ("error", "KMS.0306", "")
    assert (made[-1]["outcome"], made[-1]["grant_id"]) == ("ok", grant)
    used = [r for r in recs if r["caller"] == "uid=65534" and r["operation"] == "decrypt-datakey"]
    assert used and all(r["outcome"] == "ok" and r["grant_id"] == grant for r in used)

    # revoked: refused again
    with shared_kms.client as owner:
        owner.call("revoke-grant", {"key_id": kid, "grant_id": grant})
    with pytest.raises(KmsError) as e:
        run_as(NOBODY, use_key)
    assert e.value.error_code == "KMS.0306"


def test_default_socket_mode_keeps_others_out(kms_server):
    os.chmod(os.path.dirname(kms_server.socket_path), 0o711)
    with pytest.raises(KmsError) as e:
        run_as(NOBODY, lambda: KmsClient(kms_server.socket_path).call("list-keys", {}))
    assert e.value.status is None and "Permission denied" in e.value.error_msg
