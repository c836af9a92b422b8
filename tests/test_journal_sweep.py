"""The sweep after an unclean stop (encfs/journal_sweep.py): what an interrupted create or
unlink leaves goes, nothing else is touched."""

import os

from encfs.journal_sweep import sweep


def test_only_leftovers_of_an_interrupted_create_or_unlink_are_removed(tmp_path):
    root = tmp_path / "backing"
    for d in ("sub/deeper", ".encfs/tmp", "lost+found"):
        (root / d).mkdir(parents=True)
    keep = ["a", "a.sfskey",  # a file with its key
            "empty",  # an empty file made outside the mount: no key yet
            "sub/deeper", "sub/deeper.sfskey",  # whatever is beside a directory stays
            "sub/encfs.long.abc", "sub/encfs.long.abc.name",  # a long name and its file
            ".encfs/tmp/x.sfskey", "lost+found/y.sfskey"]  # not the tree's
    gone = ["orphan.sfskey", "sub/deeper/gone.sfskey", "sub/encfs.long.def.name"]
    for rel in keep + gone:
        if not (root / rel).is_dir():
            (root / rel).write_bytes(b"k")
    os.symlink("nowhere", root / "planted.sfskey")  # not made by encfs: fsck's to judge
    done = sweep(os.fsencode(root))
    assert done == ["removed 2 key sidecar(s) of an interrupted create or unlink",
                    "removed 1 long-name file(s) of an interrupted create, rename or unlink"]
    for rel in keep + ["planted.sfskey"]:
        assert os.path.lexists(root / rel), rel
    for rel in gone:
        assert not os.path.lexists(root / rel), rel
    assert sweep(os.fsencode(root)) == []
