"""The web page: GET / serves index.html, GET /static/<name> its stylesheet and script.

Everything the page needs ships inside the package (mjctl/server/static/): no build step, no CDN. Only
the files named in STATIC_FILES are served, so no request path can reach anything else on disk. Each
answer carries an ETag and ``Cache-Control: no-cache``: browsers keep the files but revalidate them, so an
upgraded mjctl is picked up on the next load while an unchanged file costs a 304.

The page talks only to documented endpoints: GET /api/user/self (who is signed in, the balance),
GET /api/mj/self or, for admins, GET /api/mj/ with GET /api/admin/users and /api/admin/channels for the
names behind the ids (mjctl.server.directory); its Statistics view GET /api/mj/stats and the SVG charts of
GET /api/mj/stats/chart (mjctl.server.console). README's "The web page" says what it shows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import bottle

from mjctl.server.app import AppContext

STATIC_DIR = Path(__file__).with_name("static")

#: The files the page is made of, and their content types.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
}

#: Thumbnails and videos may come from the upstream's own host when forwarding is off, hence img-src and
#: media-src.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' http: https: data:; media-src 'self' http: https:; base-uri 'none'; "
                                "form-action 'self'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


@cache
def load_static(name: str) -> StaticFile:
    """A packaged file, read once per process."""
    body = (STATIC_DIR / name).read_bytes()
    return StaticFile(body, STATIC_FILES[name], '"' + hashlib.sha256(body).hexdigest()[:20] + '"')


def static_response(name: str) -> bottle.HTTPResponse:
    """The file with its type and validators; a 304 when the browser's copy is current."""
    if name not in STATIC_FILES:
        return bottle.HTTPResponse(body='{"success": false, "message": "Not found: there is no such file."}',
                                   status=404, headers={"Content-Type": "application/json"})
    file = load_static(name)
    headers = {"ETag": file.etag, "Cache-Control": "no-cache", **SECURITY_HEADERS}
    if file.etag in _etags(bottle.request.get_header("If-None-Match") or ""):
        return bottle.HTTPResponse(status=304, headers=headers)
    headers.update({"Content-Type": file.content_type, "Content-Length": str(len(file.body))})
    body = b"" if bottle.request.method == "HEAD" else file.body
    return bottle.HTTPResponse(body=body, status=200, headers=headers)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def install(app: bottle.Bottle, ctx: AppContext) -> None:
    # Not JSON endpoints, so not in the OpenAPI document.
    @app.route("/", ["GET", "HEAD"], db=False, openapi=False)
    def index():
        return static_response("index.html")

    @app.route("/static/<name>", ["GET", "HEAD"], db=False, openapi=False)
    def static(name: str):
        return static_response(name)
