"""mjctl: manage Midjourney image tasks behind midjourney-proxy upstreams."""

__version__ = "0.1.0"
