"""JSON text exactly as Go's ``encoding/json`` writes it, for bytes that must equal c/image's.

Owns: Go's string escaping (HTML-safe: ``<``, ``>``, ``&``, U+2028/2029; control characters as
``\\u00XX``; a lone surrogate, which Go's decoder turned into U+FFFD, as U+FFFD) and a
``map[string]string`` (keys sorted by their UTF-8 bytes). Must not know: what the JSON means.
"""

from __future__ import annotations

import re

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


# a string Go writes as it is: nothing escaped or replaced (most digests, media types, names)
_VERBATIM = re.compile('[^"\\\\<>&\u2028\u2029\x00-\x1f\ud800-\udfff]*')


def string(value: str) -> bytes:
    """A JSON string as Go's ``json.Marshal`` writes it."""
    if _VERBATIM.fullmatch(value):
        return b'"' + value.encode("utf-8") + b'"'
    out = []
    for ch in value:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(ch)
    return ('"' + "".join(out) + '"').encode("utf-8")


def string_map(values: dict[str, str]) -> bytes:
    """A ``map[string]string`` as Go writes it: keys sorted by their UTF-8 bytes."""
    items = sorted(values.items(), key=lambda kv: kv[0].encode("utf-8", "surrogatepass"))
    return b"{" + b",".join(string(k) + b":" + string(v) for k, v in items) + b"}"
