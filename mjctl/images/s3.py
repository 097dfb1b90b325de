"""The S3 result store: finished images as objects in a bucket that every mjctl host shares.

Objects are ``<prefix>/<h[:2]>/<h>`` with h the task row's hash (mjctl.images.store.row_key) and the image's
type as the object's Content-Type, so finding and serving an image is one GET. A put is atomic in S3: an
object is there whole or not at all. Works with AWS and with S3-compatible services (MinIO, Ceph, R2, …)
through ``[images] s3_endpoint_url`` (addressed path-style there).

Credentials come from botocore's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE, ~/.aws/credentials and config, the instance's or container's role) unless
``[images] s3_access_key_id`` and ``s3_secret_access_key`` are set.

Every call is bounded: ``s3_connect_timeout`` to connect, ``s3_read_timeout`` for each read, at most
``s3_attempts`` attempts. A call that fails for the store's sake (unreachable, too slow, no such bucket,
refused credentials, a 5xx) raises StoreUnavailable, and for the next DOWN_SECONDS every call fails at
once with the same reason instead of waiting on the store again: a store that is down costs each request
nothing, and is tried again a few seconds later.

boto3 is an optional dependency (``pip install 'mjctl[s3]'``), imported on the first call: it costs about
0.25 s and 40 MB per process, which only processes using an S3 store pay.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mjctl.errors import first_line
from mjctl.images.common import EXTENSIONS, STALE_TEMP_SECONDS, ImageTruncated
from mjctl.images.store import (
    ByteRange,
    RangeNotSatisfiable,
    StoredBody,
    StoredImage,
    StoreUnavailable,
    parse_store_url,
    row_key,
)

if TYPE_CHECKING:
    from mjctl.config import Settings
    from mjctl.images.cache import ImageCache
    from mjctl.images.urls import ImageSource

log = logging.getLogger("mjctl.images")

DOWN_SECONDS = 5.0
#: Bytes read from the store per chunk passed on: fewer, larger chunks cost the server less per byte.
STREAM_CHUNK = 1024 * 1024
POOL_CONNECTIONS = 64  # kept-alive connections to the store per process (server threads share them)
PRESIGNED_READ_SECONDS = 300  # the lifetime of the link a read is made on (it is used at once)
_OUR_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{40}$")
_MISSING = {"NoSuchKey", "404", "NotFound"}
_REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken",
            "ExpiredToken", "AuthorizationHeaderMalformed"}
_NO_CREDENTIALS = ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                   "~/.aws/credentials")


class S3Store:
    """Images in ``s3://bucket/prefix``; one client per store, shared by threads."""

    kind = "s3"

    def __init__(self, bucket: str, prefix: str, spool: ImageCache, *, endpoint_url: str = "", region: str = "",
                 access_key_id: str = "", secret_access_key: str = "", connect_timeout: float = 3.0,
                 read_timeout: float = 10.0, attempts: int = 2):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.spool = spool  # the local folder downloads are received in before they are uploaded
        self.endpoint_url = endpoint_url
        self.region = region
        self._credentials = (access_key_id, secret_access_key)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.attempts = max(1, attempts)
        self.down_seconds = DOWN_SECONDS
        self._client: Any = None
        self._pool: Any = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down_reason = ""

    @classmethod
    def from_settings(cls, settings: Settings, spool: ImageCache, *, url: str | None = None) -> S3Store:
        """The store of ``[images] store`` (or of url, another bucket reached with the same settings)."""
        images = settings.images
        bucket, prefix, problem = parse_store_url(url or images.store)
        if problem:
            raise StoreUnavailable(f"[images] store {problem}")
        return cls(bucket, prefix, spool, endpoint_url=images.s3_endpoint_url, region=images.s3_region,
                   access_key_id=images.s3_access_key_id, secret_access_key=images.s3_secret_access_key,
                   connect_timeout=images.s3_connect_timeout, read_timeout=images.s3_read_timeout,
                   attempts=images.s3_attempts)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    # -- keys ------------------------------------------------------------------------------------------

    def key_for(self, source: ImageSource) -> str:
        return self.object_key(row_key(source))

    def object_key(self, name: str) -> str:
        """The object key of an image named name (a row hash): ``<prefix>/<name[:2]>/<name>``."""
        return f"{self.prefix}/{name[:2]}/{name}" if self.prefix else f"{name[:2]}/{name}"

    def _name_of(self, key: str) -> str | None:
        """The row hash of one of our object keys; None for anything else under the prefix."""
        rest = key[len(self.prefix) + 1:] if self.prefix else key
        if self.prefix and not key.startswith(self.prefix + "/"):
            return None
        return rest[3:] if _OUR_KEY.match(rest) else None

    @staticmethod
    def accepts(content_type: str) -> bool:
        return content_type in EXTENSIONS

    def temp_file(self):
        return self.spool.temp_file()

    # -- the client and its faults -------------------------------------------------------------------

    def client(self) -> Any:
        """The boto3 client, built on first use (imports boto3). Raises StoreUnavailable when boto3 is
        missing."""
        if self._client is not None:
            return self._client
        with self._lock:
            if self._client is None:
                self._client = self._build_client()
        return self._client

    def _build_client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreUnavailable("an S3 store needs boto3: pip install 'mjctl[s3]'") from None
        key_id, secret = self._credentials
        session = boto3.session.Session(aws_access_key_id=key_id or None, aws_secret_access_key=secret or None,
                                        region_name=self.region or None)
        config = Config(
            connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
            retries={"max_attempts": self.attempts, "mode": "standard"},
            max_pool_connections=POOL_CONNECTIONS, signature_version="s3v4",  # presigned links too
            # S3-compatible services (MinIO, Ceph, R2) are reached by path, AWS by virtual host.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            # Checksums only where S3 requires them: several S3-compatible services refuse the others.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        try:
            return session.client("s3", endpoint_url=self.endpoint_url or None,
                                  region_name=session.region_name or "us-east-1", config=config)
        except Exception as exc:  # noqa: BLE001 - botocore refuses a setting with errors of many kinds
            raise StoreUnavailable(f"cannot set up the S3 client for {self.location}: {exc}") from None

    def _ensure_up(self) -> None:
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(self._down_reason)

    def _down(self, reason: str) -> StoreUnavailable:
        """Remember the store as down for down_seconds; the error to raise."""
        self._down_reason = f"the image store {self.location} is unavailable: {reason}"
        self._down_until = time.monotonic() + self.down_seconds
        return StoreUnavailable(self._down_reason)

    def _fault(self, exc: Exception) -> StoreUnavailable | None:
        """What a botocore exception means: None for a missing object, else the StoreUnavailable to raise
        (the store is then taken as down for a few seconds)."""
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        where = self.endpoint_url or "AWS"
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _MISSING:
                return None
            if code == "NoSuchBucket":
                return self._down(f"the bucket {self.bucket} does not exist")
            if code in _REFUSED:
                return self._down(f"access refused ({code}): check the credentials and the bucket's policy")
            return self._down(f"the store answered {code or 'HTTP'} {status}".strip())
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            return self._down(f"cannot connect to {where}")
        if isinstance(exc, ReadTimeoutError):
            return self._down(f"no answer from {where} within {self.read_timeout:g} s")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return self._down(_NO_CREDENTIALS)
        lines = str(exc).strip().splitlines()
        return self._down(f"{type(exc).__name__}: {lines[0][:200] if lines else ''}".rstrip(": "))

    def _call(self, operation: str, **params: Any) -> Any:
        """One client call, failing at once while the store is down; None when the object is missing."""
        self._ensure_up()
        client = self.client()
        try:
            return getattr(client, operation)(Bucket=self.bucket, **params)
        except Exception as exc:  # noqa: BLE001 - sorted by _fault: botocore's errors, the transport's, a broken client
            if _is_invalid_range(exc):
                raise RangeNotSatisfiable(-1) from None
            fault = self._fault(exc)
            if fault is None:
                return None
            raise fault from None

    # -- the interface ------------------------------------------------------------------------------

    def find(self, source: ImageSource | str) -> StoredImage | None:
        """The stored image of source (a HEAD); None when there is none. A bare upstream id (the local
        folder's legacy names) is never in a bucket."""
        if isinstance(source, str):
            return None
        key = self.key_for(source)
        head = self._call("head_object", Key=key)
        return _stored(key, head) if head is not None else None

    def open_image(self, source: ImageSource, byte_range: ByteRange | None = None) -> StoredBody | None:
        """Source's image (or one range of it) as a stream from one GET; None when the bucket has none.

        The GET goes to a presigned link (signed by boto3) over a plain urllib3 pool: serving is the hot
        path, and botocore's per-call machinery costs more CPU than the bytes of a 6 MB image. Any answer but
        the object (missing, refused, a 5xx, a bad range) is asked again through the client's get_object,
        so every fault means what it means for every other call."""
        key = self.key_for(source)
        params: dict[str, Any] = {"Key": key}
        if byte_range is not None:
            params["Range"] = byte_range.header()
        response = self._presigned_get(key, {"Range": params["Range"]} if byte_range is not None else {})
        if response is not None:
            return self._body(response.headers, response, lambda: response.read(STREAM_CHUNK, decode_content=False),
                              response.release_conn)
        try:
            got = self._call("get_object", **params)
        except RangeNotSatisfiable:
            head = self._call("head_object", Key=key)
            if head is None:
                return None
            raise RangeNotSatisfiable(int(head.get("ContentLength", 0))) from None
        if got is None:
            return None
        body = got["Body"]
        headers = {"Content-Type": got.get("ContentType", ""), "Content-Length": got.get("ContentLength", 0),
                   "Content-Range": got.get("ContentRange", "")}
        return self._body(headers, body, lambda: body.read(STREAM_CHUNK), body.close)

    def _body(self, headers: Any, body: Any, read: Callable[[], bytes], release: Callable[[], None]
              ) -> StoredBody | None:
        """The StoredBody of an answer with these headers; None (the answer closed) when it is not an object
        mjctl wrote, which is then asked of the upstream instead."""
        content_type = str(headers.get("Content-Type", "")).split(";")[0].strip().lower()
        if not self.accepts(content_type):
            body.close()
            return None
        length = int(headers.get("Content-Length") or 0)
        start, end, size = 0, length - 1, length
        match = re.match(r"bytes (\d+)-(\d+)/(\d+)", str(headers.get("Content-Range") or ""))
        if match:
            start, end, size = (int(g) for g in match.groups())
        return StoredBody(content_type, size, start, end, self._chunks(read, end + 1 - start, release, body.close),
                          body.close)

    def _presigned_get(self, key: str, headers: dict[str, str]) -> Any:
        """A GET of key on a presigned link: the urllib3 response of a 200 or 206 (body unread), or None for
        any other answer (for the client to ask again). A connection that cannot be made or a store that
        stays silent raises StoreUnavailable, as _call does."""
        import urllib3

        self._ensure_up()
        try:
            link = self.client().generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=PRESIGNED_READ_SECONDS)
        except Exception:  # noqa: BLE001 - no credentials, a broken client: _call says which
            return None
        where = self.endpoint_url or "AWS"
        fault = ""
        for _ in range(self.attempts):
            try:
                response = self._reader().request("GET", link, headers=headers, preload_content=False,
                                                  redirect=False, retries=False)
            except (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.NewConnectionError):
                fault = f"cannot connect to {where}"
            except urllib3.exceptions.ReadTimeoutError:
                fault = f"no answer from {where} within {self.read_timeout:g} s"
            except Exception as exc:  # noqa: BLE001 - urllib3's transport errors
                fault = f"{type(exc).__name__}: {first_line(exc)[:200]}"
            else:
                if response.status in (200, 206):
                    return response
                response.close()  # an error's body is not worth keeping the connection for
                return None
        raise self._down(fault)

    def _reader(self) -> Any:
        """The urllib3 pool for reads on presigned links, with the store's timeouts, the CA bundle botocore
        would use (AWS_CA_BUNDLE, else certifi's) and the proxy the environment names for the endpoint."""
        if self._pool is not None:
            return self._pool
        with self._lock:
            if self._pool is None:
                self._pool = _pool_for(self.endpoint_url or "https://s3.amazonaws.com",
                                       self.connect_timeout, self.read_timeout)
        return self._pool

    def _chunks(self, read: Callable[[], bytes], length: int, release: Callable[[], None],
                close: Callable[[], None]) -> Iterator[bytes]:
        """The body's chunks; a failure part-way (the store breaks off or stalls) is ImageTruncated. A body
        read to its end releases its connection for the next GET; any other end closes it."""
        received = 0
        try:
            while chunk := read():
                received += len(chunk)
                yield chunk
        except Exception as exc:  # noqa: BLE001 - botocore's and urllib3's read errors share no base class
            raise ImageTruncated(f"The image store broke off after {received} of {length} bytes: "
                                 f"{type(exc).__name__}.") from None
        finally:
            (release if received == length else close)()
        if received != length:
            raise ImageTruncated(f"The image store sent {received} of {length} bytes.")

    def put_file(self, path: Path, source: ImageSource, content_type: str) -> Path | None:
        """Upload a complete file as source's image (one PUT: the object appears whole or not at all).
        Returns None (the file stays where it is); raises StoreUnavailable."""
        self.put_named(path, row_key(source), content_type)
        return None

    def put_named(self, path: Path, name: str, content_type: str) -> None:
        """Upload a file as the image named name (a row hash); raises StoreUnavailable."""
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {path.name}: {exc.strerror or exc}") from None
        with fh:
            size = path.stat().st_size
            self._call("put_object", Key=self.object_key(name), Body=fh, ContentLength=size,
                       ContentType=content_type)

    def presign(self, source: ImageSource, seconds: int) -> str | None:
        """A presigned GET link to source's image, valid for seconds; None when the bucket does not hold it
        (one HEAD: a link to a missing object would answer the client 404 from the store)."""
        if self.find(source) is None:
            return None
        return self.client().generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key_for(source)}, ExpiresIn=int(seconds))

    # -- listing: stats, prune, migrate --------------------------------------------------------------

    def objects(self, folder: str | None = None) -> Iterator[dict]:
        """Our objects (as ListObjectsV2 entries), everywhere under the prefix or in one two-hex folder."""
        prefix = self.object_key(folder + "0" * 38)[:-40] if folder is not None else (
            f"{self.prefix}/" if self.prefix else "")
        self._ensure_up()
        try:
            for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    if self._name_of(item["Key"]) is not None:
                        yield item
        except StoreUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted by _fault, as in _call
            raise (self._fault(exc) or StoreUnavailable(f"the bucket {self.bucket} does not exist")) from None

    def names_in(self, folder: str) -> set[str]:
        """The row hashes the bucket holds in one folder (for a resumable migration)."""
        return {name for item in self.objects(folder) if (name := self._name_of(item["Key"]))}

    def stats(self) -> dict:
        """``{"store", "files", "bytes", "oldest", "newest", "temp_files", "temp_bytes"}``: the bucket's images
        and the unfinished downloads in the local spool folder."""
        out: dict[str, Any] = {"store": self.location, "files": 0, "bytes": 0, "oldest": 0, "newest": 0}
        stamps = []
        for item in self.objects():
            out["files"] += 1
            out["bytes"] += int(item.get("Size", 0))
            stamps.append(item["LastModified"].timestamp())
        if stamps:
            out["oldest"], out["newest"] = int(min(stamps)), int(max(stamps))
        spool = self.spool.stats()
        return {**out, "temp_files": spool["temp_files"], "temp_bytes": spool["temp_bytes"]}

    def prune(self, older_than_seconds: float, *, now: float | None = None) -> dict:
        """Delete images stored more than older_than_seconds ago (in batches of 1000), and stale temp files
        in the local spool folder. Returns the counts of ImageCache.prune."""
        now = time.time() if now is None else now
        result = {"removed": 0, "removed_bytes": 0, "kept": 0, "kept_bytes": 0, "temp_removed": 0}
        doomed: list[dict] = []
        for item in self.objects():
            size = int(item.get("Size", 0))
            if now - item["LastModified"].timestamp() > older_than_seconds:
                doomed.append(item)
                if len(doomed) == 1000:
                    self._delete(doomed, result)
                    doomed = []
            else:
                result["kept"] += 1
                result["kept_bytes"] += size
        if doomed:
            self._delete(doomed, result)
        result["temp_removed"] = self.spool.prune(max(older_than_seconds, STALE_TEMP_SECONDS), now=now,
                                                  temp_only=True)["temp_removed"]
        return result

    def _delete(self, items: list[dict], result: dict) -> None:
        answer = self._call("delete_objects", Delete={"Objects": [{"Key": i["Key"]} for i in items], "Quiet": True})
        failed = {e.get("Key") for e in (answer or {}).get("Errors", [])}
        for item in items:
            if item["Key"] not in failed:
                result["removed"] += 1
                result["removed_bytes"] += int(item.get("Size", 0))
        if failed:
            log.warning("the image store kept %d object(s) it was asked to delete", len(failed))


def _stored(key: str, head: dict) -> StoredImage | None:
    content_type = str(head.get("ContentType", "")).split(";")[0].strip().lower()
    if content_type not in EXTENSIONS:
        return None
    modified = head.get("LastModified")
    return StoredImage(key, content_type, int(head.get("ContentLength", 0)),
                       modified.timestamp() if modified is not None else 0.0)


def _pool_for(endpoint: str, connect_timeout: float, read_timeout: float) -> Any:
    import os
    import urllib.parse
    import urllib.request

    import urllib3
    from botocore.httpsession import get_cert_path

    options: dict[str, Any] = {"maxsize": POOL_CONNECTIONS, "block": False, "retries": False,
                               "timeout": urllib3.Timeout(connect=connect_timeout, read=read_timeout)}
    bundle = os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
    if isinstance(bundle, str):
        options["ca_certs"] = bundle
    parsed = urllib.parse.urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


def _is_invalid_range(exc: Exception) -> bool:
    response = getattr(exc, "response", None)
    return isinstance(response, dict) and response.get("Error", {}).get("Code") == "InvalidRange"
