"""Rewrite the PCRE patterns of nmap-service-probes into patterns Python's `re` can run.

nmap matches with PCRE; almost all of its patterns are also valid Python, and Python 3.11 even
has PCRE's possessive quantifiers and atomic groups. What differs is rewritten here:

  PCRE                         Python
  \\Q...\\E                    each character escaped
  \\z   \\Z                    \\Z   (?=\\n?\\Z)
  \\h   \\e   \\cX   \\x{HH}   [ \\t]   \\x1b   the control byte   \\xHH
  [[:alpha:]] and friends      the equivalent ranges
  (?<name>...)  \\k<name>      (?P<name>...)  (?P=name)
  "[" and "--" inside a set    escaped (Python warns about future set syntax)

What cannot be expressed (recursion, \\K, \\G, \\R, conditionals, flags switched on halfway
through a pattern, code points above 0xFF) raises `UnsupportedPattern`; the loader counts those
rules as skipped instead of guessing.
"""

from __future__ import annotations

import re

_POSIX_CLASSES = {
    "alpha": "a-zA-Z",
    "digit": "0-9",
    "alnum": "a-zA-Z0-9",
    "upper": "A-Z",
    "lower": "a-z",
    "space": " \\t\\n\\r\\x0b\\x0c",
    "blank": " \\t",
    "xdigit": "0-9A-Fa-f",
    "word": "\\w",
    "punct": re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    "print": "\\x20-\\x7e",
    "graph": "\\x21-\\x7e",
    "cntrl": "\\x00-\\x1f\\x7f",
}

# Escapes PCRE and Python read the same way: pass through untouched.
_SAME_ESCAPES = set("dDsSwWbBAnrtfa0123456789")


class UnsupportedPattern(ValueError):
    """The PCRE pattern uses a feature Python's `re` does not have."""


def _control(letter: str) -> str:
    return f"\\x{ord(letter.upper()) ^ 0x40:02x}"


def pcre_to_python(pattern: str) -> str:
    """Return a Python `re` pattern equivalent to the PCRE `pattern`.

    The pattern is text whose characters stand for bytes (latin-1), as the nmap file is read.
    Raises `UnsupportedPattern` for what has no Python equivalent.
    """
    out: list[str] = []
    i = 0
    n = len(pattern)
    in_class = False
    while i < n:
        char = pattern[i]
        if char == "\\":
            if i + 1 >= n:
                raise UnsupportedPattern("trailing backslash")
            esc = pattern[i + 1]
            i += 2
            if esc == "Q":
                end = pattern.find("\\E", i)
                literal = pattern[i:] if end < 0 else pattern[i:end]
                i = n if end < 0 else end + 2
                out.append("".join(re.escape(c) for c in literal))
            elif esc == "E":
                continue
            elif esc == "z":
                out.append("\\Z")
            elif esc == "Z":
                out.append("(?=\\n?\\Z)")
            elif esc == "h":
                out.append(" \\t" if in_class else "[ \\t]")
            elif esc == "e":
                out.append("\\x1b")
            elif esc == "c":
                if i >= n:
                    raise UnsupportedPattern("\\c at end of pattern")
                out.append(_control(pattern[i]))
                i += 1
            elif esc == "x":
                if i < n and pattern[i] == "{":
                    end = pattern.find("}", i)
                    if end < 0:
                        raise UnsupportedPattern("unterminated \\x{")
                    value = int(pattern[i + 1 : end] or "0", 16)
                    if value > 0xFF:
                        raise UnsupportedPattern("code point above 0xFF")
                    out.append(f"\\x{value:02x}")
                    i = end + 1
                else:
                    digits = ""
                    while i < n and len(digits) < 2 and pattern[i] in "0123456789abcdefABCDEF":
                        digits += pattern[i]
                        i += 1
                    out.append(f"\\x{int(digits or '0', 16):02x}")
            elif esc == "k":
                match = re.match(r"[<{']([A-Za-z_]\w*)[>}']", pattern[i:])
                if match is None:
                    raise UnsupportedPattern("\\k without a group name")
                out.append(f"(?P={match.group(1)})")
                i += match.end()
            elif esc in "KGRXCgNpPLluUHvV":
                raise UnsupportedPattern(f"\\{esc} has no Python equivalent")
            elif esc in _SAME_ESCAPES or not esc.isalnum():
                out.append("\\" + esc)
            else:
                raise UnsupportedPattern(f"unknown escape \\{esc}")
            continue
        if in_class:
            if char == "]":
                in_class = False
                out.append("]")
            elif char == "[" and pattern.startswith("[:", i):
                end = pattern.find(":]", i + 2)
                name = pattern[i + 2 : end] if end > 0 else ""
                if name.startswith("^") or name not in _POSIX_CLASSES:
                    raise UnsupportedPattern(f"POSIX class [:{name}:]")
                out.append(_POSIX_CLASSES[name])
                i = end + 2
                continue
            elif char == "[" or (char in "-&~|" and out and out[-1] == char):
                out.append("\\" + char)
            else:
                out.append(char)
            i += 1
            continue
        if char == "[":
            in_class = True
            out.append("[")
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            if i < n and pattern[i] == "]":
                # A "]" first in a set is a literal in both dialects; spell it unambiguously.
                out.append("\\]")
                i += 1
            continue
        if char == "(" and pattern.startswith("(?", i):
            rest = pattern[i + 2 :]
            named = re.match(r"<([A-Za-z_]\w*)>|'([A-Za-z_]\w*)'|P<([A-Za-z_]\w*)>", rest)
            if named is not None:
                out.append(f"(?P<{next(g for g in named.groups() if g)}>")
                i += 2 + named.end()
                continue
            if rest[:1] in ("R", "&", "(", "|") or re.match(r"[+-]?\d|P>", rest):
                raise UnsupportedPattern("recursion, conditionals or branch reset")
            flags = re.match(r"([a-zA-Z]*)(-[a-zA-Z]*)?([:)])", rest)
            if flags is not None and flags.group(3) == ")" and (i > 0 or flags.group(2)):
                # PCRE lets (?i) switch a flag on for the rest of the group; Python only
                # accepts global flags at the very start.
                raise UnsupportedPattern("inline flag in the middle of the pattern")
            out.append("(?")
            i += 2
            continue
        out.append(char)
        i += 1
    if in_class:
        raise UnsupportedPattern("unterminated character set")
    return "".join(out)
