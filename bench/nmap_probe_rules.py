r"""How many of nmap's TCP match/softmatch rules run as written, rewritten, or not at all.

Run: `python bench/nmap_probe_rules.py [PATH]` (default /usr/share/nmap/nmap-service-probes,
from Debian's nmap package).

Each pattern of a TCP probe goes through `exporter.fingerprint.pcre` the way the loader does:

  unchanged   `pcre_to_regex` returns it as written, and it compiles and runs
  rewritten   it compiles and runs once rewritten; "braces" counts those where the only
              rewrite is escaping a literal "{" (which `regex` could read as a fuzzy-matching
              constraint or as a "{,m}" quantifier)
  refused     `UnsupportedPattern`, or `regex` rejects it (the loader counts these as skipped)

"Runs" means one search over a few typical answers within the rule time limit. For reference
the last line counts the patterns Python's own `re` compiles as written.

Measured on nmap 7.93's file (11,525 TCP rules): on `regex`, 11,432 unchanged, 93 rewritten
(every one only for literal braces), 0 refused. The earlier translator to Python's `re` left
11,489 unchanged, rewrote 36 (escaping "[" inside sets, hex digits in lower case) and refused
none of this file, though it refused recursion, \K, conditionals and flags set halfway.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import regex

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.fingerprint.pcre import (  # noqa: E402
    UnsupportedPattern,
    compile_native,
    pcre_to_regex,
    search,
)
from exporter.fingerprint.signatures import RULE_TIME_LIMIT  # noqa: E402

DEFAULT = Path("/usr/share/nmap/nmap-service-probes")
MATCH_LINE = re.compile(r"(?:softmatch|match)\s+\S+\s+m(.)")
SAMPLES = (
    b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Length: 0\r\n\r\n",
    b"220 mail.example.test ESMTP Postfix (Debian/GNU)\r\n",
    bytes(range(256)) * 4,
)


def tcp_patterns(text: str) -> Iterator[tuple[str, str]]:
    """(pattern, options) of each match/softmatch line inside a TCP probe block."""
    tcp = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Probe "):
            tcp = line.split()[1:2] == ["TCP"]
        elif tcp and (head := MATCH_LINE.match(line)) is not None:
            end = line.find(head.group(1), head.end())
            options = re.match(r"[a-z]*", line[end + 1 :])
            yield line[head.end() : end], options.group(0) if options else ""


def classify(pattern: str, options: str) -> str:
    try:
        rewritten = pcre_to_regex(pattern)
        compiled = compile_native(rewritten, ignore_case="i" in options, dot_all="s" in options)
    except (UnsupportedPattern, regex.error):
        return "refused"
    for sample in SAMPLES:
        try:
            search(compiled, sample, RULE_TIME_LIMIT)
        except TimeoutError:
            return "refused"
    if rewritten == pattern:
        return "unchanged"
    if rewritten.replace("\\{", "{") == pattern.replace("\\{", "{"):
        return "braces"  # only literal braces escaped
    return "rewritten"


def compiles_in_re(pattern: str, options: str) -> bool:
    flags = (re.IGNORECASE if "i" in options else 0) | (re.DOTALL if "s" in options else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            re.compile(pattern.encode("latin-1"), flags)
        except (re.error, Warning):
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, nargs="?", default=DEFAULT)
    parser.add_argument("--show", action="store_true", help="print the rewritten and refused")
    args = parser.parse_args()
    if not args.path.exists():
        print(f"{args.path} not found (Debian package nmap)", file=sys.stderr)
        return 2
    rules = list(tcp_patterns(args.path.read_text(encoding="latin-1")))
    started = time.monotonic()
    counts: Counter[str] = Counter()
    for pattern, options in rules:
        kind = classify(pattern, options)
        counts[kind] += 1
        if args.show and kind != "unchanged":
            print(f"{kind:<10} {pattern}")
    elapsed = time.monotonic() - started
    print(f"{len(rules)} TCP match/softmatch rules in {args.path} ({elapsed:.1f} s)")
    rewritten = counts["rewritten"] + counts["braces"]
    print(f"  unchanged  {counts['unchanged']:>6}")
    print(f"  rewritten  {rewritten:>6}  ({counts['braces']} of them only for literal braces)")
    print(f"  refused    {counts['refused']:>6}")
    native = sum(compiles_in_re(pattern, options) for pattern, options in rules)
    print(f"  (Python's re compiles {native} of them as written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
