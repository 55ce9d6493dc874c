"""imgfs.gojson: strings exactly as Go's encoding/json writes them, on the verbatim fast path
and off it."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from imgfs import gojson

_GO_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_HTML = "<>&\u2028\u2029"


def _go(value: str) -> bytes:
    """Go's encodeState.string with escapeHTML, one character at a time (the reference)."""
    out = []
    for ch in value:
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ord(ch) < 0x20 or ch in _HTML:
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\ufffd")  # Go's decoder already made a lone surrogate U+FFFD
        else:
            out.append(ch)
    return ('"' + "".join(out) + '"').encode("utf-8")


_SPECIAL = list(_GO_ESCAPES) + list(_HTML) + ["\x00", "\x08", "\x0c", "\x1f", "\x7f", "\ud800"]


def test_every_special_character_is_written_as_go_writes_it() -> None:
    for ch in _SPECIAL:
        for value in (ch, f"a{ch}", f"{ch}b", f"sha256:{ch}0"):
            assert gojson.string(value) == _go(value), repr(value)


def test_plain_strings_are_written_verbatim() -> None:
    digest = "sha256:" + "0123456789abcdef" * 4
    assert gojson.string(digest) == b'"' + digest.encode() + b'"'
    assert gojson.string("é/ü\U0001f600 x") == '"é/ü\U0001f600 x"'.encode()
    assert gojson.string("") == b'""'


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=st.sampled_from([*_SPECIAL, "a", " ", "é", "\U0001f600", "\udfff"])))
def test_any_string_equals_the_reference(value: str) -> None:
    assert gojson.string(value) == _go(value)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=5))
def test_a_string_map_parses_back_to_itself(values: dict[str, str]) -> None:
    clean = {k: v for k, v in values.items() if not any(0xD800 <= ord(c) <= 0xDFFF for c in k + v)}
    assert json.loads(gojson.string_map(clean)) == clean
