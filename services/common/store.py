"""The artifact store: objects in one S3 bucket, spoken to through the `minio` SDK.

The same code talks to MinIO, to SeaweedFS's S3 server in the embedded stack and to any other
S3-compatible server; there is no filesystem code path. Every method blocks (callers run it in a
thread) and raises domain errors only: `NotFound` for a missing key or bucket, `InvalidArgument`
for a malformed key, `Unavailable` when the server cannot be reached or keeps failing.

Large objects stream in parts of `part_size` bytes, uploaded one after another, so an upload holds
a few parts in memory whatever the object's size (about three at the peak: the SDK copies a part
while it cuts it), and a download one chunk.

Every object written here carries the hex sha256 of its content in its `sha256` user metadata, and
full reads (`get_bytes`, `download_to`) check it. S3 metadata is sent when an upload starts, before
a stream's digest is known, so `put_stream` records it after a multipart upload with a
server-side copy of the object onto itself, guarded by the upload's ETag (SeaweedFS and MinIO
only rewrite the metadata; AWS S3 copies the data inside S3). Small streams (one part) are hashed
before they are sent, files before they are streamed.

User metadata travels as HTTP headers, which carry printable ASCII only, while the values callers
store are names and links people typed (`résumé.txt`, `…/wiki/Köln`). So a value that is not
printable ASCII, or would not come back from a header as it is (empty, spaces at its ends, starting
like an encoded word), is written as one RFC 2047 encoded word, `=?UTF-8?B?<base64 of UTF-8>?=`
(AWS S3 decodes those on write and answers non-ASCII values RFC 2047-encoded; SeaweedFS and MinIO
keep them as sent), and every read (`stat`, `iter_chunks`) decodes it: callers see the text they
stored, and other S3 tools see a standard encoding.

`put_bytes(if_match=etag)` and `put_bytes(if_absent=True)` are conditional writes (S3's If-Match /
If-None-Match on PutObject, honoured by SeaweedFS, MinIO and AWS S3): the write happens only if the
object is still the one read (`get_with_etag`), or still absent, else `Conflict`. `mutate` builds
a read-change-write on them that retries on a lost race, so concurrent writers of one object (two
replicas editing a session's pairs) never overwrite each other's changes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import mimetypes
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from services.common.config import Settings
from services.common.errors import (
    Conflict,
    DocloraError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB  # the S3 minimum for every part but the last
MAX_KEY_BYTES = 1024
SHA256_META = "sha256"
_META_PREFIX = "x-amz-meta-"
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"}
_UNAUTHENTICATED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthorizationHeaderMalformed"}
_UNAVAILABLE_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "XMinioServerNotInitialized",
}
_META_KEY = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# an RFC 2047 encoded word as a whole header value: =?charset?B|Q?text?=
_ENCODED_WORD = re.compile(r"^=\?([A-Za-z0-9_-]+)\?([BbQq])\?([^?]*)\?=$")
# S3's answers to a conditional write that did not hold (412, or AWS's 409 for a concurrent one)
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
DEFAULT_MUTATE_ATTEMPTS = 8
_RESERVED_META = {
    "content-type",
    "cache-control",
    "content-encoding",
    "content-disposition",
    "content-language",
}


class ChecksumMismatch(DocloraError):
    """An object's content does not match the sha256 recorded in its metadata."""

    code = "DATA_LOSS"


@dataclass(frozen=True)
class ObjectInfo:
    """What `stat` reports; `metadata` holds the user metadata with lower-case keys, no prefix."""

    key: str
    size: int
    etag: str
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)
    last_modified: datetime | None = None

    @property
    def sha256(self) -> str | None:
        return self.metadata.get(SHA256_META)


@dataclass(frozen=True)
class PutResult:
    """What a write reports: the key, its size and sha256 as streamed, and the server's ETag."""

    key: str
    size: int
    sha256: str
    etag: str


def validate_key(key: str) -> str:
    """Return `key` if it is a safe object key, else raise InvalidArgument.

    A key is non-empty, at most 1024 bytes of UTF-8, has no leading '/', no empty, '.' or '..'
    segment (so no '//' and no trailing '/') and no control characters.
    """
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"invalid object key {key!r}: empty")
    _check_segments(key, key.split("/"), what="object key")
    return key


def _validate_prefix(prefix: str, *, allow_empty: bool) -> str:
    """A key prefix: the rules of `validate_key`, except that it may end with '/' (or be empty)."""
    if not isinstance(prefix, str):
        raise InvalidArgument(f"invalid key prefix {prefix!r}: not a string")
    if not prefix:
        if allow_empty:
            return prefix
        raise InvalidArgument("invalid key prefix '': empty (it would match every key)")
    segments = prefix.split("/")
    if prefix.endswith("/"):
        segments = segments[:-1]
    _check_segments(prefix, segments, what="key prefix")
    return prefix


def _folder_prefix(prefix: str) -> str:
    """A prefix naming a folder: validated, non-empty, ending with '/'."""
    prefix = _validate_prefix(prefix, allow_empty=False)
    return prefix if prefix.endswith("/") else prefix + "/"


def _check_segments(value: str, segments: list[str], *, what: str) -> None:
    if value.startswith("/"):
        raise InvalidArgument(f"invalid {what} {value!r}: leading '/'")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidArgument(f"invalid {what} {value[:60]!r}...: longer than {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidArgument(f"invalid {what} {value!r}: control character")
    for segment in segments:
        if segment in ("", ".", ".."):
            shown = "empty" if segment == "" else repr(segment)
            raise InvalidArgument(f"invalid {what} {value!r}: {shown} path segment")


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """User metadata as it goes on the wire, as `x-amz-meta-<key>` headers: keys lower-cased letters,
    digits and '-'; values any text, encoded where a header cannot carry them as they are."""
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        name = k.lower() if isinstance(k, str) else k
        if not isinstance(name, str) or not _META_KEY.match(name) or name in _RESERVED_META:
            raise InvalidArgument(f"invalid metadata key {k!r}: use lower-case letters, digits and '-'")
        if name.startswith("x-amz-"):
            raise InvalidArgument(f"invalid metadata key {k!r}: the x-amz- prefix is reserved")
        if not isinstance(v, str):
            raise InvalidArgument(f"invalid metadata value for {k!r}: {v!r} is not a string")
        out[name] = encode_meta_value(v, k)
    return out


def encode_meta_value(value: str, what: str = "value") -> str:
    """`value` as a header can carry it: itself when it is printable ASCII that a header keeps as it
    is, else one RFC 2047 encoded word of its UTF-8 (see the module docstring). An empty value is
    encoded too: servers drop an empty header."""
    plain = (
        value
        and value.isascii()
        and all(0x20 <= ord(c) < 0x7F for c in value)
        and value == value.strip(" ")
        and not value.startswith("=?")
    )
    if plain:
        return value
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"invalid metadata value for {what!r}: {value!r} is not Unicode text") from None
    return f"=?UTF-8?B?{base64.b64encode(raw).decode('ascii')}?="


def decode_meta_value(value: str) -> str:
    """The text an `encode_meta_value` result (or any RFC 2047 encoded word) stands for; a value
    that is not one, or cannot be decoded, as it is."""
    found = _ENCODED_WORD.match(value)
    if found is None:
        return value
    charset, kind, text = found.groups()
    try:
        if kind in "Bb":
            raw = base64.b64decode(text, validate=True)
        else:
            raw = binascii.a2b_qp(text.encode("ascii"), header=True)
        return raw.decode(charset)
    except (ValueError, LookupError):  # bad base64, unknown charset, bytes not in it
        return value


def _user_metadata(headers) -> dict[str, str]:
    return {
        k[len(_META_PREFIX) :].lower(): decode_meta_value(v)
        for k, v in headers.items()
        if k.lower().startswith(_META_PREFIX)
    }


def _http_client(
    *, connect_timeout: float, read_timeout: float, retries: int, pool_size: int
) -> urllib3.PoolManager:
    # Bounded timeouts and few retries (minio's own default is 5 minutes and 5 retries). urllib3
    # retries only its idempotent methods (GET, HEAD, PUT, DELETE), never POST, and our bodies are
    # bytes, so a retried PUT re-sends the same part.
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        maxsize=pool_size,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=retries,
            backoff_factor=0.2,
            status_forcelist=(500, 502, 503, 504),
            raise_on_status=True,
        ),
    )


class _HashingReader:
    """File-like view of `head` followed by `rest`, hashing and counting what is read through it."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self._head = head
        self._rest = rest
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            data, self._head = self._head + _read_bytes(self._rest, -1), b""
        elif self._head:
            # hand out the head and drop our reference to it: the SDK holds the part from now on
            data, self._head = self._head[:n], self._head[n:]
        else:
            data = _read_bytes(self._rest, n)
        self.sha.update(data)
        self.size += len(data)
        return data


def _read_bytes(fileobj: BinaryIO, n: int) -> bytes:
    data = fileobj.read(n) if n is not None and n >= 0 else fileobj.read()
    if data is None:
        raise InvalidArgument("put_stream needs a blocking stream (read() returned None)")
    if isinstance(data, str):
        raise InvalidArgument("put_stream needs a binary stream (read() returned str)")
    return bytes(data) if not isinstance(data, bytes) else data


def _read_up_to(fileobj: BinaryIO, n: int) -> bytes:
    """Read until `n` bytes or EOF (a stream may return fewer bytes than asked for)."""
    chunks, got = [], 0
    while got < n:
        data = _read_bytes(fileobj, n - got)
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


class ObjectStream:
    """An object's bytes in chunks, as an iterator. Its HTTP response is closed and its connection
    returned to the pool when the iterator is exhausted, on `close()`, or on leaving a `with`."""

    def __init__(self, store: ArtifactStore, key: str, response, chunk_size: int):
        self._store = store
        self._key = key
        self._response = response
        self._chunk_size = chunk_size
        self.size = int(response.headers.get("content-length", -1))
        self.metadata = _user_metadata(response.headers)

    def __iter__(self) -> ObjectStream:
        return self

    def __next__(self) -> bytes:
        if self._response is None:
            raise StopIteration
        try:
            with self._store._errors(self._key):
                chunk = self._response.read(self._chunk_size, decode_content=False)
        except BaseException:
            self.close()
            raise
        if not chunk:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        response, self._response = getattr(self, "_response", None), None
        if response is not None:
            response.close()
            response.release_conn()

    def __enter__(self) -> ObjectStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class ArtifactStore:
    """Objects in one bucket of an S3-compatible server. Thread-safe: one instance per process."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = False,
        region: str = "us-east-1",
        bucket: str = "doclora",
        part_size: int = DEFAULT_PART_SIZE,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retries: int = 3,
        pool_size: int = 32,  # asyncio.to_thread runs up to 32 calls at once
    ):
        if part_size < MIN_PART_SIZE:
            raise InvalidArgument(f"part_size must be at least {MIN_PART_SIZE} bytes, got {part_size}")
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.part_size = part_size
        self._http = _http_client(
            connect_timeout=connect_timeout, read_timeout=read_timeout, retries=retries, pool_size=pool_size
        )
        # a fixed region: the SDK would otherwise ask the server for the bucket's location first
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=self._http,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> ArtifactStore:
        return cls(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            region=settings.s3_region,
            bucket=settings.s3_bucket,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"ArtifactStore(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    def close(self) -> None:
        """Close pooled connections (the store stays usable; new ones open on demand)."""
        self._http.clear()

    # -- errors ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """Translate SDK and transport errors into domain errors naming the bucket and key."""
        where = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        try:
            yield
        except S3Error as err:
            code = err.code or ""
            if code == "NoSuchBucket":
                raise NotFound(f"bucket {self.bucket!r} does not exist at {self.endpoint}") from err
            if code in _NOT_FOUND_CODES:
                raise NotFound(f"object {key!r} not found in bucket {self.bucket!r}") from err
            if code in _UNAUTHENTICATED_CODES:
                raise Unauthenticated(
                    f"object store at {self.endpoint} rejected our credentials ({code})"
                ) from err
            if code == "AccessDenied":
                raise PermissionDenied(f"access denied to {where}") from err
            if code == "MetadataTooLarge":  # AWS S3 takes 2 KB of user metadata per object
                raise InvalidArgument(f"the metadata of {where} is too large: {err.message}") from err
            if code in _UNAVAILABLE_CODES:
                raise Unavailable(
                    f"object store at {self.endpoint} failed on {where}: {code} {err.message}"
                ) from err
            raise DocloraError(f"object store error on {where}: {code} {err.message}") from err
        except (ServerError, InvalidResponseError) as err:
            raise Unavailable(f"object store at {self.endpoint} failed on {where}: {err}") from err
        except MinioException as err:
            raise DocloraError(f"object store error on {where}: {err}") from err
        except urllib3.exceptions.HTTPError as err:
            reason = getattr(err, "reason", None) or err
            raise Unavailable(f"object store at {self.endpoint} unreachable ({where}): {reason}") from err

    # -- bucket ---------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (safe to race with another process doing the same)."""
        with self._errors():
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as err:
                if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    # -- writes ---------------------------------------------------------------------------------

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
        if_match: str | None = None,
        if_absent: bool = False,
    ) -> PutResult:
        """Store `data` under `key` (one request up to `part_size`, multipart above).

        `if_match=etag` writes only over the object whose ETag that is (as `get_with_etag` or a
        `PutResult` gave it), `if_absent=True` only where there is no object: otherwise `Conflict`
        and nothing is written. A conditional write goes in one request whatever its size.
        """
        validate_key(key)
        if if_match is not None and if_absent:
            raise InvalidArgument("give if_match or if_absent, not both")
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        meta = self._with_digest(metadata, digest)
        if if_match is not None or if_absent:
            return self._put_if(key, data, content_type, meta, digest, if_match)
        with self._errors(key):
            result = self._client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type=content_type,
                metadata=meta,
                part_size=self.part_size,
                num_parallel_uploads=1,
            )
        return PutResult(key, len(data), digest, result.etag)

    def _put_if(
        self, key: str, data: bytes, content_type: str, meta: dict[str, str], digest: str, etag: str | None
    ) -> PutResult:
        # The SDK's put_object sends no request headers of ours (it would make If-Match user
        # metadata), so this is its single PutObject request with the headers built here; the SDK
        # is pinned in pyproject.toml.
        headers = {"Content-Type": content_type, **{_META_PREFIX + k: v for k, v in meta.items()}}
        if etag is None:
            headers["If-None-Match"] = "*"
        else:
            headers["If-Match"] = f'"{etag.strip(chr(34))}"'
        with self._errors(key):
            try:
                result = self._client._put_object(self.bucket, key, data, headers=headers)
            except S3Error as err:
                # AWS S3 answers If-Match on a missing object with NoSuchKey: it changed too (went)
                if err.code in _CONFLICT_CODES or (etag is not None and err.code in _NOT_FOUND_CODES):
                    held = "was created" if etag is None else f"is no longer the version {etag} read"
                    raise Conflict(
                        f"object {key!r} in bucket {self.bucket!r} changed meanwhile (it {held}); "
                        "read it again and retry"
                    ) from err
                raise
        return PutResult(key, len(data), digest, result.etag)

    def mutate(
        self,
        key: str,
        change: Callable[[bytes | None], bytes],
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
        attempts: int = DEFAULT_MUTATE_ATTEMPTS,
    ) -> PutResult:
        """Read-change-write `key` by compare-and-swap: `change(current bytes, or None where there is
        no object)` gives the new bytes, written only if the object is still the one read; when
        another writer got in between, it is read again and `change` applied again (so `change`
        must be a pure function of what it is given), after a short random pause, up to `attempts`
        times, then `Conflict`. Exceptions of `change` go through as they are, nothing written.

        A write whose answer was lost and so was sent again (urllib3 retries PUT) finds its own
        bytes there on the next read: an ETag equal to their MD5 (a one-request PutObject's ETag on
        S3, MinIO and SeaweedFS) counts as done rather than applying the change twice.
        """
        if attempts < 1:
            raise InvalidArgument(f"attempts must be at least 1, got {attempts}")
        sent_md5 = None
        for attempt in range(attempts):
            try:
                current, etag = self.get_with_etag(key)
            except NotFound:
                current, etag = None, None
            if sent_md5 is not None and etag == sent_md5 and current is not None:
                return PutResult(key, len(current), hashlib.sha256(current).hexdigest(), etag)
            new = bytes(change(current))
            try:
                return self.put_bytes(
                    key,
                    new,
                    content_type=content_type,
                    metadata=metadata,
                    if_match=etag,
                    if_absent=etag is None,
                )
            except Conflict:
                sent_md5 = hashlib.md5(new, usedforsecurity=False).hexdigest()
                if attempt + 1 < attempts:
                    time.sleep(random.uniform(0.0, 0.02 * 2 ** min(attempt, 5)))
        raise Conflict(
            f"object {key!r} in bucket {self.bucket!r} changed meanwhile {attempts} times in a row; retry"
        )

    def put_stream(
        self,
        key: str,
        fileobj: BinaryIO,
        length: int = -1,
        *,
        part_size: int | None = None,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> PutResult:
        """Store what `fileobj.read()` yields until EOF (or exactly `length` bytes when given).

        Up to one part it is read, hashed and sent in one request; beyond that it goes up in parts of
        `part_size`, one at a time, and the sha256 computed on the way is recorded afterwards (see
        the module docstring). A failed multipart upload is aborted.
        """
        validate_key(key)
        part_size = part_size or self.part_size
        if part_size < MIN_PART_SIZE:
            raise InvalidArgument(f"part_size must be at least {MIN_PART_SIZE} bytes, got {part_size}")
        if not callable(getattr(fileobj, "read", None)):
            raise InvalidArgument("put_stream needs a file-like object with read()")
        meta = _check_metadata(metadata)

        want = part_size + 1 if length < 0 else min(length, part_size + 1)
        head = _read_up_to(fileobj, want)
        if length >= 0 and len(head) < want:
            raise InvalidArgument(f"stream for {key!r} ended after {len(head)} bytes; length says {length}")
        if len(head) <= part_size:  # the whole object is in hand
            return self.put_bytes(key, head, content_type=content_type, metadata=metadata)

        reader = _HashingReader(head, fileobj)
        del head
        claimed = meta.pop(SHA256_META, None)  # checked once the whole stream has gone through
        try:
            with self._errors(key):
                result = self._client.put_object(
                    self.bucket,
                    key,
                    reader,
                    length,
                    content_type=content_type,
                    metadata=meta,
                    part_size=part_size,
                    num_parallel_uploads=1,  # parallel parts would hold more parts in memory
                )
        except OSError as err:  # the SDK's "stream having not enough data"
            if length >= 0 and reader.size < length:
                raise InvalidArgument(
                    f"stream for {key!r} ended after {reader.size} bytes; length says {length}"
                ) from err
            raise
        digest = reader.sha.hexdigest()
        if claimed is not None and claimed.lower() != digest:
            self.delete(key)
            raise InvalidArgument(
                f"metadata sha256 {claimed!r} does not match the streamed content's {digest!r}"
            )
        etag = self._record_digest(key, result.etag, content_type, meta, digest)
        return PutResult(key, reader.size, digest, etag)

    def _record_digest(
        self, key: str, etag: str, content_type: str, meta: dict[str, str], digest: str
    ) -> str:
        # a copy onto itself replaces the metadata; the ETag guard makes it a no-op (412) if another
        # writer replaced the object in between
        with self._errors(key):
            try:
                copied = self._client.copy_object(
                    self.bucket,
                    key,
                    CopySource(self.bucket, key, match_etag=etag),
                    metadata={**meta, SHA256_META: digest, "Content-Type": content_type},
                    metadata_directive=REPLACE,
                )
            except S3Error as err:
                if err.code == "PreconditionFailed":
                    return etag
                raise
        return copied.etag or etag

    def put_file(
        self,
        key: str,
        path: str | os.PathLike,
        *,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> PutResult:
        """Store a local file: hashed in a first pass, so its sha256 goes up with it, then streamed in
        parts. The content type is guessed from the name unless given."""
        validate_key(key)
        path = Path(path)
        content_type = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(MiB), b""):
                sha.update(block)
            size = f.tell()
            f.seek(0)
            digest = sha.hexdigest()
            meta = self._with_digest(metadata, digest)
            reader = _HashingReader(b"", f)
            with self._errors(key):
                result = self._client.put_object(
                    self.bucket,
                    key,
                    reader,
                    size,
                    content_type=content_type,
                    metadata=meta,
                    part_size=self.part_size,
                    num_parallel_uploads=1,
                )
        if reader.sha.hexdigest() != digest:  # the file changed between the two passes
            self.delete(key)
            raise FailedPrecondition(f"{path} changed while it was being stored as {key!r}")
        return PutResult(key, size, digest, result.etag)

    def put_json(self, key: str, obj: Any, *, metadata: dict[str, str] | None = None) -> PutResult:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return self.put_bytes(key, data, content_type="application/json", metadata=metadata)

    @staticmethod
    def _with_digest(metadata: dict[str, str] | None, digest: str) -> dict[str, str]:
        meta = _check_metadata(metadata)
        given = meta.get(SHA256_META)
        if given is not None and given.lower() != digest:
            raise InvalidArgument(f"metadata sha256 {given!r} does not match the content's sha256 {digest!r}")
        meta[SHA256_META] = digest
        return meta

    # -- reads ----------------------------------------------------------------------------------

    def _get(self, key: str):
        validate_key(key)
        with self._errors(key):
            return self._client.get_object(self.bucket, key)

    def get_bytes(self, key: str) -> bytes:
        """The whole object, checked against its recorded sha256."""
        return self.get_with_etag(key)[0]

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """The whole object, checked against its recorded sha256, and its ETag (no quotes): the
        version to name in `put_bytes(if_match=...)`."""
        response = self._get(key)
        try:
            with self._errors(key):
                data = response.read(decode_content=False)
            self._check_digest(
                key, _user_metadata(response.headers).get(SHA256_META), hashlib.sha256(data).hexdigest()
            )
            return data, (response.headers.get("etag") or "").strip('"')
        finally:
            response.close()
            response.release_conn()

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def iter_chunks(self, key: str, chunk_size: int = MiB) -> ObjectStream:
        """The object as an iterator of chunks of up to `chunk_size` bytes.

        The request is made here, so a missing key raises NotFound at once rather than on the first
        `next()`. Exhaust it, `close()` it or use it in a `with` to give back its connection.
        """
        if chunk_size <= 0:
            raise InvalidArgument(f"chunk_size must be positive, got {chunk_size}")
        return ObjectStream(self, key, self._get(key), chunk_size)

    def download_to(self, key: str, dest: str | os.PathLike | BinaryIO, *, chunk_size: int = MiB) -> int:
        """Write the object to a path (atomically: a temporary file, then renamed) or into a
        writable binary file object; returns the number of bytes, checked against the sha256."""
        with self.iter_chunks(key, chunk_size) as chunks:
            if not isinstance(dest, (str, os.PathLike)):
                return self._drain(key, chunks, dest)
            path = Path(dest)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
            try:
                with open(tmp, "wb") as f:
                    size = self._drain(key, chunks, f)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return size

    def _drain(self, key: str, chunks: ObjectStream, fileobj: BinaryIO) -> int:
        sha, size = hashlib.sha256(), 0
        for chunk in chunks:
            fileobj.write(chunk)
            sha.update(chunk)
            size += len(chunk)
        self._check_digest(key, chunks.metadata.get(SHA256_META), sha.hexdigest())
        return size

    def _check_digest(self, key: str, recorded: str | None, digest: str) -> None:
        if recorded is not None and recorded.lower() != digest:
            raise ChecksumMismatch(
                f"object {key!r} in bucket {self.bucket!r} read as sha256 {digest}, but {recorded} was recorded"
            )

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy within the bucket (metadata, sha256 included, goes along)."""
        validate_key(src)
        validate_key(dst)
        with self._errors(src):
            self._client.copy_object(self.bucket, dst, CopySource(self.bucket, src))

    def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        with self._errors(key):
            obj = self._client.stat_object(self.bucket, key)
        return ObjectInfo(
            key=key,
            size=int(obj.size or 0),
            etag=obj.etag or "",
            content_type=obj.content_type or "application/octet-stream",
            metadata=_user_metadata(obj.metadata or {}),
            last_modified=obj.last_modified,
        )

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def iter_keys(self, prefix: str = "", *, recursive: bool = True) -> Iterator[str]:
        """Keys starting with `prefix` (a plain S3 prefix: "a/b" also matches "a/bc"), in key order.
        Not recursive: the keys directly under it, and each deeper "folder" once, ending with '/'."""
        _validate_prefix(prefix, allow_empty=True)  # here, not on the first next()
        return self._iter_keys(prefix, recursive)

    def _iter_keys(self, prefix: str, recursive: bool) -> Iterator[str]:
        with self._errors(prefix or None):
            for obj in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=recursive):
                yield obj.object_name

    def iter_modified(self, prefix: str = "") -> Iterator[tuple[str, float | None]]:
        """(key, last-modified time as a POSIX timestamp or None) of every object under `prefix`,
        from the listing itself (no request per object)."""
        _validate_prefix(prefix, allow_empty=True)
        return self._iter_modified(prefix)

    def _iter_modified(self, prefix: str) -> Iterator[tuple[str, float | None]]:
        with self._errors(prefix or None):
            for obj in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True):
                yield obj.object_name, obj.last_modified.timestamp() if obj.last_modified else None

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[str]:
        """`iter_keys` as a list."""
        return [*self.iter_keys(prefix, recursive=recursive)]

    # -- deletes --------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error (S3 semantics: idempotent)."""
        validate_key(key)
        with self._errors(key):
            self._client.remove_object(self.bucket, key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder `prefix` ("a/b" means "a/b/", never "a/bc");
        returns how many there were."""
        prefix = _folder_prefix(prefix)
        keys = self.list(prefix)
        self._delete_many(keys)
        return len(keys)

    def _delete_many(self, keys: Iterable[str]) -> None:
        with self._errors():
            errors = [*self._client.remove_objects(self.bucket, (DeleteObject(k) for k in keys))]
        errors = [e for e in errors if e.code not in _NOT_FOUND_CODES]
        if errors:
            first = errors[0]
            raise Unavailable(
                f"could not delete {len(errors)} objects, e.g. {first.name!r}: {first.code} {first.message}"
            )

    # -- folders --------------------------------------------------------------------------------

    def upload_dir(self, prefix: str, folder: str | os.PathLike, *, last: Iterable[str] = ()) -> list[str]:
        """Upload every file under `folder` to `prefix/<relative path>`; returns the keys.

        Files go up in order of their relative path, except those named in `last` (relative paths),
        which go at the end: a reader that waits for, say, `adapter_config.json` then finds the rest.
        Symbolic links to files are followed; empty folders are not recorded.
        """
        prefix = _folder_prefix(prefix)
        root = Path(folder)
        if not root.is_dir():
            raise InvalidArgument(f"not a folder: {root}")
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        tail = [rel for rel in last if rel in files]
        order = [rel for rel in files if rel not in tail] + tail
        keys = []
        for rel in order:
            key = validate_key(prefix + rel)
            self.put_file(key, root / rel)
            keys.append(key)
        return keys

    def download_dir(self, prefix: str, folder: str | os.PathLike) -> list[Path]:
        """Download every object under `prefix` into `folder/<relative path>`; returns the files.

        An empty prefix gives an empty folder (no error): the caller decides what a complete folder
        holds. Existing files of the same names are replaced.
        """
        prefix = _folder_prefix(prefix)
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        written = []
        for key in self.list(prefix):
            rel = key[len(prefix) :]
            if not rel or rel.endswith("/"):
                continue  # a "folder" marker some S3 clients create
            validate_key(rel)  # no '..' or absolute path can escape `folder`
            path = root.joinpath(*rel.split("/"))
            self.download_to(key, path)
            written.append(path)
        return written
