"""The web page's browser-test fixtures, loaded by a test module with ``pytest_plugins = ["tests.webfixtures"]``
(helpers and seeded data: tests/webpage.py)."""

from __future__ import annotations

import pytest

from mjctl import accounts
from tests.helpers import free_port, make_settings
from tests.webpage import (
    CHANNELS,
    CHROMIUM,
    CHROMIUM_ARGS,
    SCREENS,
    Site,
    open_tab,
    playwright_or_skip,
    seed,
    static_images,
)


@pytest.fixture
def site(tmp_path, new_store):
    from mjctl.channels import add_channel
    from mjctl.httpserver import ServerThread
    from mjctl.server import create_app

    settings = new_store(make_settings(tmp_path, images__forward=False))
    tokens, users = {}, {}
    for name, role in (("alice", "user"), ("bob", "user"), ("carol", "user"), ("admin", "admin")):
        user, tokens[name] = accounts.create_user(name, role=role, quota=100_000)
        users[name] = user.id
    for name in CHANNELS:  # ids 1 and 2
        add_channel(settings, name, "http://127.0.0.1:9", "channel-secret")
    app = create_app(settings, extra=[static_images])
    # An explicit port, not 0: the restart test rebinds it.
    server = ServerThread(app, port=free_port(), threads=4).start()
    site = Site(settings, app, server, tokens, users)
    seed(site)
    yield site
    site.server.stop()


@pytest.fixture(scope="module")
def browser():
    sync_playwright = playwright_or_skip()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site):
    tab = open_tab(browser, site)
    yield tab
    tab.context.close()


@pytest.fixture(params=list(SCREENS))
def screen_page(request, browser, site):
    """The same test on a 375 px phone and a 1366 px laptop; the tab's ``screen`` says which."""
    tab = open_tab(browser, site, request.param)
    tab.screen = request.param
    yield tab
    tab.context.close()


