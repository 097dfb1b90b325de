"""The HTTP server: ``create_app(settings)`` builds the Bottle app (see mjctl.server.app)."""

from mjctl.server.app import AppContext, create_app

__all__ = ["AppContext", "create_app"]
