"""A gzip or zlib stream made of blocks compressed one by one, and kept.

/metrics of a large fleet is some 28 MB of text of which a scrape finds most unchanged since
the last one. Compressing it whole at each scrape costs hundreds of milliseconds; here each
block of text is compressed on its own once (raw deflate from a fresh compressor, ended by a
sync flush, so that it refers to no byte before it) and the compressed blocks of a body,
however old each is, concatenate into one valid deflate stream. The stream's header is the
coding's; its trailer is the checksum of the whole text, combined from the blocks' own
checksums as zlib's crc32_combine() and adler32_combine() compute them (Python's zlib module
has neither), and for gzip the length.
"""

from __future__ import annotations

import struct
import zlib

# Content codings in the order aiohttp tries them against Accept-Encoding, with the header
# of each: gzip's (no name, no mtime, OS unknown), and a zlib stream's for deflate (as
# aiohttp sends it).
CODINGS: dict[str, bytes] = {
    "deflate": b"\x78\x9c",
    "gzip": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff",
}
# Blocks larger than this are compressed at zlib level 1 (see the module's docstring).
FAST_ABOVE = 1 << 20


class Block:
    """The text of a run of adjacent families, and its compressed form and checksums once a
    scrape asked for them. Kept, all of them, while none of its families changes.

    Compressed on its own: raw deflate from a fresh compressor, ended by a sync flush (byte
    aligned, not the final block), so it refers to no byte before it and the blocks of a
    body, however old each is, concatenate into one valid deflate stream."""

    __slots__ = ("_adler", "_crc", "_deflated", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._deflated: bytes | None = None
        self._crc: int | None = None
        self._adler: int | None = None

    # All three under the exposition's lock.
    def deflated(self) -> bytes:
        if self._deflated is None:
            level = 1 if len(self.data) > FAST_ABOVE else zlib.Z_DEFAULT_COMPRESSION
            compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
            self._deflated = compressor.compress(self.data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return self._deflated

    def crc32(self) -> int:
        if self._crc is None:
            self._crc = zlib.crc32(self.data)
        return self._crc

    def adler32(self) -> int:
        if self._adler is None:
            self._adler = zlib.adler32(self.data)
        return self._adler


# Checksums of a concatenation from those of its parts, as zlib's crc32_combine() and
# adler32_combine() compute them (Python's zlib module has neither): a body's checksum then
# costs a few operations per block, not a pass over every byte of it.
_CRC_POLY = 0xEDB88320  # CRC-32's polynomial, bit-reflected
_ADLER_BASE = 65521


def _multmodp(a: int, b: int) -> int:
    """a x b modulo the CRC-32 polynomial (a must not be 0)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


# x^(2^k) modulo the polynomial, for k = 0..31.
_X2N = [1 << 30]
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A + B from crc(A), crc(B) and len(B)."""
    p, k = 1 << 31, 3  # x^0; multiplying by x^(8 n) shifts crc1 past n bytes
    while length2:
        if length2 & 1:
            p = _multmodp(_X2N[k & 31], p)
        length2 >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def adler32_combine(adler1: int, adler2: int, length2: int) -> int:
    """The Adler-32 of A + B from adler(A), adler(B) and len(B)."""
    a1, b1 = adler1 & 0xFFFF, adler1 >> 16
    a2, b2 = adler2 & 0xFFFF, adler2 >> 16
    a = (a1 + a2 - 1) % _ADLER_BASE
    b = (b1 + b2 + length2 * (a1 - 1)) % _ADLER_BASE
    return a | b << 16


def frame(coding: str, blocks: tuple[Block, ...]) -> tuple[bytes, int, int]:
    """(the coding's header and the compressed blocks, checksum of their text, its length)."""
    gzip = coding == "gzip"
    check, size = (0 if gzip else 1), 0  # the checksums of nothing
    for block in blocks:
        if gzip:
            check = crc32_combine(check, block.crc32(), len(block.data))
        else:
            check = adler32_combine(check, block.adler32(), len(block.data))
        size += len(block.data)
    head = b"".join([CODINGS[coding], *(block.deflated() for block in blocks)])
    return head, check, size


def finish(coding: str, framed: tuple[bytes, int, int], tail: bytes) -> bytes:
    """One stream: a framed head, then `tail` compressed to the end of the stream, the trailer."""
    head, check, size = framed
    last = zlib.compress(tail, zlib.Z_DEFAULT_COMPRESSION, -zlib.MAX_WBITS)
    if coding == "gzip":
        trailer = struct.pack("<II", zlib.crc32(tail, check), (size + len(tail)) & 0xFFFFFFFF)
    else:
        trailer = struct.pack(">I", zlib.adler32(tail, check))
    return b"".join((head, last, trailer))
