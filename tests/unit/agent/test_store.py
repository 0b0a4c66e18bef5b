"""Agent storage: content-addressed models, atomic pointers, resumable chunked downloads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.download import ChunkRejected, Download, prune_partials
from agent.fsutil import CorruptFileError
from agent.protocol import Manifest
from agent.store import ModelStore, Pointers, sha256_file

pytestmark = pytest.mark.agent


def _manifest(data: bytes, chunk_size: int = 1000) -> Manifest:
    """Manifest for in-memory bytes."""
    chunks = tuple(
        hashlib.sha256(data[i : i + chunk_size]).hexdigest()
        for i in range(0, len(data), chunk_size)
    )
    return Manifest(
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        chunk_size=chunk_size,
        chunk_sha256=chunks,
        name="m",
        version="1",
        recipe="fp32",
    )


def _put(store: ModelStore, tmp_path: Path, data: bytes) -> str:
    """Add bytes to the store through the verified path."""
    src = tmp_path / "incoming"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    store.add_verified(sha, src)
    return sha


def test_store_activate_keeps_previous_and_prunes_older(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    a, b, c = (_put(store, tmp_path, bytes([i]) * 100) for i in range(3))
    store.activate(a)
    store.activate(b)
    assert store.pointers().current == b and store.pointers().previous == a
    store.activate(c)
    assert store.pointers().current == c and store.pointers().previous == b
    assert not store.has(a), "the model that fell off the previous slot is pruned"
    assert store.has(b) and store.has(c)


def test_store_discard_keeps_referenced_models(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    a, b = (_put(store, tmp_path, bytes([i]) * 10) for i in range(2))
    store.activate(a)
    store.discard(a)
    store.discard(b)
    assert store.has(a), "the current model is never discarded"
    assert not store.has(b)


def test_store_rollback_swaps_pointers(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    a, b = (_put(store, tmp_path, bytes([i]) * 10) for i in range(2))
    store.activate(a)
    store.activate(b)
    store.rollback()
    assert store.pointers().current == a and store.pointers().previous == b


def test_store_refuses_rollback_without_previous(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    store.activate(_put(store, tmp_path, b"x" * 10))
    with pytest.raises(FileNotFoundError, match="no previous model"):
        store.rollback()


def test_store_rejects_digest_mismatch(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    src = tmp_path / "f"
    src.write_bytes(b"hello")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        store.add_verified("00" * 32, src)
    assert src.exists(), "a rejected file is not moved into the store"


def test_pointer_file_is_replaced_atomically(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    sha = _put(store, tmp_path, b"m" * 10)
    store.activate(sha)
    assert json.loads((tmp_path / "models" / "pointers.json").read_text())["current"] == sha
    assert not list((tmp_path / "models").glob(".pointers.json.*")), "no temp file left behind"


def test_download_assembles_and_verifies(tmp_path: Path) -> None:
    data = bytes(range(256)) * 20
    manifest = _manifest(data)
    dl = Download(manifest, tmp_path)
    for i in reversed(range(manifest.chunk_count)):
        dl.accept(i, data[i * 1000 : (i + 1) * 1000])
    assert dl.complete and dl.missing() == []
    assert sha256_file(dl.part_path) == manifest.sha256


def test_download_rejects_corrupt_chunk_and_keeps_asking(tmp_path: Path) -> None:
    data = b"abc" * 1000
    manifest = _manifest(data)
    dl = Download(manifest, tmp_path)
    bad = bytearray(data[:1000])
    bad[17] ^= 0xFF
    with pytest.raises(ChunkRejected, match="sha256 mismatch"):
        dl.accept(0, bytes(bad))
    assert 0 in dl.missing()
    with pytest.raises(ChunkRejected, match="bytes, expected"):
        dl.accept(0, data[:999])
    with pytest.raises(ChunkRejected, match="out of range"):
        dl.accept(99, b"x")


def test_download_duplicate_chunk_is_a_no_op(tmp_path: Path) -> None:
    data = b"q" * 2500
    dl = Download(_manifest(data), tmp_path)
    assert dl.accept(1, data[1000:2000]) is True
    assert dl.accept(1, data[1000:2000]) is False


def test_download_resumes_from_bitmap_after_restart(tmp_path: Path) -> None:
    data = bytes(range(200)) * 100  # 20 chunks of 1000
    manifest = _manifest(data)
    dl = Download(manifest, tmp_path)
    for i in range(Download.BITMAP_EVERY):
        dl.accept(i, data[i * 1000 : (i + 1) * 1000])
    resumed = Download(manifest, tmp_path)  # a new process after a crash
    assert resumed.missing() == list(range(Download.BITMAP_EVERY, manifest.chunk_count))


def test_download_ignores_bitmap_of_another_manifest(tmp_path: Path) -> None:
    data = b"z" * 3000
    dl = Download(_manifest(data), tmp_path)
    for i in range(3):
        dl.accept(i, data[i * 1000 : (i + 1) * 1000])
    other = _manifest(data, chunk_size=1500)
    assert Download(other, tmp_path).missing() == [0, 1]


def test_golden_lives_beside_its_model_and_goes_with_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    a, b, c = (_put(store, tmp_path, bytes([i]) * 100) for i in range(3))
    golden = tmp_path / "golden.npz"
    for sha in (a, b, c):
        golden.write_bytes(b"golden of " + sha.encode())
        digest = hashlib.sha256(golden.read_bytes()).hexdigest()
        store.add_golden(sha, digest, golden)
        assert store.has_golden(sha, digest) and not store.has_golden(sha, "00" * 32)
    store.activate(a)
    store.activate(b)
    store.activate(c)
    assert not store.golden_path(a).exists(), "pruned with the model that fell off"
    assert store.golden_path(b).exists() and store.golden_path(c).exists()


def test_golden_with_a_wrong_digest_is_not_stored(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    sha = _put(store, tmp_path, b"m" * 10)
    golden = tmp_path / "golden.npz"
    golden.write_bytes(b"data")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        store.add_golden(sha, "00" * 32, golden)
    assert not store.golden_path(sha).exists()


def test_orphan_goldens_are_pruned_on_activation(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    orphan = store.golden_path("ef" * 32)
    orphan.write_bytes(b"left behind by a discarded model")
    store.activate(_put(store, tmp_path, b"x" * 10))
    assert not orphan.exists()


@pytest.mark.parametrize(
    "content", [b"{", b"[1]", b'{"current": "nope"}', b'{"current": null, "previous": 7}']
)
def test_damaged_pointers_raise_corrupt_file_error(tmp_path: Path, content: bytes) -> None:
    store = ModelStore(tmp_path / "models")
    store.pointers_path.write_bytes(content)
    with pytest.raises(CorruptFileError):
        store.pointers()


def test_rebuild_pointers_uses_the_only_stored_model(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    sha = _put(store, tmp_path, b"only" * 10)
    store.pointers_path.write_bytes(b"\x00")
    message = store.rebuild_pointers(hint=None)
    assert "the only stored model" in message
    assert store.pointers() == Pointers(sha, None)
    assert (tmp_path / "models" / "pointers.json.corrupt").read_bytes() == b"\x00"


def test_rebuild_pointers_prefers_the_recorded_active_model(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    a, b = (_put(store, tmp_path, bytes([i]) * 10) for i in range(2))
    store.pointers_path.write_bytes(b"{")
    assert "recorded active model" in store.rebuild_pointers(hint=b)
    assert store.pointers() == Pointers(b, a)


def test_rebuild_pointers_serves_nothing_when_ambiguous(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    for i in range(2):
        _put(store, tmp_path, bytes([i]) * 10)
    store.pointers_path.write_bytes(b"{")
    message = store.rebuild_pointers(hint="ab" * 32)  # the hint is not in the store
    assert "serving nothing" in message and "2 models" in message
    assert store.pointers() == Pointers()


def test_prune_partials_keeps_only_the_named_artifacts(tmp_path: Path) -> None:
    keep, stale = "aa" * 32, "bb" * 32
    for sha in (keep, stale):
        (tmp_path / f"{sha}.part").write_bytes(b"x")
        (tmp_path / f"{sha}.chunks.json").write_text("{}")
    (tmp_path / "unrelated.txt").write_text("kept")
    removed = prune_partials(tmp_path, {keep})
    assert sorted(removed) == [f"{stale}.chunks.json", f"{stale}.part"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{keep}.chunks.json",
        f"{keep}.part",
        "unrelated.txt",
    ]
    assert prune_partials(tmp_path / "missing", set()) == []


@pytest.mark.parametrize("content", ["{not json", '{"manifest_chunks": 3, "have": [0]}', "[]"])
def test_download_with_a_damaged_bitmap_starts_over(tmp_path: Path, content: str) -> None:
    data = b"k" * 3000
    manifest = _manifest(data)
    dl = Download(manifest, tmp_path)
    for i in range(3):
        dl.accept(i, data[i * 1000 : (i + 1) * 1000])
    (tmp_path / f"{manifest.sha256}.chunks.json").write_text(content)
    assert Download(manifest, tmp_path).missing() == [0, 1, 2]


def test_download_flush_saves_chunks_below_the_bitmap_interval(tmp_path: Path) -> None:
    data = bytes(range(100)) * 100  # 10 chunks
    manifest = _manifest(data)
    dl = Download(manifest, tmp_path)
    for i in range(3):  # fewer than BITMAP_EVERY: not saved yet
        dl.accept(i, data[i * 1000 : (i + 1) * 1000])
    assert Download(manifest, tmp_path).missing() == list(range(10))
    dl.flush()
    resumed = Download(manifest, tmp_path)
    assert resumed.missing() == list(range(3, 10)) and resumed.resumed == 3
