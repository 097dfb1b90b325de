"""Image forwarding: signed image URLs, the result store, and streaming a task's image from its upstream.

Upstream image links (Discord's CDN) expire after about a day. mjctl hands out its own URLs instead
(``<public_url>/mj/image/<mj_id>?t=<row id>&sig=…``, bound to the task's row: upstream ids repeat
across channels), streams the upstream body through in chunks (memory stays flat whatever the size) and
keeps a finished task's image in the result store (a local folder, or an S3 bucket every host shares: see
``store``) the first time it passes, so the URL keeps working after the upstream link has died.

- A task's image is named from a hash of its row (row id and upstream id; never the upstream id alone, nor
  the id itself), one file or object per image, written to a temp file and renamed into place (or uploaded
  in one PUT) only when complete: a reader sees a whole image or none, and two concurrent first downloads
  leave one complete image.
- Only finished (SUCCESS) images are cached and served as immutable; a preview of a running task is
  forwarded live.
- Every upstream failure before the first byte is an ``ImageUnavailable`` (502). A failure after the
  first byte (the upstream breaks off, or sends more or less than it declared) raises ``ImageTruncated``
  from the iterator, and the caller must abort the connection rather than end the response normally.
- A body without a declared length is spooled to a temp file first (bounded by ``max_bytes``) so that
  it can be checked and served with a length — never presented truncated.

This module knows nothing of the web framework or the CLI.
"""

from mjctl.images.common import (
    EXTENSIONS,
    IMMUTABLE,
    MAX_VIDEOS,
    MJ_ID_RE,
    PURPOSE,
    REVALIDATE,
    ROUTE,
    ROW_PARAM,
    TASK_PURPOSE,
    VIDEO_PARAM,
    VIDEO_ROUTE,
    ImageTooLarge,
    ImageTruncated,
    ImageUnavailable,
)
from mjctl.images.urls import (
    ImageSource,
    ResultLinks,
    etag_matches,
    image_url_for,
    public_base,
    sign_image,
    sign_task_image,
    sign_task_video,
    verify_image,
    verify_task_image,
    verify_task_video,
    video_list,
)

#: Names whose modules import httpx and friends, loaded on first use so that listing tasks (which only
#: signs URLs) does not pay for them at start-up.
_LAZY = {
    "StoredImage": "store", "ResultStore": "store", "StoreUnavailable": "store", "result_store": "store",
    "ImageCache": "cache", "ImageForwarder": "forward", "ImageStream": "forward",
    "ImagePrefetcher": "prefetch", "prefetch_hook": "prefetch", "shared_prefetcher": "prefetch",
    "stop_shared_prefetchers": "prefetch",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mjctl.images' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"mjctl.images.{module}"), name)
    globals()[name] = value
    return value


__all__ = ["EXTENSIONS", "IMMUTABLE", "MJ_ID_RE", "PURPOSE", "REVALIDATE", "ROUTE", "ROW_PARAM", "TASK_PURPOSE",
           "MAX_VIDEOS", "VIDEO_PARAM", "VIDEO_ROUTE", "ResultLinks", "sign_task_video", "verify_task_video",
           "video_list",
           "ImageTooLarge", "ImageTruncated", "ImageUnavailable", "ImageSource", "etag_matches", "image_url_for",
           "public_base", "sign_image", "sign_task_image", "verify_image", "verify_task_image", "StoredImage",
           "ResultStore", "StoreUnavailable", "result_store",
           "ImageCache", "ImageForwarder", "ImageStream", "ImagePrefetcher", "prefetch_hook", "shared_prefetcher",
           "stop_shared_prefetchers"]
