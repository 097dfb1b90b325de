"""Streaming a task's image from its upstream (or the cache), with size, type and truncation checks.

How long an upstream may take (``[images] timeout`` = T): connecting and the answer's headers must come
within T, and after that the upstream must keep up a minimum rate: the time spent waiting on it may never
exceed T + bytes received / ``MIN_RATE``. Only time spent waiting on the upstream counts — a slow client
reading a big image holds the generator between chunks, and that is not the upstream's time — so a large
image on a steady link is never cut, while a trickle (a byte every few seconds) is cut about T seconds in.
Every socket read is capped at what is left of that allowance (``mjctl.upstream.bounded_by``), so a
stalled upstream is cut at the allowance, not a read timeout later. Prefetching runs the same code.

Finished images are read from the result store (``[images] store``: the local folder or an S3 bucket,
mjctl.images.store) and written there as they pass. Faults of the store (a folder unusable, full or
read-only; a bucket unreachable, missing or refusing the credentials) never fail a response the upstream
can give: the image is passed on without being kept, with one log line. Only when the upstream cannot give
it either is it a 502, whose message names both.

Where an image may come from is the upstream's choice, so it is checked: only the task's channel's own
origin, a host of ``[images] allow_hosts``, or public addresses (``mjctl.upstream.FetchPolicy``, enforced
where the socket is opened). Redirects are followed here, hop by hop, each hop meeting the same check. A
refusal is one log line naming the channel and the user gets the same 502 as for an unreachable upstream:
no detail about the target, so image links cannot be used to probe mjctl's own network.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import httpx

from mjctl import __version__, metrics
from mjctl.errors import first_line
from mjctl.images.cache import open_file
from mjctl.images.common import IMMUTABLE, REVALIDATE, ImageTooLarge, ImageTruncated, ImageUnavailable
from mjctl.images.store import ByteRange, ResultStore, StoredBody, StoredImage, StoreUnavailable, result_store
from mjctl.images.urls import ImageSource
from mjctl.textsafe import visible
from mjctl.upstream import (
    Deadline,
    DeadlineExceeded,
    FetchPolicy,
    FetchRefused,
    bounded_by,
    deadline_transport,
    guarded_by,
    shared_ssl_context,
)

if TYPE_CHECKING:
    from mjctl.config import Settings

log = logging.getLogger("mjctl.images")

MIN_RATE = 64 * 1024  # bytes per second of upstream time an image must average once its headers are in
MAX_REDIRECTS = 5


class _Allowance:
    """The upstream time an image download may still spend: T + received / MIN_RATE - spent."""

    __slots__ = ("timeout", "spent", "received")

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.spent = 0.0
        self.received = 0

    def left(self) -> float:
        return self.timeout + self.received / MIN_RATE - self.spent

    def paced(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """chunks, each awaited for at most what is left; raises DeadlineExceeded once it is spent."""
        iterator = iter(chunks)
        while True:
            left = self.left()
            if left <= 0:
                raise DeadlineExceeded("the upstream is sending too slowly")
            began = time.monotonic()
            with bounded_by(Deadline(left)):
                try:
                    chunk = next(iterator)
                except StopIteration:
                    return
                finally:
                    self.spent += time.monotonic() - began
            self.received += len(chunk)
            yield chunk


# -- streaming -------------------------------------------------------------------------------------


@dataclass
class ImageStream:
    """An open image: iterate for its bytes, then close (closing also releases the upstream connection
    and any temp file, even when iteration never started)."""

    content_type: str
    length: int | None
    etag: str
    cached: bool  # served from the result store
    final: bool
    chunks: Iterator[bytes]
    _cleanup: list[Callable[[], None]] = field(default_factory=list)
    #: One range of a stored image: "bytes first-last/size" (the answer is then a 206); None for all of it.
    content_range: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()
        while self._cleanup:
            try:
                self._cleanup.pop()()
            except Exception:  # cleanup must not mask the response's own outcome
                log.debug("image stream cleanup failed", exc_info=True)

    @property
    def cache_control(self) -> str:
        return IMMUTABLE if self.final else REVALIDATE


@dataclass
class _Keeping:
    """How writing an image into the store went, for the caller of a tee or spool."""

    quiet: bool = False  # a background fetch: the caller reports store faults, not the tee
    problem: str = ""

    def failed(self, message: str, *args: object) -> None:
        self.problem = message % args
        if not self.quiet:
            log.warning(message, *args)


class ImageForwarder:
    """Opens task images from the result store or the upstream; one shared httpx client, safe across
    threads."""

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None,
                 store: ResultStore | None = None):
        images = settings.images
        self.max_bytes = images.max_bytes
        self.timeout = images.timeout
        self.redirect_seconds = images.redirect_seconds
        self.store: ResultStore = store if store is not None else result_store(settings)
        from mjctl.config import split_list

        self.allow_hosts = tuple(split_list(images.allow_hosts))
        if transport is None:
            # Guarded: connects only where the source's FetchPolicy allows. No kept-alive connections: one
            # opened under a channel's policy (to its private origin) must never carry another's request.
            transport = deadline_transport(guarded=True, verify=shared_ssl_context(),
                                           limits=httpx.Limits(max_keepalive_connections=0))
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
            follow_redirects=False,  # followed in _request, so that each hop is checked and counted
            headers={"User-Agent": f"mjctl/{__version__}", "Accept": "image/*, video/*",
                     "Accept-Encoding": "identity"},
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ImageForwarder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self, source: ImageSource, byte_range: ByteRange | None = None) -> ImageStream:
        """The image's bytes from the store (one byte_range of them, when given), or all of them from the
        upstream (keeping them in the store when final).

        Raises ImageUnavailable before anything is read when neither can give a usable image, and
        RangeNotSatisfiable when byte_range starts past the end of a stored image.
        """
        problem = ""
        if source.final:
            try:
                body = self.store.open_image(source, byte_range)
            except StoreUnavailable as exc:
                problem = exc.message
            else:
                metrics.observe_image_cache(body is not None)
                if body is not None:
                    return _stored_stream(body, source, cached=True)
        try:
            stream = self._from_upstream(source, _Keeping(), keep=not problem)
        except ImageUnavailable as exc:
            if problem:
                raise ImageUnavailable(f"{exc.message} The image store could not be read either: {problem}.") from None
            raise
        if problem:
            log.warning("%s; serving the image of task %s from its upstream", problem, source.mj_id)
        return stream

    def presigned_url(self, source: ImageSource) -> str | None:
        """A short-lived link straight to a finished image in the store (an S3 bucket), for ``[images]
        redirect``; None when the store has no such links, does not hold the image, or cannot be reached
        (the image is then proxied, which says why when it fails)."""
        if not source.final:
            return None
        try:
            return self.store.presign(source, self.redirect_seconds)
        except StoreUnavailable:
            return None

    def _from_upstream(self, source: ImageSource, keeping: _Keeping, *, keep: bool = True) -> ImageStream:
        """The image's bytes from its upstream, kept in the store as they pass when final and keep."""
        if not source.url:
            raise ImageUnavailable(f"Task {source.mj_id} has no image.")
        allowance = _Allowance(self.timeout)
        response = self._request(source, allowance)
        try:
            content_type = self._check(response, source)
            length = _declared_length(response)
        except BaseException:
            response.close()
            raise
        keep = keep and source.final and self.store.accepts(content_type)
        if length is None:
            return self._spool(response, source, content_type, allowance, keeping, keep)
        chunks = self._tee(response, source, content_type, length, allowance, keeping, keep)
        return ImageStream(content_type=response.headers.get("content-type", content_type), length=length,
                           etag=source.etag, cached=False, final=source.final, chunks=chunks,
                           _cleanup=[response.close])

    def fetch_to_cache(self, source: ImageSource) -> StoredImage | None:
        """Make sure a finished task's image is in the store; returns it (None when it cannot be kept: the
        task is not finished or the type is not one the store keeps). Raises ImageUnavailable when the
        upstream cannot give it, StoreUnavailable when the store cannot be read or written (without
        logging: the caller decides when to try again)."""
        if not source.final:
            return None
        found = self.store.find(source)
        if found is not None:
            return found
        keeping = _Keeping(quiet=True)
        stream = self._from_upstream(source, keeping)
        try:
            for _chunk in stream:
                pass
        finally:
            stream.close()
        if keeping.problem:
            raise StoreUnavailable(keeping.problem)
        return self.store.find(source)

    def save(self, source: ImageSource, out: IO[bytes]) -> ImageStream:
        """Write the image to out; returns the (closed) stream describing it."""
        stream = self.open(source)
        try:
            for chunk in stream:
                out.write(chunk)
        finally:
            stream.close()
        return stream

    # -- internals ---------------------------------------------------------------------------------

    def policy_for(self, source: ImageSource) -> FetchPolicy:
        """Where the image of source may be fetched from: its channel's origin, allow_hosts, public hosts."""
        return FetchPolicy.build(getattr(source, "channel", "") or "", getattr(source, "channel_url", "") or "",
                                 self.allow_hosts)

    def _request(self, source: ImageSource, allowance: _Allowance) -> httpx.Response:
        """The upstream's answer with its headers read (the body still to come), within the timeout.

        Redirects are followed here (at most MAX_REDIRECTS), every hop under the source's FetchPolicy and
        all of them within the one deadline."""
        deadline = Deadline(allowance.left())
        began = time.monotonic()
        policy = self.policy_for(source)
        unreachable = f"Cannot reach the upstream for the image of task {source.mj_id}."
        try:
            request = self._client.build_request("GET", source.url, timeout=deadline.timeout(min(self.timeout, 10.0)))
            for _hop in range(MAX_REDIRECTS + 1):
                with bounded_by(deadline), guarded_by(policy):
                    response = self._client.send(request, stream=True)
                if response.next_request is None:
                    return response
                response.close()
                request = response.next_request
                request.extensions["timeout"] = deadline.timeout(min(self.timeout, 10.0)).as_dict()
            log.warning("channel %s: the image of task %s redirects more than %d times", _label(policy),
                        source.mj_id, MAX_REDIRECTS)
            raise ImageUnavailable(unreachable)
        except FetchRefused as exc:
            log.warning("channel %s: refused to fetch the image of task %s from %s: %s", _label(policy),
                        source.mj_id, _target(exc), visible(exc.reason[:200]))
            raise ImageUnavailable(unreachable) from None
        except httpx.TimeoutException:
            raise ImageUnavailable(
                f"The upstream did not deliver the image of task {source.mj_id} within {self.timeout:g} s.") from None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            log.info("channel %s: cannot fetch the image of task %s: %s", _label(policy), source.mj_id,
                     visible(first_line(exc)[:200]))
            raise ImageUnavailable(unreachable) from None
        finally:
            allowance.spent += time.monotonic() - began

    def _check(self, response: httpx.Response, source: ImageSource) -> str:
        if not 200 <= response.status_code < 300:
            hint = " (its link has probably expired)" if response.status_code in (403, 404, 410) else ""
            raise ImageUnavailable(f"The upstream answered HTTP {response.status_code} for the {source.kind} of "
                                   f"task {source.mj_id}{hint}.")
        content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if not content_type.startswith(source.kind + "/"):
            raise ImageUnavailable(f"The upstream sent {content_type or 'no content type'} instead of "
                                   f"{'an image' if source.video is None else 'a video'} for task {source.mj_id}.")
        length = _declared_length(response)
        if length is not None and length > self.max_bytes:
            raise ImageTooLarge(self._too_large(source))
        return content_type

    def _too_large(self, source: ImageSource) -> str:
        return f"The image of task {source.mj_id} is larger than the limit of {self.max_bytes} bytes."

    def _tee(self, response: httpx.Response, source: ImageSource, content_type: str,
             length: int, allowance: _Allowance, keeping: _Keeping, keep: bool) -> Iterator[bytes]:
        """Pass the body on chunk by chunk, copying it into a temp file that is put into the store only
        when exactly `length` bytes arrived. A failed store write (no folder, a full or read-only disk: at
        creation, on a write, on the flush of close, on the rename; an unreachable bucket) never disturbs
        the client: one log line, and the image goes on without being kept."""
        temp: IO[bytes] | None = None
        temp_path: Path | None = None
        received = 0
        try:
            if keep:
                try:
                    temp, temp_path = self.store.temp_file()
                except OSError as exc:
                    keeping.failed("image cache unavailable (%s); forwarding %s without caching", exc, source.mj_id)
            try:
                for chunk in allowance.paced(response.iter_raw()):
                    received += len(chunk)
                    if received > length:
                        raise ImageTruncated(f"The upstream sent more than the {length} bytes it declared "
                                             f"for the image of task {source.mj_id}.")
                    if temp is not None:
                        try:
                            temp.write(chunk)
                        except OSError as exc:
                            keeping.failed("cannot write the image cache (%s); %s stays uncached", exc, source.mj_id)
                            _discard(temp, temp_path)
                            temp, temp_path = None, None
                    yield chunk
            except httpx.TimeoutException as exc:
                why = "too slowly" if allowance.left() <= 0 or isinstance(exc, DeadlineExceeded) else "too late"
                raise ImageTruncated(f"The upstream sent the image of task {source.mj_id} {why}: {received} of "
                                     f"{length} bytes in {allowance.spent:.1f} s.") from None
            except httpx.HTTPError as exc:
                raise ImageTruncated(f"The upstream broke off the image of task {source.mj_id} after "
                                     f"{received} of {length} bytes: {first_line(exc)}.") from None
            if received != length:
                raise ImageTruncated(f"The upstream broke off the image of task {source.mj_id} after "
                                     f"{received} of {length} bytes.")
            if temp is not None and temp_path is not None:
                try:
                    temp.close()  # the buffered tail is written here: a full disk can fail this too
                    temp = None
                    if self.store.put_file(temp_path, source, content_type) is not None:
                        temp_path = None  # moved into place
                except OSError as exc:
                    keeping.failed("cannot store the image of %s in the cache: %s", source.mj_id, exc)
                except StoreUnavailable as exc:
                    keeping.failed("cannot store the image of %s: %s", source.mj_id, exc.message)
        finally:
            response.close()
            _discard(temp, temp_path)

    def _spool(self, response: httpx.Response, source: ImageSource, content_type: str,
               allowance: _Allowance, keeping: _Keeping, keep: bool) -> ImageStream:
        """A body of unknown length: download it to a temp file (at most max_bytes), then serve that.

        The temp file is the store's, or one in the system's temp folder when the store's folder cannot
        hold one; a write that fails (a full disk) fails this image with a 502 and one log line: without
        the whole body its length cannot be declared."""
        try:
            temp, temp_path = self.store.temp_file()
        except OSError as exc:
            keeping.failed("image cache unavailable (%s); spooling %s elsewhere, uncached", exc, source.mj_id)
            try:
                fd, name = tempfile.mkstemp(prefix="mjctl-img-", suffix=".part")
            except OSError as exc2:
                response.close()
                raise ImageUnavailable(f"No room to receive the image of task {source.mj_id}: {exc2}.") from None
            temp, temp_path = os.fdopen(fd, "wb"), Path(name)
            keep = False  # another file system: no atomic rename into the cache
        size = 0
        try:
            for chunk in allowance.paced(response.iter_bytes()):
                size += len(chunk)
                if size > self.max_bytes:
                    raise ImageTooLarge(self._too_large(source))
                temp.write(chunk)
            temp.close()
        except OSError as exc:
            _discard(temp, temp_path)
            log.warning("cannot spool the image of %s to disk: %s", source.mj_id, exc)
            raise ImageUnavailable(f"No room to receive the image of task {source.mj_id}.") from None
        except httpx.TimeoutException:
            _discard(temp, temp_path)
            raise ImageUnavailable(
                f"The upstream did not deliver the image of task {source.mj_id} in time "
                f"({self.timeout:g} s, then at least {MIN_RATE // 1024} KiB/s).") from None
        except httpx.HTTPError as exc:
            _discard(temp, temp_path)
            raise ImageUnavailable(
                f"The upstream broke off the image of task {source.mj_id}: {first_line(exc)}.") from None
        except BaseException:
            _discard(temp, temp_path)
            raise
        finally:
            response.close()
        if keep:
            try:
                kept = self.store.put_file(temp_path, source, content_type)
            except StoreUnavailable as exc:
                keeping.failed("cannot store the image of %s: %s", source.mj_id, exc.message)
            else:
                body = open_file(kept, content_type) if kept is not None else None
                if body is not None:
                    return _stored_stream(body, source, cached=False)
        body = open_file(temp_path, content_type, delete=True)
        if body is None:
            raise ImageUnavailable(f"The image of task {source.mj_id} vanished while it was being served.")
        return _stored_stream(body, source, cached=False)


def _stored_stream(body: StoredBody, source: ImageSource, *, cached: bool) -> ImageStream:
    """An ImageStream over a body opened in the store (or a spooled file)."""
    length = body.end + 1 - body.start
    return ImageStream(content_type=body.content_type, length=length, etag=source.etag, cached=cached,
                       final=source.final, chunks=body.chunks, _cleanup=[body.close],
                       content_range=f"bytes {body.start}-{body.end}/{body.size}" if body.partial else None)


def _declared_length(response: httpx.Response) -> int | None:
    """The body length the upstream declared, when it can be trusted to count the bytes we forward."""
    if response.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    try:
        value = int(response.headers.get("content-length", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def _discard(fh: IO[bytes] | None, path: Path | None) -> None:
    """Close and remove a temp file, whatever state the disk is in."""
    if fh is not None:
        try:
            fh.close()
        except OSError:
            pass
    if path is not None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the temp file %s: %s", path, exc)


def _label(policy: FetchPolicy) -> str:
    return visible(policy.channel[:64]) if policy.channel else "(unknown)"


def _target(exc: FetchRefused) -> str:
    """host:port of a refused fetch, shortened and escaped: it is the upstream's text, not a full URL."""
    host = exc.host if len(exc.host) <= 80 else exc.host[:77] + "..."
    return visible(f"{host}:{exc.port}" if exc.port else host)
