import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvcellar.cache import NamespaceSpec, hash_block, hash_blocks, hash_tail, namespace_digest

SPEC = NamespaceSpec(model_fingerprint="model-abc", dtype="bfloat16", block_size=4, layout_version=1, exact=False)
ZERO = bytes(32)

# Golden values: a change here is an on-disk format change and needs a new domain tag.
GOLDEN_NAMESPACE = "b1ffaf834855ff967dbb3dad3870ddc4e1279de7b2d65af8fe9ab3315421d138"
GOLDEN_BLOCK = "6ec8561c821db12efbdbdce400fc091e8ab4d04c4b403b6534caa2a9cbccb205"


def test_golden_values() -> None:
    assert namespace_digest(SPEC).hex() == GOLDEN_NAMESPACE
    assert hash_block(ZERO, [0, 1, 2**32 - 1]).hex() == GOLDEN_BLOCK


def test_byte_encoding_matches_the_documented_format() -> None:
    tokens = [7, 0, 65536, 2**32 - 1]
    body = b"kvcellar-block-v1\x00" + ZERO + struct.pack("<I", 4) + b"".join(struct.pack("<I", t) for t in tokens)
    assert hash_block(ZERO, tokens) == hashlib.sha256(body).digest()
    partial_body = b"kvcellar-partial-v1\x00" + ZERO + struct.pack("<I", 2) + struct.pack("<2I", 7, 0)
    assert hash_tail(ZERO, [7, 0]) == hashlib.sha256(partial_body).digest()
    stepped_body = b"kvcellar-stepped-block-v1\x00" + body.removeprefix(b"kvcellar-block-v1\x00")
    assert hash_block(ZERO, tokens, stepped=True) == hashlib.sha256(stepped_body).digest()
    fields = {k: v for k, v in dataclasses.asdict(SPEC).items() if v is not None}  # chunk_size=None is left out
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert text == '{"block_size":4,"dtype":"bfloat16","exact":false,"layout_version":1,"model_fingerprint":"model-abc","tenant_salt":""}'
    assert namespace_digest(SPEC) == hashlib.sha256(b"kvcellar-namespace-v1\x00" + text.encode()).digest()


def test_hashes_are_deterministic_across_processes() -> None:
    code = (
        "from kvcellar.cache import *\n"
        "s = NamespaceSpec('model-abc', 'bfloat16', 4, 1, False)\n"
        "r = namespace_digest(s)\n"
        "print(r.hex(), *[h.hex() for h in hash_blocks(r, list(range(10)), 4)], hash_tail(r, [1, 2]).hex())\n"
    )
    root = namespace_digest(SPEC)
    expected = " ".join([root.hex(), *[h.hex() for h in hash_blocks(root, list(range(10)), 4)], hash_tail(root, [1, 2]).hex()])
    src = str(Path(__file__).resolve().parents[2] / "src")
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": src}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected.split()


def test_every_namespace_field_and_salt_changes_the_digest() -> None:
    variants = [
        dataclasses.replace(SPEC, model_fingerprint="model-abd"),
        dataclasses.replace(SPEC, dtype="float16"),
        dataclasses.replace(SPEC, block_size=8),
        dataclasses.replace(SPEC, layout_version=2),
        dataclasses.replace(SPEC, exact=True),
        dataclasses.replace(SPEC, chunk_size=16),
        SPEC.with_salt("tenant-a"),
        SPEC.with_salt("tenant-b"),
    ]
    digests = {namespace_digest(spec) for spec in [SPEC, *variants]}
    assert len(digests) == len(variants) + 1
    assert namespace_digest(dataclasses.replace(SPEC)) == namespace_digest(SPEC)
    assert SPEC.with_salt("x").tenant_salt == "x" and SPEC.tenant_salt == ""


def test_blocks_are_chained() -> None:
    root = namespace_digest(SPEC)
    tokens = list(range(10))
    h0 = hash_block(root, tokens[0:4])
    h1 = hash_block(h0, tokens[4:8])
    assert hash_blocks(root, tokens, 4) == [h0, h1]  # the 2-token tail gets no block key
    assert hash_blocks(root, tokens[:3], 4) == []
    assert hash_block(hash_block(root, [9, 9, 9, 9]), tokens[4:8]) != h1  # same tokens, other parent
    assert len(h0) == 32


def test_partial_key_never_equals_block_key() -> None:
    root = namespace_digest(SPEC)
    assert hash_tail(root, [1, 2, 3, 4]) != hash_block(root, [1, 2, 3, 4])
    assert hash_tail(root, []) != hash_tail(root, [0])


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "3"])
def test_bad_token_ids_raise_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match="at index 1"):
        hash_block(ZERO, [5, bad, 6])  # type: ignore[list-item]


def test_bad_parent_and_spec_raise_value_error() -> None:
    with pytest.raises(ValueError, match="32-byte"):
        hash_block(b"short", [1])
    with pytest.raises(ValueError, match="block_size"):
        dataclasses.replace(SPEC, block_size=0)
    with pytest.raises(ValueError, match="model_fingerprint"):
        dataclasses.replace(SPEC, model_fingerprint="")
    with pytest.raises(ValueError, match="block_size"):
        hash_blocks(ZERO, [1, 2], 0)


def test_blocks_from_stepped_from_on_get_stepped_keys() -> None:
    root = namespace_digest(SPEC)
    tokens = list(range(12))
    plain, stepped = hash_blocks(root, tokens, 4), hash_blocks(root, tokens, 4, stepped_from=4)
    assert stepped[0] == plain[0]
    assert stepped[1] == hash_block(plain[0], tokens[4:8], stepped=True) != plain[1]
    assert stepped[2] == hash_block(stepped[1], tokens[8:12], stepped=True)
    assert hash_blocks(root, tokens, 4, stepped_from=12) == plain  # a stepped span with no full block


def test_a_chunk_size_that_is_not_a_multiple_of_the_block_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk_size must be None or a multiple of block_size"):
        dataclasses.replace(SPEC, chunk_size=6)
