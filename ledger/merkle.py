"""RFC 9162 (RFC 6962) Merkle tree math: hashes, roots, inclusion and consistency proofs. Pure functions.

Trees are reached through ``subtree(start, size) -> hash``, the hash of leaves [start, start + size) where the range
is always a complete, aligned subtree (size a power of two, start a multiple of size). A store answers it from its
table of complete-subtree hashes, so a root or a proof costs O(log n) reads (O(log² n) at worst for a proof).

Verification follows RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency) step by step and raises ProofError.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

HASH_BYTES = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
PROOF_HASHES_MAX = 128

Subtree = Callable[[int, int], bytes]


class ProofError(Exception):
    """Raised when a Merkle proof does not verify; the message says which step failed."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def largest_power_of_two_below(n: int) -> int:
    """k with k < n <= 2k (n >= 2)."""
    assert n >= 2
    return 1 << ((n - 1).bit_length() - 1)


def range_hash(subtree: Subtree, start: int, size: int) -> bytes:
    """MTH(D[start:start+size]) for a range whose start is a multiple of its largest power-of-two part."""
    assert size >= 1
    if size & (size - 1) == 0:
        return subtree(start, size)
    k = largest_power_of_two_below(size)
    return node_hash(subtree(start, k), range_hash(subtree, start + k, size - k))


def root(subtree: Subtree, size: int) -> bytes:
    return EMPTY_ROOT if size == 0 else range_hash(subtree, 0, size)


def inclusion_proof(subtree: Subtree, index: int, size: int) -> list[bytes]:
    """PATH(index, D[size]) of RFC 6962 §2.1.1."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    proof: list[bytes] = []
    start = 0
    while size > 1:
        k = largest_power_of_two_below(size)
        if index < k:
            proof.append(range_hash(subtree, start + k, size - k))
            size = k
        else:
            proof.append(subtree(start, k))
            start, index, size = start + k, index - k, size - k
    return proof[::-1]


def consistency_proof(subtree: Subtree, old_size: int, new_size: int) -> list[bytes]:
    """PROOF(old_size, D[new_size]) of RFC 6962 §2.1.2 (empty when old_size is 0 or equals new_size)."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size == 0 or old_size == new_size:
        return []
    proof: list[bytes] = []
    start, m, n, complete = 0, old_size, new_size, True
    while m != n:
        k = largest_power_of_two_below(n)
        if m <= k:
            proof.append(range_hash(subtree, start + k, n - k))
            n = k
        else:
            proof.append(subtree(start, k))
            start, m, n, complete = start + k, m - k, n - k, False
    if not complete:
        proof.append(range_hash(subtree, start, m))
    return proof[::-1]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes) -> None:
    """RFC 9162 §2.1.3.2; ``leaf`` is the leaf hash. Raises ProofError."""
    _check_hashes(proof)
    if index >= size:
        raise ProofError(f"leaf index {index} is not below tree size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    if r != expected_root:
        raise ProofError("inclusion proof leads to a different root")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """RFC 9162 §2.1.4.2. Raises ProofError."""
    _check_hashes(proof)
    if old_size > new_size:
        raise ProofError(f"old size {old_size} is larger than new size {new_size}")
    if old_size == new_size:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError("two different roots for the same tree size")
        return
    if old_size == 0:
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than expected")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than expected")
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root")


def _check_hashes(proof: Sequence[bytes]) -> None:
    if len(proof) > PROOF_HASHES_MAX:
        raise ProofError(f"proof has {len(proof)} hashes, more than {PROOF_HASHES_MAX}")
    for item in proof:
        if not isinstance(item, bytes) or len(item) != HASH_BYTES:
            raise ProofError("every proof element must be 32 bytes")


class MemoryTree:
    """All leaf hashes in memory; for tests, the auditor and the witness. ``subtree`` is computed directly."""

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        self.leaves: list[bytes] = list(leaves)
        self._cache: dict[tuple[int, int], bytes] = {}

    def append(self, leaf: bytes) -> None:
        self.leaves.append(leaf)

    def subtree(self, start: int, size: int) -> bytes:
        key = (start, size)
        if key not in self._cache:
            if size == 1:
                value = self.leaves[start]
            else:
                half = size // 2
                value = node_hash(self.subtree(start, half), self.subtree(start + half, half))
            if start + size <= len(self.leaves):
                self._cache[key] = value
            return value
        return self._cache[key]

    def root(self, size: int | None = None) -> bytes:
        return root(self.subtree, len(self.leaves) if size is None else size)


class CompactRange:
    """The O(log n) complete-subtree hashes that summarise leaves [0, size): enough to append and to get roots.

    ``nodes`` holds (level, hash) from the largest subtree down; appending a leaf merges equal-level neighbours,
    reporting each new complete subtree to ``on_node(level, index, hash)``.
    """

    def __init__(self, size: int = 0, nodes: Sequence[tuple[int, bytes]] = ()) -> None:
        self.size = size
        self.nodes = list(nodes)
        assert [level for level, _ in self.nodes] == [b for b in range(size.bit_length()) if size >> b & 1][::-1]

    def append(self, leaf: bytes, on_node: Callable[[int, int, bytes], None] | None = None) -> None:
        self.nodes.append((0, leaf))
        index = self.size
        if on_node:
            on_node(0, index, leaf)
        level = 0
        while len(self.nodes) >= 2 and self.nodes[-1][0] == self.nodes[-2][0]:
            (_, right), (_, left) = self.nodes.pop(), self.nodes.pop()
            level += 1
            index >>= 1
            merged = node_hash(left, right)
            self.nodes.append((level, merged))
            if on_node:
                on_node(level, index, merged)
        self.size += 1

    def root(self) -> bytes:
        if not self.nodes:
            return EMPTY_ROOT
        result = self.nodes[-1][1]
        for _, hash_ in reversed(self.nodes[:-1]):
            result = node_hash(hash_, result)
        return result

    def copy(self) -> "CompactRange":
        return CompactRange(self.size, self.nodes)
