"""The inode table: which FUSE node id and generation name which backing object.

The rule (docs/CONSISTENCY.md, "Node ids"): a node id names the backing inode number
(``st_ino``; the backing root is node 1), so that ``st_ino`` seen through the mount is the
backing file's own, stable for the file's life and shared by its hard links. Backing
filesystems hand a freed inode number to the next new file at once (ext4 does), while the
kernel may still hold the old node (its lookups not yet forgotten, a cwd, a dentry). So
every object gets a **generation** of its own, from one counter that only grows for the
life of the mount: when an inode number comes back as another object, the node gets a new
generation, and the kernel, seeing the same node id with another generation, marks its old
inode stale and makes a new one instead of taking the new object for the old
(``fuse_iget``: "nodeid was reused").

An inode number is known to be reused when the table saw its object lose its last name
(unlink of the last link, rmdir, replaced by rename: `unlinked`), or when it comes back
with another file type (a change made behind the mount's back). Lookup counts are exact:
every reply that hands the kernel a node counts one (`remember`), FORGET takes back what it
says, and a node leaves the table only when the kernel holds none and nothing is open. A
replaced node keeps the count of the old one: the kernel forgets both under the one id.

Pure bookkeeping, no I/O: the nodes themselves (``fs.Node``, made by the ``factory`` passed
in) carry ``ino``, ``generation``, ``kind``, ``dead``, ``links``, ``lookups`` and ``opens``.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Callable, Iterator, Protocol

ROOT = 1  # pyfuse3.ROOT_INODE, without importing FUSE into pure code


class TableNode(Protocol):
    ino: int
    generation: int
    kind: int
    dead: bool
    links: set[tuple[int, bytes]]
    lookups: int
    opens: int


class InodeTable:
    """node id -> node, with the generation rule above. Reads like a dict of nodes (the
    content path looks nodes up by id and file handle)."""

    def __init__(self, root_backing_ino: int, factory: Callable[[int], Any]):
        self._root_backing_ino = root_backing_ino
        self._factory = factory
        self._next_generation = 1
        self._nodes: dict[int, Any] = {}
        root = self._new(ROOT, stat.S_IFDIR)
        root.lookups = 1  # the kernel holds the root for the life of the mount

    # --- dict-like access ---------------------------------------------------------------

    def get(self, ino: int, default: Any = None) -> Any:
        return self._nodes.get(ino, default)

    def __getitem__(self, ino: int) -> Any:
        return self._nodes[ino]

    def __setitem__(self, ino: int, node: Any) -> None:
        """Adopt a node made elsewhere (a node the kernel holds that we lost track of)."""
        if not getattr(node, "generation", 0):
            node.generation = self._take_generation()
        self._nodes[ino] = node

    def __contains__(self, ino: object) -> bool:
        return ino in self._nodes

    def __delitem__(self, ino: int) -> None:
        del self._nodes[ino]

    def __iter__(self) -> Iterator[int]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def pop(self, ino: int, default: Any = None) -> Any:
        return self._nodes.pop(ino, default)

    def values(self):
        return self._nodes.values()

    # --- identity -----------------------------------------------------------------------

    def node_id(self, st: os.stat_result) -> int:
        return ROOT if st.st_ino == self._root_backing_ino else st.st_ino

    def _take_generation(self) -> int:
        gen = self._next_generation
        self._next_generation += 1
        return gen

    def _new(self, ino: int, kind: int, lookups: int = 0) -> Any:
        node = self._factory(ino)
        node.generation = self._take_generation()
        node.kind = kind
        node.dead = False
        node.lookups = lookups
        self._nodes[ino] = node
        return node

    def resolve(self, st: os.stat_result) -> Any:
        """The node of the object ``st`` describes: the known one, or a new one (with a new
        generation) when the id is unknown or its old object is gone. Counts nothing."""
        ino = self.node_id(st)
        kind = stat.S_IFMT(st.st_mode)
        node = self._nodes.get(ino)
        if node is None:
            return self._new(ino, kind)
        if not node.kind:  # adopted without a type (see __setitem__): take this one
            node.kind = kind
        if ino != ROOT and node.opens == 0 and (node.dead or node.kind != kind):
            # The old object is gone (an open one keeps its backing inode, so its number
            # cannot come back while it is open). The kernel's references carry over: it
            # will forget them under this id.
            return self._new(ino, kind, lookups=node.lookups)
        return node

    def remember(self, st: os.stat_result, parent: int, name: bytes) -> Any:
        """Count one kernel reference to the object behind ``parent/name``."""
        node = self.resolve(st)
        node.links.add((parent, name))
        node.lookups += 1
        return node

    def forget(self, ino: int, nlookup: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= nlookup
        if node.lookups <= 0 and node.opens == 0:
            del self._nodes[ino]

    def unlinked(self, parent: int, name: bytes, ino: int, last: bool) -> None:
        """``parent/name`` no longer leads to node ``ino``; ``last``: it was the object's
        last name, so its inode number may come back as another object."""
        node = self._nodes.get(ino)
        if node is None:
            return
        node.links.discard((parent, name))
        if last and ino != ROOT:
            node.dead = True
            node.links.clear()

    def linked(self, parent: int, name: bytes, ino: int) -> None:
        """``parent/name`` now leads to node ``ino`` too (a rename target)."""
        node = self._nodes.get(ino)
        if node is not None:
            node.links.add((parent, name))

    def released(self, node: Any) -> None:
        """The last open handle of ``node`` closed: drop it if the kernel holds none."""
        if node.lookups <= 0 and node.ino != ROOT and self._nodes.get(node.ino) is node:
            del self._nodes[node.ino]
