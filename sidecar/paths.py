"""One canonical request path, sans-IO: what routing, format detection, attribution, metering
and the upstream all see (RFC 3986 section 6.2.2 normalization, like Envoy's normalize_path and
merge_slashes).

- percent-encoded unreserved characters are decoded (``%2e`` is ``.``, ``%41`` is ``A``), other
  escapes get upper-case hex;
- dot-segments are removed (RFC 3986 section 5.2.4) and repeated slashes merged;
- an encoded slash or backslash (``%2F``, ``%5C``), a raw backslash, or an encoded NUL is an
  error by default (a server behind may decode it into a separator the routing never saw), or
  kept as is with ``escaped_slashes: keep``;
- a path whose dot-segments climb above the root is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPES = frozenset({"2F", "5C", "00"})

KEEP = "keep"
REJECT = "reject"


class PathError(ValueError):
    """A request path the sidecar will not route (the message is safe to show the client)."""


@dataclass(frozen=True, slots=True)
class Canonical:
    path: str  # still percent-encoded where it must be; what the upstream receives
    decoded: str  # before dot-segments were removed (to tell whether they changed the route)

    @property
    def changed(self) -> bool:
        return self.path != self.decoded


def _unescape_unreserved(m: re.Match[str]) -> str:
    hexes = m.group(1).upper()
    byte = int(hexes, 16)
    return chr(byte) if byte in _UNRESERVED else "%" + hexes


def remove_dot_segments(path: str) -> tuple[str, bool]:
    """RFC 3986 section 5.2.4 on an absolute path, merging empty segments; also says whether a
    ``..`` had nothing left to remove (the path climbed above the root)."""
    out: list[str] = []
    climbed = False
    segments = path.split("/")
    for i, seg in enumerate(segments[1:], 1):
        last = i == len(segments) - 1
        if seg == "..":
            if out:
                out.pop()
            else:
                climbed = True
            if last:
                out.append("")  # "/a/.." is "/": a trailing slash stays
        elif seg == ".":
            if last:
                out.append("")
        elif seg == "" and not last:
            continue  # "//": merged
        else:
            out.append(seg)
    # Trailing empty segments were kept once only; interior ones were merged.
    result = "/" + "/".join(out)
    return result, climbed


def canonicalize(raw_path: str, escaped_slashes: str = REJECT) -> Canonical:
    """The canonical form of ``raw_path`` (no query string). Raises PathError."""
    if not raw_path.startswith("/"):
        raise PathError("the request path must start with '/'")
    path = raw_path
    if "%" in path:
        escapes = {m.upper() for m in _ESCAPE.findall(path)}
        if escaped_slashes == REJECT and escapes & _BAD_ESCAPES:
            raise PathError("the path holds an encoded slash, backslash or NUL (%2F, %5C, %00), "
                            "which a server behind could read as a separator the routing never "
                            "saw; send it unencoded, or set escaped_slashes: keep")
        path = _ESCAPE.sub(_unescape_unreserved, path)
    if "\\" in path and escaped_slashes == REJECT:
        raise PathError("the path holds a backslash, which some servers read as '/'; "
                        "escape it, or set escaped_slashes: keep")
    decoded = path
    if "/." in path or "//" in path:
        path, climbed = remove_dot_segments(path)
        if climbed:
            raise PathError("the path's '..' segments climb above the root")
    return Canonical(path, decoded)
