"""Run only as a child pytest run by tests/test_isolation.py (the name keeps it out of
normal collection): a test that mounts and unmounts, as any test of the suite does."""


def test_a_mount_of_this_run(encrypted_mount):
    with open(f"{encrypted_mount.mountpoint}/f", "w") as f:
        f.write("child\n")
