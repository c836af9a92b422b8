"""The keystore: root key handling, wrapping at rest, durability across reopen, destruction."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from kms.store import ROOT_KEY_FILE, Store, StoreError


def test_root_key_created_0600_and_reused(tmp_path):
    d = tmp_path / "data"
    s = Store(str(d))
    k = s.create_key(owner="uid:1", alias="a", description="")
    s.close()
    st = os.stat(d / ROOT_KEY_FILE)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 32
    assert stat.S_IMODE(os.stat(d).st_mode) & 0o077 == 0
    s2 = Store(str(d))
    assert s2.get_key(k.key_id).alias == "a"
    assert s2.material(k.key_id, 1) is not None      # same root key unwraps it
    s2.close()


def test_refuses_readable_root_key(tmp_path):
    d = tmp_path / "data"
    Store(str(d)).close()
    os.chmod(d / ROOT_KEY_FILE, 0o640)
    with pytest.raises(StoreError, match="chmod 600"):
        Store(str(d))


def test_refuses_group_writable_data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    os.chmod(d, 0o770)
    with pytest.raises(StoreError, match="writable by group"):
        Store(str(d))


def test_second_daemon_on_same_dir_refused(tmp_path):
    s = Store(str(tmp_path / "d"))
    with pytest.raises(StoreError, match="another kms daemon"):
        Store(str(tmp_path / "d"))
    s.close()


def test_material_only_wrapped_on_disk(tmp_path):
    d = tmp_path / "data"
    s = Store(str(d))
    k = s.create_key(owner="uid:1", alias="a", description="")
    material = s.material(k.key_id, 1)
    s.close()
    for name in os.listdir(d):
        if name != ROOT_KEY_FILE:
            assert material not in (d / name).read_bytes()
    db = sqlite3.connect(d / "keys.db")
    (wrapped,) = db.execute("SELECT wrapped FROM key_versions").fetchone()
    assert len(wrapped) == 12 + 32 + 16
    db.close()


def test_wrapped_material_bound_to_key_and_version(tmp_path):
    d = tmp_path / "data"
    s = Store(str(d))
    a = s.create_key(owner="uid:1", alias="a", description="")
    b = s.create_key(owner="uid:1", alias="b", description="")
    s.close()
    db = sqlite3.connect(d / "keys.db")
    (wa,) = db.execute("SELECT wrapped FROM key_versions WHERE key_id=?", (a.key_id,)).fetchone()
    db.execute("UPDATE key_versions SET wrapped=? WHERE key_id=?", (wa, b.key_id))
    db.commit()
    db.close()
    s = Store(str(d))
    with pytest.raises(StoreError, match="does not authenticate"):
        s.material(b.key_id, 1)
    s.close()


def test_rotation_and_destroy(tmp_path):
    s = Store(str(tmp_path / "d"))
    k = s.create_key(owner="uid:1", alias="a", description="")
    s.rotate_key(k.key_id)
    assert s.get_key(k.key_id).current_version == 2
    assert [v.version for v in s.versions(k.key_id)] == [1, 2]
    s.destroy_key(k.key_id)
    assert s.material(k.key_id, 1) is None and s.material(k.key_id, 2) is None
    assert s.get_key(k.key_id).alias is None
    s.close()
    s = Store(str(tmp_path / "d"))
    assert s.get_key(k.key_id).destroyed_ms is not None
    assert s.material(k.key_id, 2) is None
    s.close()


def test_destroyed_material_leaves_no_trace_in_files(tmp_path):
    d = tmp_path / "data"
    s = Store(str(d))
    k = s.create_key(owner="uid:1", alias="a", description="")
    s.rotate_key(k.key_id)
    keep = s.create_key(owner="uid:1", alias="b", description="")
    db = sqlite3.connect(d / "keys.db")
    wrapped = [w for (w,) in db.execute("SELECT wrapped FROM key_versions WHERE key_id=?", (k.key_id,))]
    db.close()
    assert len(wrapped) == 2
    s.destroy_key(k.key_id)
    for name in os.listdir(d):                  # also while the daemon still runs (WAL files)
        data = (d / name).read_bytes()
        assert not any(w in data for w in wrapped), name
    assert s.material(keep.key_id, 1) is not None
    s.close()
