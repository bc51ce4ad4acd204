"""Contract tests of ArtifactStore against a real S3 server (SeaweedFS, from tests/fixtures/s3.py)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
import tracemalloc

import pytest
from minio import Minio

from services.common.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable
from services.common.store import ArtifactStore, ChecksumMismatch, MiB
from services.stack.ports import free_port
from tests.fixtures.s3 import ACCESS_KEY, SECRET_KEY


class PseudoRandomStream(io.RawIOBase):
    """`size` deterministic, incompressible bytes, made as they are read and hashed on the way out.

    Each 1 MiB block is a rotation of one random block, stamped with its index, so blocks differ and
    a lost, repeated or reordered part changes the digest. Only a block or two is held at a time.
    """

    _BLOCK = MiB

    def __init__(self, size: int, seed: int = 0):
        self._base = random.Random(seed).randbytes(self._BLOCK)
        self._left = size
        self._index = 0
        self._pending = b""
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def _next_block(self) -> bytes:
        shift = (self._index * 4099) % self._BLOCK
        block = self._index.to_bytes(8, "little") + (self._base[shift:] + self._base[:shift])[8:]
        self._index += 1
        block = block[: self._left]
        self._left -= len(block)
        return block

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = len(self._pending) + self._left
        parts, need = [], n
        while need > 0 and (self._pending or self._left):
            if not self._pending:
                self._pending = self._next_block()
            take, self._pending = self._pending[:need], self._pending[need:]
            parts.append(take)
            need -= len(take)
        out = b"".join(parts)
        self.sha.update(out)
        return out


def raw_client(store: ArtifactStore) -> Minio:
    """A plain minio client on the same server, to set up what the store itself would refuse."""
    return Minio(store.endpoint, ACCESS_KEY, SECRET_KEY, secure=False, region="us-east-1")


def test_put_bytes_then_get_bytes_returns_the_same_bytes(store):
    """What goes in under a key comes back out unchanged, and the key now exists."""
    result = store.put_bytes("t/sessions/s1/docs/d1/original", b"hello \x00 world")
    assert store.get_bytes("t/sessions/s1/docs/d1/original") == b"hello \x00 world"
    assert store.exists("t/sessions/s1/docs/d1/original")
    assert result.size == 13 and result.sha256 == hashlib.sha256(b"hello \x00 world").hexdigest()


def test_an_empty_object_round_trips(store):
    """A zero-byte object can be written, stated and read back."""
    store.put_bytes("a/empty", b"")
    assert store.get_bytes("a/empty") == b""
    assert store.stat("a/empty").size == 0


def test_put_overwrites_an_existing_key(store):
    """A second put under the same key replaces the content and its recorded sha256."""
    store.put_bytes("a/k", b"first")
    store.put_bytes("a/k", b"second")
    assert store.get_bytes("a/k") == b"second"
    assert store.stat("a/k").sha256 == hashlib.sha256(b"second").hexdigest()


def test_stat_reports_size_content_type_etag_and_metadata_with_the_sha256(store):
    """stat gives the size, content type, ETag and user metadata (lower-case keys), sha256 included."""
    data = "é text".encode()
    store.put_bytes("a/text.md", data, content_type="text/markdown; charset=utf-8", metadata={"Doc-Id": "d1"})
    info = store.stat("a/text.md")
    assert info.key == "a/text.md"
    assert info.size == len(data)
    assert info.content_type == "text/markdown; charset=utf-8"
    assert info.etag
    assert info.metadata == {"doc-id": "d1", "sha256": hashlib.sha256(data).hexdigest()}
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.last_modified is not None


def test_list_returns_the_keys_under_a_prefix_in_key_order(store):
    """list is recursive by default; not recursive it gives direct keys and each sub-folder once."""
    for key in ("t/b/2", "t/a", "t/b/1", "u/x", "t/c/d/e"):
        store.put_bytes(key, b"x")
    assert store.list("t/") == ["t/a", "t/b/1", "t/b/2", "t/c/d/e"]
    assert store.list() == ["t/a", "t/b/1", "t/b/2", "t/c/d/e", "u/x"]
    assert store.list("t/", recursive=False) == ["t/a", "t/b/", "t/c/"]
    assert store.list("nothing/") == []


def test_delete_removes_the_object_and_deleting_again_is_not_an_error(store):
    """delete removes a key; deleting a missing key is a no-op, as in S3."""
    store.put_bytes("a/k", b"x")
    store.delete("a/k")
    assert not store.exists("a/k")
    store.delete("a/k")


def test_a_missing_key_raises_not_found_naming_the_key(store):
    """Every read of a missing key raises NotFound, and the message names the key."""
    key = "t/sessions/s1/missing.json"
    for read in (store.get_bytes, store.get_json, store.stat, store.iter_chunks):
        with pytest.raises(NotFound, match="missing.json"):
            read(key)
    with pytest.raises(NotFound, match="missing.json"):
        store.download_to(key, io.BytesIO())
    assert not store.exists(key)


def test_download_to_a_path_of_a_missing_key_leaves_no_file(store, tmp_path):
    """A failed download leaves neither the target nor a temporary file behind."""
    with pytest.raises(NotFound):
        store.download_to("a/missing", tmp_path / "out.bin")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_bucket_raises_not_found_naming_the_bucket(seaweedfs):
    """Reading from a bucket that does not exist raises NotFound naming the bucket."""
    missing = ArtifactStore(seaweedfs.endpoint, ACCESS_KEY, SECRET_KEY, bucket="no-such-bucket-here")
    with pytest.raises(NotFound, match="no-such-bucket-here"):
        missing.get_bytes("a/b")
    with pytest.raises(NotFound, match="no-such-bucket-here"):
        missing.list("a/")


@pytest.mark.parametrize(
    "key",
    ["", "/a", "a//b", "a/", "a/../b", "..", "a/./b", "a/..", "a\x00b", "a\nb", "x" * 1025],
)
def test_an_invalid_key_raises_invalid_argument(store, key):
    """Empty keys, a leading '/', empty, '.' or '..' segments, control characters and over-long keys are refused."""
    for call in (store.get_bytes, store.stat, store.exists, store.delete):
        with pytest.raises(InvalidArgument):
            call(key)
    with pytest.raises(InvalidArgument):
        store.put_bytes(key, b"x")
    with pytest.raises(InvalidArgument):
        store.put_stream(key, io.BytesIO(b"x"))


@pytest.mark.parametrize("prefix", ["/a/", "a//", "../a/", "a/../"])
def test_an_invalid_prefix_raises_invalid_argument(store, prefix):
    """Prefixes follow the key rules, except that they may end with '/'."""
    with pytest.raises(InvalidArgument):
        store.list(prefix)
    with pytest.raises(InvalidArgument):
        store.delete_prefix(prefix)


def test_invalid_metadata_raises_invalid_argument(store):
    """Metadata keys must be header-safe and not reserved; values must be text (any script is
    encoded: tests/test_unicode_names.py)."""
    for bad in ({"Content-Type": "x"}, {"has space": "x"}, {"x-amz-acl": "x"}, {"k": 5}, {"k": "\ud800"}):
        with pytest.raises(InvalidArgument):
            store.put_bytes("a/k", b"x", metadata=bad)
    assert not store.exists("a/k")


def test_a_claimed_sha256_that_does_not_match_the_content_is_refused(store):
    """A caller's sha256 metadata must be the content's digest."""
    with pytest.raises(InvalidArgument, match="sha256"):
        store.put_bytes("a/k", b"x", metadata={"sha256": "0" * 64})
    store.put_bytes("a/k", b"x", metadata={"sha256": hashlib.sha256(b"x").hexdigest()})


def test_a_read_that_does_not_match_the_recorded_sha256_raises_checksum_mismatch(store, tmp_path):
    """Full reads check the content against the sha256 in the metadata."""
    raw_client(store).put_object(store.bucket, "a/bad", io.BytesIO(b"data"), 4, metadata={"sha256": "0" * 64})
    with pytest.raises(ChecksumMismatch, match="a/bad"):
        store.get_bytes("a/bad")
    with pytest.raises(ChecksumMismatch):
        store.download_to("a/bad", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_delete_prefix_removes_that_folder_only(store):
    """delete_prefix("a/b") deletes a/b/... but not a/bc or a/b itself."""
    for key in ("a/b/1", "a/b/c/2", "a/bc/3", "a/b"):
        store.put_bytes(key, b"x")
    assert store.delete_prefix("a/b") == 2
    assert store.list("a") == ["a/b", "a/bc/3"]
    assert store.delete_prefix("a/nothing/") == 0


def test_delete_prefix_refuses_an_empty_prefix(store):
    """An empty prefix would delete the whole bucket, so it is refused."""
    store.put_bytes("a/k", b"x")
    with pytest.raises(InvalidArgument):
        store.delete_prefix("")
    assert store.exists("a/k")


def test_json_round_trips(store):
    """put_json/get_json keep unicode, nesting and numbers, stored as application/json."""
    doc = {"pages": [{"start": 0, "end": 120}], "title": "Résumé ✓", "score": 0.5, "none": None}
    store.put_json("a/pages.json", doc)
    assert store.get_json("a/pages.json") == doc
    assert store.stat("a/pages.json").content_type == "application/json"
    assert json.loads(store.get_bytes("a/pages.json").decode("utf-8")) == doc


def test_upload_dir_then_download_dir_recreates_the_folder(store, tmp_path):
    """A PEFT-style adapter folder, nested files included, survives a round trip byte for byte."""
    src = tmp_path / "adapter"
    (src / "sub" / "deeper").mkdir(parents=True)
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": random.Random(1).randbytes(300_000),
        "sub/metrics.json": b"{}",
        "sub/deeper/empty.bin": b"",
    }
    for rel, data in files.items():
        (src / rel).write_bytes(data)

    keys = store.upload_dir("t/adapters/a1", src, last=["adapter_config.json"])
    assert keys[-1] == "t/adapters/a1/adapter_config.json"
    assert sorted(keys) == sorted(f"t/adapters/a1/{rel}" for rel in files)

    dest = tmp_path / "restored"
    written = store.download_dir("t/adapters/a1/", dest)
    assert sorted(p.relative_to(dest).as_posix() for p in written) == sorted(files)
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data
    assert not [p for p in dest.rglob(".*.part")]


def test_download_dir_of_an_empty_prefix_gives_an_empty_folder(store, tmp_path):
    """Nothing under the prefix: an empty folder and an empty list, not an error."""
    assert store.download_dir("t/adapters/none", tmp_path / "x") == []
    assert (tmp_path / "x").is_dir()


def test_put_file_and_download_to_a_path_round_trip(store, tmp_path):
    """put_file guesses the content type and records the sha256; download_to writes the file."""
    src = tmp_path / "notes.txt"
    src.write_bytes(b"some notes\n" * 1000)
    result = store.put_file("a/notes.txt", src)
    assert result.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    info = store.stat("a/notes.txt")
    assert info.content_type == "text/plain" and info.sha256 == result.sha256
    assert store.download_to("a/notes.txt", tmp_path / "out" / "notes.txt") == src.stat().st_size
    assert (tmp_path / "out" / "notes.txt").read_bytes() == src.read_bytes()


def test_a_small_stream_is_stored_with_its_sha256(store):
    """A stream that fits in one part goes up in one request with its digest in the metadata."""
    result = store.put_stream("a/small", io.BytesIO(b"abc" * 1000), content_type="text/plain")
    assert result.size == 3000 and result.sha256 == hashlib.sha256(b"abc" * 1000).hexdigest()
    info = store.stat("a/small")
    assert info.sha256 == result.sha256 and info.content_type == "text/plain"


def test_a_stream_shorter_than_its_length_raises_invalid_argument(store):
    """A stream that ends before the promised length is refused and nothing is stored."""
    with pytest.raises(InvalidArgument, match="ended after 10 bytes"):
        store.put_stream("a/short", io.BytesIO(b"x" * 10), length=20)
    with pytest.raises(InvalidArgument, match="ended after"):
        store.put_stream("a/short", PseudoRandomStream(6 * MiB), length=12 * MiB, part_size=5 * MiB)
    assert not store.exists("a/short")


def test_a_large_object_streams_up_in_parts_and_down_in_chunks_with_matching_sha256(store):
    """A 65 MiB object goes up in 8 MiB parts and comes back in chunks; the sha256 agrees on both sides
    and neither direction holds the whole object in memory."""
    size, part = 65 * MiB + 123, 8 * MiB  # a ragged last part
    source = PseudoRandomStream(size, seed=7)
    tracemalloc.start()
    try:
        result = store.put_stream("big/blob.bin", source, part_size=part, content_type="application/x-test")
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()

        down, got = hashlib.sha256(), 0
        with store.iter_chunks("big/blob.bin", chunk_size=MiB) as chunks:
            assert chunks.size == size
            for chunk in chunks:
                down.update(chunk)
                got += len(chunk)
        _, download_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result.size == size == got
    assert result.sha256 == source.sha.hexdigest() == down.hexdigest()
    info = store.stat("big/blob.bin")
    assert info.size == size
    assert info.sha256 == result.sha256  # recorded after the multipart upload
    assert info.content_type == "application/x-test"
    assert upload_peak < 4 * part, f"upload held {upload_peak / MiB:.0f} MiB"
    assert download_peak < 4 * MiB, f"download held {download_peak / MiB:.0f} MiB"


def test_a_large_stream_of_known_length_is_stored_exactly(store):
    """With a length, exactly that many bytes are read and stored, in parts."""
    source = PseudoRandomStream(11 * MiB + 5, seed=3)
    result = store.put_stream("big/known", source, length=11 * MiB + 5, part_size=5 * MiB)
    assert result.size == store.stat("big/known").size == 11 * MiB + 5
    sink = io.BytesIO()
    assert store.download_to("big/known", sink) == 11 * MiB + 5
    assert hashlib.sha256(sink.getvalue()).hexdigest() == source.sha.hexdigest() == result.sha256


def test_an_abandoned_chunk_iterator_gives_back_its_connection(store):
    """Closing a half-read stream releases it; the store keeps working with a one-connection pool."""
    small_pool = ArtifactStore(store.endpoint, ACCESS_KEY, SECRET_KEY, bucket=store.bucket, pool_size=1)
    small_pool.put_bytes("a/k", b"0123456789" * 1000)
    for _ in range(3):
        with small_pool.iter_chunks("a/k", chunk_size=10) as chunks:
            assert next(chunks) == b"0123456789"
    assert small_pool.get_bytes("a/k") == b"0123456789" * 1000


def test_wrong_credentials_raise_unauthenticated(seaweedfs, store):
    """A secret the server does not know is reported as Unauthenticated, not as a missing object."""
    wrong = ArtifactStore(seaweedfs.endpoint, ACCESS_KEY, "not-the-secret", bucket=store.bucket)
    with pytest.raises(Unauthenticated):
        wrong.get_bytes("a/k")


def test_an_unreachable_endpoint_raises_unavailable_quickly():
    """Nothing listening: Unavailable within the bounded timeout and retries, naming the endpoint."""
    endpoint = f"127.0.0.1:{free_port()}"
    store = ArtifactStore(endpoint, ACCESS_KEY, SECRET_KEY, connect_timeout=0.5, read_timeout=1.0, retries=1)
    started = time.monotonic()
    for call in (store.ensure_bucket, lambda: store.get_bytes("a/k"), lambda: store.put_bytes("a/k", b"x")):
        with pytest.raises(Unavailable, match=endpoint):
            call()
    assert time.monotonic() - started < 5
