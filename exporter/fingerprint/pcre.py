r"""Run the PCRE patterns of nmap-service-probes on the `regex` package, in bounded time.

nmap matches with PCRE. The `regex` package (in its default, `re`-compatible V0 mode) runs
nearly all of PCRE as is: recursion, subroutine calls, \K, \G, \R, conditionals, branch reset
(?|...), inline flags anywhere (scoped as in PCRE), named groups (?<n>...), possessive
quantifiers, atomic groups and POSIX classes such as [[:alpha:]]. Bytes patterns get ASCII
semantics for \w, [[:alpha:]] and case folding, as PCRE has in nmap's build.

What `regex` lacks, or reads differently, is rewritten before compiling:

  PCRE                        for regex
  \Q...\E                     each character escaped
  \Z                          (?=\n?\z)       regex's \Z only matches at the very end
  \e  \cX  \x{HH}  \xH         \x1b  the control byte  \xHH  \x0H
  \h \H \v \V \N              the byte classes they stand for (regex's \v is only \x0b)
  \k<n>  \k'n'  \k{n}         (?P=n)
  (?'n'...)                   (?P<n>...)
  a { that opens no {n}, {n,} or {n,m}
                              \{              PCRE reads it as a literal; regex takes {,m}
                                              for a quantifier and rejects "+{"

Refused (`UnsupportedPattern`): \g (PCRE's backreference and subroutine forms mean something
else to regex), \C, and code points above 0xFF, which cannot occur in the bytes nmap matches.
Whatever regex itself rejects raises `regex.error`.

Patterns run on what remote servers send, so every search takes a timeout (`search`): a
pattern that backtracks exponentially on a hostile answer costs at most that long.
"""

from __future__ import annotations

import re

import regex

Pattern = regex.Pattern[bytes]
Match = regex.Match[bytes]

# PCRE's byte classes (non-UTF mode) that `regex` spells differently or lacks.
_CLASSES = {"h": "\\t \\xa0", "v": "\\n\\x0b\\x0c\\r\\x85"}
_NEGATED = {"H": _CLASSES["h"], "V": _CLASSES["v"], "N": "\\n"}
_QUANTIFIER = re.compile(r"\{\d+(?:,\d*)?\}")
_POSIX_CLASS = re.compile(r"\[:\^?[a-z]+:\]")
_GROUP_NAME = re.compile(r"[<{']([A-Za-z_]\w*)[>}']")


class UnsupportedPattern(ValueError):
    """The PCRE pattern uses a feature the `regex` package does not have."""


def pcre_to_regex(pattern: str) -> str:
    """Return `pattern` (text whose characters stand for bytes) rewritten for `regex`.

    Most patterns come back unchanged. Raises `UnsupportedPattern` for what has no
    equivalent.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        char = pattern[i]
        if char == "\\" and i + 1 < n:
            esc = pattern[i + 1]
            i += 2
            if esc == "Q":
                end = pattern.find("\\E", i)
                literal = pattern[i:] if end < 0 else pattern[i:end]
                i = n if end < 0 else end + 2
                out.append("".join(re.escape(c) for c in literal))
            elif esc == "E":
                pass
            elif esc == "Z" and not in_class:
                out.append("(?=\\n?\\z)")
            elif esc == "e":
                out.append("\\x1b")
            elif esc == "c":
                if i >= n:
                    raise UnsupportedPattern("\\c at the end of the pattern")
                out.append(f"\\x{ord(pattern[i].upper()) ^ 0x40:02x}")
                i += 1
            elif esc == "x":
                out.append(_hex_escape(pattern, i))
                i = _hex_end(pattern, i)
            elif esc in _CLASSES:
                out.append(_CLASSES[esc] if in_class else f"[{_CLASSES[esc]}]")
            elif esc in _NEGATED:
                if in_class:
                    raise UnsupportedPattern(f"\\{esc} inside a character class")
                out.append(f"[^{_NEGATED[esc]}]")
            elif esc == "k":
                name = _GROUP_NAME.match(pattern, i)
                if name is None:
                    raise UnsupportedPattern("\\k without a group name")
                out.append(f"(?P={name.group(1)})")
                i = name.end()
            elif esc in "gC":
                raise UnsupportedPattern(f"\\{esc} has no equivalent in regex")
            else:
                out.append("\\" + esc)
            continue
        if in_class:
            posix = _POSIX_CLASS.match(pattern, i) if char == "[" else None
            if posix is not None:  # regex reads [:alpha:] as PCRE does: copy it whole
                out.append(posix.group(0))
                i = posix.end()
                continue
            in_class = char != "]"
        elif char == "[":
            in_class = True
            out.append(char)
            i += 1
            # A "]" first in a set (after an optional "^") is a literal, not the end.
            for literal in ("^", "]"):
                if pattern.startswith(literal, i):
                    out.append(literal)
                    i += 1
            continue
        elif char == "{" and _QUANTIFIER.match(pattern, i) is None:
            out.append("\\{")  # PCRE reads a brace that is no quantifier as a literal
            i += 1
            continue
        elif pattern.startswith("(?'", i):
            name = _GROUP_NAME.match(pattern, i + 2)
            if name is not None:
                out.append(f"(?P<{name.group(1)}>")
                i = name.end()
                continue
        out.append(char)
        i += 1
    return "".join(out)


_HEX = "0123456789abcdefABCDEF"


def _hex_end(pattern: str, i: int) -> int:
    """Where the digits of a `\\x` escape starting at `i` end: `{...}` or up to two digits."""
    if pattern.startswith("{", i):
        end = pattern.find("}", i)
        if end < 0:
            raise UnsupportedPattern("unterminated \\x{")
        return end + 1
    end = i
    while end < min(i + 2, len(pattern)) and pattern[end] in _HEX:
        end += 1
    return end


def _hex_escape(pattern: str, i: int) -> str:
    """`\\x{HH}`, `\\xHH`, `\\xH` or a bare `\\x` (the byte 0) as `\\xHH`."""
    text = pattern[i : _hex_end(pattern, i)]
    if len(text) == 2 and text[0] != "{":
        return "\\x" + text  # already what regex reads
    digits = text.strip("{}")
    try:
        value = int(digits or "0", 16)
    except ValueError:
        raise UnsupportedPattern(f"bad \\x{{{digits}}}") from None
    if value > 0xFF:
        raise UnsupportedPattern("code point above 0xFF")
    return f"\\x{value:02x}"


def compile_pcre(pattern: str, *, ignore_case: bool = False, dot_all: bool = False) -> Pattern:
    """Compile a PCRE `pattern` for matching bytes.

    Raises `UnsupportedPattern`, or `regex.error` for what `regex` rejects.
    """
    return compile_native(pcre_to_regex(pattern), ignore_case=ignore_case, dot_all=dot_all)


def compile_native(pattern: str, *, ignore_case: bool = False, dot_all: bool = False) -> Pattern:
    """Compile a pattern already in `regex` syntax (the built-in database's dialect)."""
    flags = regex.V0 | (regex.IGNORECASE if ignore_case else 0) | (regex.DOTALL if dot_all else 0)
    return regex.compile(pattern.encode("latin-1"), flags)


def search(pattern: Pattern, data: bytes, timeout: float) -> Match | None:
    """`pattern.search(data)`, giving up after `timeout` seconds (`TimeoutError`)."""
    return pattern.search(data, timeout=max(timeout, 1e-6))
