"""RFC 9162 Merkle math against published vectors and by property, and the stored tree of the ledger."""

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from llorch.ledger import merkle
from llorch.ledger.signing import SigningKey
from llorch.ledger.store import LedgerStore
from tests.helpers import receipt_fields

VECTORS = json.loads((Path(__file__).parent / "fixtures" / "merkle_vectors.json").read_text())

# Reference leaves and roots of transparency-dev/merkle testonly/constants.go (LeafInputs, RootHashes).
LEAF_INPUTS = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
ROOTS = ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
         "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
         "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
         "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
         "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
         "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
         "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
         "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
         "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]


def b64(text):
    return base64.b64decode(text)


def test_reference_roots():
    tree = merkle.MemoryTree([merkle.leaf_hash(bytes.fromhex(leaf)) for leaf in LEAF_INPUTS])
    compact = merkle.CompactRange()
    assert tree.root(0).hex() == ROOTS[0] == merkle.EMPTY_ROOT.hex()
    for size in range(1, 9):
        compact.append(tree.leaves[size - 1])
        assert tree.root(size).hex() == ROOTS[size] == compact.root().hex()


@pytest.mark.parametrize("case", VECTORS["inclusion"], ids=lambda c: c["file"].removeprefix("testdata/"))
def test_inclusion_vectors(case):
    proof = [b64(p) for p in case["proof"] or []]
    args = (b64(case["leafHash"]), case["leafIdx"], case["treeSize"], proof, b64(case["root"]))
    if case["wantErr"]:
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(*args)
    else:
        merkle.verify_inclusion(*args)


@pytest.mark.parametrize("case", VECTORS["consistency"], ids=lambda c: c["file"].removeprefix("testdata/"))
def test_consistency_vectors(case):
    proof = [b64(p) for p in case["proof"] or []]
    args = (case["size1"], case["size2"], b64(case["root1"]), b64(case["root2"]), proof)
    if case["wantErr"]:
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(*args)
    else:
        merkle.verify_consistency(*args)


def test_our_proofs_equal_the_published_ones():
    tree = merkle.MemoryTree([merkle.leaf_hash(bytes.fromhex(leaf)) for leaf in LEAF_INPUTS])
    for case in VECTORS["inclusion"]:
        if not case["wantErr"] and case["treeSize"] <= 8 and case["proof"]:
            assert merkle.inclusion_proof(tree.subtree, case["leafIdx"], case["treeSize"]) == \
                [b64(p) for p in case["proof"]]
    for case in VECTORS["consistency"]:
        if not case["wantErr"] and case["size2"] <= 8 and case["proof"]:
            assert merkle.consistency_proof(tree.subtree, case["size1"], case["size2"]) == \
                [b64(p) for p in case["proof"]]


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=300), st.data())
def test_generated_proofs_verify_and_tampering_fails(size, data):
    tree = merkle.MemoryTree([merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(size)])
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    proof = merkle.inclusion_proof(tree.subtree, index, size)
    merkle.verify_inclusion(tree.leaves[index], index, size, proof, tree.root())
    if proof:
        victim = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
        bad = list(proof)
        bad[victim] = bytes([bad[victim][0] ^ 1]) + bad[victim][1:]
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(tree.leaves[index], index, size, bad, tree.root())
    old = data.draw(st.integers(min_value=0, max_value=size))
    consistency = merkle.consistency_proof(tree.subtree, old, size)
    merkle.verify_consistency(old, size, tree.root(old), tree.root(), consistency)
    if 0 < old < size:
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(old, size, merkle.leaf_hash(b"other"), tree.root(), consistency)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=200))
def test_compact_range_root_equals_the_full_tree(size):
    tree = merkle.MemoryTree([merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(size)])
    compact, nodes = merkle.CompactRange(), []
    for leaf in tree.leaves:
        compact.append(leaf, lambda level, index, hash_: nodes.append((level, index, hash_)))
    assert compact.root() == tree.root()
    for level, index, hash_ in nodes:
        assert tree.subtree(index << level, 1 << level) == hash_


async def test_the_stored_tree_gives_the_same_roots_and_proofs(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.sqlite"
    async with LedgerStore.open(path, key) as ledger:
        entries = [await ledger.append(receipt_fields(key, f"req-{i:08d}")) for i in range(37)]
    reference = merkle.MemoryTree([merkle.leaf_hash(entry) for entry in entries])
    async with LedgerStore.open(path, key) as ledger:      # reopened: the compact range is rebuilt from the table
        for size in (1, 2, 5, 16, 37):
            assert await ledger.root(size) == reference.root(size)
            for index in (0, size // 2, size - 1):
                assert await ledger.inclusion_proof(index, size) == \
                    merkle.inclusion_proof(reference.subtree, index, size)
        assert await ledger.consistency_proof(5, 37) == merkle.consistency_proof(reference.subtree, 5, 37)
        more = await ledger.append(receipt_fields(key, "req-later-01"))
        reference.append(merkle.leaf_hash(more))
        assert await ledger.root(38) == reference.root()
