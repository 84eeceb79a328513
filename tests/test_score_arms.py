"""A/B arm assignment: the vectorised salted hash against a plain-Python reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from piarec.scoring.arrow import in_share, user_hash

MASK = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bit, byte by byte as published."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & MASK
    return h


def fmix64(h: int) -> int:
    """MurmurHash3's 64-bit finalizer."""
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK
    h ^= h >> 33
    h = (h * 0xC4CEB93E53CA1A) & MASK
    return h ^ (h >> 33)


def reference_hash(user_id: str, salt: str) -> int:
    return fmix64(fnv1a64(salt.encode() + b"\0" + user_id.encode()))


def test_reference_fnv_matches_published_vectors():
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


def test_user_hash_equals_reference_on_awkward_ids():
    rng = np.random.default_rng(0)
    ids = ["", "a", "u1", "u2", "ünïcødé-用户", "x" * 300] + [
        "".join(chr(c) for c in rng.integers(33, 0x3000, rng.integers(0, 40))) for _ in range(200)
    ]
    for salt in ("", "piarec-ab-v1", "sälz"):
        expected = [reference_hash(u, salt) for u in ids]
        assert user_hash(pa.array(ids), salt).tolist() == expected
        # Sliced, chunked and large-string arrays give the same per-user hash.
        assert user_hash(pa.array(["pad", *ids]).slice(1), salt).tolist() == expected
        assert user_hash(pa.chunked_array([ids[:7], ids[7:]]), salt).tolist() == expected
        assert user_hash(pa.array(ids, pa.large_string()), salt).tolist() == expected


@pytest.mark.parametrize("share", [0.1, 0.5, 0.9])
def test_share_is_respected_and_assignment_is_per_user(share):
    ids = [f"user-{i}" for i in range(100_000)]
    got = in_share(pa.array(ids), "salt-1", share)
    cut = int(share * 2.0**64)
    sample = range(0, 100_000, 997)
    assert [got[i] for i in sample] == [reference_hash(ids[i], "salt-1") < cut for i in sample]
    assert abs(got.mean() - share) < 0.01
    # Stable across days: the same user in another batch, order or company keeps the arm.
    perm = np.random.default_rng(1).permutation(100_000)[:5000]
    again = in_share(pa.array([ids[i] for i in perm]), "salt-1", share)
    np.testing.assert_array_equal(again, got[perm])
    # Another salt reshuffles: about share^2 of users fall in both challenger groups.
    other = in_share(pa.array(ids), "salt-2", share)
    assert abs((got & other).mean() - share * share) < 0.01


def test_edge_shares():
    ids = pa.array(["a", "b", "c"])
    assert in_share(ids, "s", 1.0).all() and not in_share(ids, "s", 0.0).any()
    with pytest.raises(ValueError, match="share"):
        in_share(ids, "s", 1.5)
