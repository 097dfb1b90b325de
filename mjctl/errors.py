"""The error hierarchy of mjctl's core.

Core code raises these; the CLI turns them into one sentence on stderr and an exit code, the server
into a JSON body and a status. Exit codes: 1 for a failed operation, 2 for bad usage or configuration.
"""


class MjctlError(Exception):
    """An operation failed; the message is one sentence meant for a person."""

    exit_code = 1
    http_status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(MjctlError):
    """The caller asked for something malformed (bad option, bad value)."""

    exit_code = 2
    http_status = 400


class ConfigError(UsageError):
    """The configuration file, an environment variable or an override is wrong."""


class NotFound(MjctlError):
    http_status = 404


class Conflict(MjctlError):
    http_status = 409


class InsufficientQuota(MjctlError):
    http_status = 403


class DatabaseUnavailable(MjctlError):
    http_status = 503


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text without its final full stop (the class name when it has none):
    what a log line or a one-sentence message quotes of a driver's or a library's error."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__).rstrip(".")
