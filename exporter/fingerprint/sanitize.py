"""Turn bytes a remote service chose into text that is safe to show anywhere.

Banners and captured fields end up in Prometheus label values, JSON logs and the status page.
A hostile or broken service controls every byte of them, so everything that leaves this package
goes through `sanitize`: valid UTF-8, printable characters only (control characters and invalid
bytes are written as escapes, the way Python writes them), and a hard length cap.
"""

from __future__ import annotations

_ELLIPSIS = "\u2026"
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        # A byte that was not valid UTF-8 (decoded with surrogateescape): show the byte itself.
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def sanitize(text: str | bytes, limit: int = 256) -> str:
    """Return `text` as printable UTF-8 of at most `limit` characters.

    Non-printable characters become backslash escapes (`\\r`, `\\x00`, `\\u2028`); bytes that are
    not valid UTF-8 become `\\xNN`. When the result would be longer than `limit`, it is cut and
    ends with an ellipsis, so a cut value is recognisable.
    """
    if limit <= 0:
        return ""
    if isinstance(text, bytes | bytearray | memoryview):
        # Each decoded character yields at least one output character, and a UTF-8 character
        # is at most 4 bytes: this slice always holds enough input, and a 10 MB banner is never
        # decoded whole.
        text = bytes(text[: limit * 4 + 4]).decode("utf-8", errors="surrogateescape")
    else:
        text = text[: limit + 1]
    pieces: list[str] = []
    length = 0
    for char in text:
        piece = char if char.isprintable() else _escape(char)
        if length + len(piece) > limit:
            break
        pieces.append(piece)
        length += len(piece)
    else:
        return "".join(pieces)
    # Truncated: make room for the ellipsis.
    while pieces and length + 1 > limit:
        length -= len(pieces.pop())
    return "".join(pieces) + _ELLIPSIS
