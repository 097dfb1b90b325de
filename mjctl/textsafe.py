"""Text from users and upstreams, made safe to show on a terminal or write to a log.

A prompt, a failReason, a button label or a request path is data, but a terminal reads some characters as
commands: ESC and CSI start sequences that recolour the screen, retitle the window or move the cursor; BEL
rings; a carriage return or backspaces overwrite what was printed before; bidi overrides reorder what follows
so a line reads differently from its bytes; zero-width characters hide. Written raw to a log file or a
tab-separated export they come back the day someone runs `cat` or `less -R` on it, and a newline inside a
field forges a further log line or row.

:func:`visible` turns each such character into an escape anyone can read (``\\x1b``, ``\\u202e``) and leaves
everything else as it was, emoji and every script included. It is for people; JSON output stays exact (see
:func:`json_visible`), and the escapes are not meant to be reversed.
"""

from __future__ import annotations

import logging
import re

# Shown escaped wherever text is shown:
#   C0 controls (ESC, BEL, backspace, CR, LF, tab…), DEL and the C1 controls (CSI is U+009B);
#   U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069: bidi marks, embeddings, overrides, isolates;
#   U+200B, U+2060–U+2064, U+FEFF: zero-width spaces and joiners that hide text; U+206A–U+206F: deprecated
#   format controls; U+2028, U+2029: line and paragraph separators, which some programs break lines at;
#   U+FFF9–U+FFFB: interlinear annotation controls; U+D800–U+DFFF: lone surrogates, which cannot be encoded
#   at all (writing one to a UTF-8 stream raises, so one hostile field would end a whole listing).
# Kept: U+200C and U+200D (ZWNJ, ZWJ), which Persian, Indic scripts and emoji sequences need.
_WIDE = "\u061c\u200b\u200e\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_WIDE}]")
_UNSAFE_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f\x7f-\x9f{_WIDE}]")
# What JSON text may still carry raw: json.dumps escapes C0 itself but not DEL, C1 or the rest.
_JSON_UNSAFE = re.compile(f"[\x7f-\x9f{_WIDE}]")

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(match: re.Match) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str, *, newlines: bool = False) -> str:
    """text with every control, bidi and invisible character shown as an escape (``\\x1b``, ``\\n``,
    ``\\u202e``), so it can be printed to a terminal or a log without acting on it.

    Newlines are escaped too (a table cell, a TSV field or a log line must stay one line) unless `newlines`
    is true, for text that is lines by nature, such as a traceback. Clean text costs one C-level scan and comes
    back as the same object: no per-character Python work, which matters for listings of many rows."""
    if text.isprintable():  # every character escaped here is non-printable: a C-speed check, twice the regex's
        return text
    return (_UNSAFE_BUT_NEWLINE if newlines else _UNSAFE).sub(_escape, text)


def _json_escape(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_visible(text: str) -> str:
    """JSON text (from json.dumps) with the characters a terminal would act on written as JSON escapes.

    json.dumps(ensure_ascii=False) escapes C0 controls itself but writes DEL, C1 controls (CSI among them),
    bidi overrides and lone surrogates raw. Outside strings JSON text is plain ASCII, so replacing these with
    ``\\uXXXX`` changes no value: the document still parses to exactly the same data."""
    return _JSON_UNSAFE.sub(_json_escape, text)


class VisibleFormatter(logging.Formatter):
    """A log formatter whose lines cannot carry terminal control sequences or forge further lines.

    The access log quotes request paths and the poller and relay quote upstream messages: both are written by
    others. The formatted line is escaped as a whole (one line per record); a traceback keeps its line breaks
    but nothing else."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return visible(super().formatMessage(record))

    def formatException(self, ei) -> str:
        return visible(super().formatException(ei), newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return visible(super().formatStack(stack_info), newlines=True)
