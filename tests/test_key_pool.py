"""Layer 1: the pool of prepared DEKs follows a rotation, also one noticed while a DEK was
being made. The KMS here is a scripted stand-in: the point is the interleaving, which a
real daemon cannot be made to hit on demand (tests/test_rewrap.py covers the real KMS)."""

from __future__ import annotations

import trio

from encfs.keys import POOL_SIZE, KeyManager


class ScriptedKms:
    """Answers create-datakey when the test lets it, and the rotation status it is told."""

    def __init__(self) -> None:
        self.rotations = 0
        self.gate = trio.Event()
        self.waiting = trio.Event()

    async def call(self, operation: str, body: dict) -> dict:
        assert operation == "get-key-rotation-status"
        return {"key_rotation_enabled": False, "number_of_rotations": self.rotations}

    async def create_datakey(self, key_id: str, aad: str | None = None) -> tuple[bytes, str]:
        self.waiting.set()
        await self.gate.wait()
        return b"k" * 32, "00" * 64


def test_dek_made_across_a_rotation_is_not_pooled():
    trio.run(_made_across_a_rotation)


async def _made_across_a_rotation():
    kms = ScriptedKms()
    keys = KeyManager(kms, "cmk")  # type: ignore[arg-type]
    keys._versions["cmk"] = 1
    keys._pools["cmk"] = []
    keys._pool_low.set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keys.fill_pool)
        await kms.waiting.wait()          # the filler is making a DEK recorded as version 1
        kms.rotations = 1                 # the CMK rotates meanwhile ...
        await keys._follow_rotation("cmk", keys._pools["cmk"])  # ... and the check sees it
        assert keys._versions["cmk"] == 2
        kms.gate.set()                    # the in-flight DEK arrives, then the refills
        with trio.fail_after(10):
            while len(keys._pools["cmk"]) < POOL_SIZE:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert {rec.key_version for rec, _ in keys._pools["cmk"]} == {2}
