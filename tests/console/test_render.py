"""Body decoding and rendering for the request detail view."""

from __future__ import annotations

import gzip
import json
import os
import zlib

import pytest
from rich.console import Console, RenderableType

from console import render
from console.render import (
    HEX_LIMIT,
    PRETTY_LINES,
    BodyInfo,
    decode_body,
    human_duration,
    human_size,
    render_body,
)


def text_of(renderable: RenderableType, width: int = 100) -> str:
    console = Console(record=True, width=width, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def message(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n" + body


def chunked(data: bytes, size: int = 7) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


# --- decode_body ------------------------------------------------------------------------


def test_decode_splits_head_and_parses_headers() -> None:
    info = decode_body(
        message(
            'HTTP/1.1 201 Created\nContent-Type: Application/JSON; charset="UTF-8"\n'
            "X-Long: first\n  folded\nSet-Cookie: a=1\nSet-Cookie: b=2",
            b'{"ok": true}',
        )
    )
    assert info.start_line == "HTTP/1.1 201 Created"
    assert info.content_type == "application/json"
    assert info.charset == "utf-8"
    assert ("X-Long", "first folded") in info.headers
    assert [v for k, v in info.headers if k == "Set-Cookie"] == ["a=1", "b=2"]
    assert info.header("content-type") == 'Application/JSON; charset="UTF-8"'
    assert info.body == b'{"ok": true}'
    assert info.wire_size == len(b'{"ok": true}')
    assert info.notes == []


def test_decode_request_with_bare_lf_and_no_content_type() -> None:
    info = decode_body(b"POST /x HTTP/1.1\nHost: a\n\nhello")
    assert info.start_line == "POST /x HTTP/1.1"
    assert info.headers == [("Host", "a")]
    assert info.body == b"hello"
    assert info.content_type == "" and info.charset is None


def test_decode_skips_interim_100_continue() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\n" + message(
        "HTTP/1.1 200 OK\nContent-Type: text/plain", b"hi"
    )
    info = decode_body(raw)
    assert info.start_line == "HTTP/1.1 200 OK"
    assert info.body == b"hi"


def test_decode_chunked_and_gzip() -> None:
    payload = json.dumps({"items": list(range(50))}).encode()
    raw = message(
        "HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Encoding: gzip\n"
        "Transfer-Encoding: chunked",
        chunked(gzip.compress(payload)),
    )
    info = decode_body(raw)
    assert info.body == payload
    assert info.notes == []
    assert '"items": [' in text_of(render_body(info))


def test_truncated_chunked_gzip_decodes_as_far_as_it_goes() -> None:
    payload = ("".join(f"line {i}\n" for i in range(2000))).encode()
    framed = chunked(gzip.compress(payload), size=100)
    raw = message(
        "HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Encoding: gzip\n"
        "Transfer-Encoding: chunked",
        framed[: len(framed) // 2],
    )
    info = decode_body(raw)
    assert "chunked body truncated" in info.notes
    assert "gzip stream truncated; showing what decoded" in info.notes
    assert info.body and payload.startswith(info.body)
    assert info.wire_size == len(framed) // 2


def test_chunked_cut_inside_a_size_line_and_chunk_extensions() -> None:
    info = decode_body(
        message("HTTP/1.1 200 OK\nTransfer-Encoding: chunked", b"5;ext=1\r\nhello\r\n1")
    )
    assert info.body == b"hello"
    assert info.notes == ["chunked body truncated"]


def test_bad_chunk_size_keeps_the_rest() -> None:
    info = decode_body(
        message("HTTP/1.1 200 OK\nTransfer-Encoding: chunked", b"3\r\nabc\r\nzz\r\nrest")
    )
    assert info.body == b"abczz\r\nrest"
    assert len(info.notes) == 1 and "bad chunk size" in info.notes[0]


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib", "raw"])
def test_deflate_both_flavours(wbits: int) -> None:
    compressor = zlib.compressobj(wbits=wbits)
    data = compressor.compress(b"deflated text") + compressor.flush()
    info = decode_body(message("HTTP/1.1 200 OK\nContent-Encoding: deflate", data))
    assert info.body == b"deflated text"
    assert info.notes == []


def test_bad_gzip_is_kept_raw_with_a_note() -> None:
    info = decode_body(message("HTTP/1.1 200 OK\nContent-Encoding: gzip", b"not gzip at all"))
    assert info.body == b"not gzip at all"
    assert len(info.notes) == 1 and info.notes[0].startswith("could not decode gzip")


def test_stacked_encodings_are_undone_in_reverse() -> None:
    inner = zlib.compress(b"twice")
    info = decode_body(
        message("HTTP/1.1 200 OK\nContent-Encoding: deflate, gzip", gzip.compress(inner))
    )
    assert info.body == b"twice"


def test_unknown_and_unavailable_encodings_are_noted(monkeypatch: pytest.MonkeyPatch) -> None:
    info = decode_body(message("HTTP/1.1 200 OK\nContent-Encoding: zstd", b"\x28\xb5\x2f\xfd"))
    assert info.body == b"\x28\xb5\x2f\xfd"
    assert info.notes == ["content-encoding 'zstd' not supported; shown as captured"]
    monkeypatch.setattr(render, "_brotli_decompress", None)
    info = decode_body(message("HTTP/1.1 200 OK\nContent-Encoding: br", b"\x0b\x02\x80"))
    assert info.body == b"\x0b\x02\x80"
    assert len(info.notes) == 1 and "brotli" in info.notes[0]


def test_brotli_is_used_when_a_module_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "_brotli_decompress", lambda data: data[::-1])
    info = decode_body(message("HTTP/1.1 200 OK\nContent-Encoding: br", b"olleh"))
    assert info.body == b"hello"


def test_incomplete_head_and_garbage_never_raise() -> None:
    info = decode_body(b"HTTP/1.1 200 OK\r\nContent-Ty")
    assert info.body == b""
    assert info.notes == ["message head incomplete"]
    for junk in (b"", b"\r\n\r\n", b"\x00\xff" * 50, b"GET\r\n\r\n\r\n\r\n"):
        decode_body(junk)


# --- render_body: pretty ----------------------------------------------------------------


def test_pretty_json_is_indented() -> None:
    info = decode_body(
        message("HTTP/1.1 200 OK\nContent-Type: application/problem+json", b'{"a":[1,{"b":null}]}')
    )
    out = text_of(render_body(info))
    assert out == '{\n  "a": [\n    1,\n    {\n      "b": null\n    }\n  ]\n}\n'


def test_pretty_json_is_highlighted() -> None:
    console = Console(record=True, width=100, color_system="standard", file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render_body(BodyInfo(body=b'{"a": 1}', content_type="application/json")))
    assert "\x1b[" in console.export_text(styles=True)


def test_invalid_or_cut_json_is_shown_as_captured() -> None:
    out = text_of(render_body(BodyInfo(body=b'{"a": [1, 2', content_type="application/json")))
    assert out.splitlines() == ["⚠ not valid JSON; shown as captured", '{"a": [1, 2']


def test_json_is_sniffed_without_a_content_type() -> None:
    out = text_of(render_body(BodyInfo(body=b'[{"x":1}]')))
    assert '    "x": 1' in out


def test_xml_is_pretty_indented() -> None:
    out = text_of(
        render_body(BodyInfo(body=b'<a><b>1</b>\n  <c x="y"/></a>', content_type="text/xml"))
    )
    assert out == '<a>\n  <b>1</b>\n  <c x="y"/>\n</a>\n'


def test_xml_keeps_its_declaration_and_broken_xml_is_shown_as_is() -> None:
    out = text_of(
        render_body(
            BodyInfo(body=b'<?xml version="1.0"?><r><i/></r>', content_type="application/soap+xml")
        )
    )
    assert out.splitlines()[0].startswith("<?xml")
    assert "  <i/>" in out
    assert (
        text_of(render_body(BodyInfo(body=b"<r><i></r>", content_type="application/xml")))
        == "<r><i></r>\n"
    )


def test_html_is_highlighted_not_reformatted() -> None:
    html = b"<!doctype html><html><body><p>hi</p></body></html>"
    out = text_of(render_body(BodyInfo(body=html, content_type="text/html")))
    assert out == html.decode() + "\n"


def test_form_is_a_key_value_table() -> None:
    body = b"name=Ada+Lovelace&lang=%E2%9C%93&empty=&name=again"
    out = text_of(
        render_body(BodyInfo(body=body, content_type="application/x-www-form-urlencoded"))
    )
    rows = [line.strip().split(maxsplit=1) for line in out.splitlines()]
    assert rows[0] == ["key", "value"]
    assert ["name", "Ada Lovelace"] in rows
    assert ["lang", "✓"] in rows
    assert ["empty"] in rows
    assert ["name", "again"] in rows


def test_plain_text_is_text_with_control_characters_escaped() -> None:
    out = text_of(
        render_body(BodyInfo(body=b"hello\r\nworld \x1b[31mred\x07", content_type="text/plain"))
    )
    assert out == "hello\nworld \\e[31mred\\x07\n"


def test_text_cut_inside_a_utf8_character_is_still_text() -> None:
    body = "naïve café ✓".encode()[:-1]
    out = text_of(render_body(BodyInfo(body=body, content_type="text/plain", charset="utf-8")))
    assert out == "naïve café \n"


def test_declared_charset_is_used() -> None:
    out = text_of(
        render_body(
            BodyInfo(body="café".encode("latin-1"), content_type="text/plain", charset="iso-8859-1")
        )
    )
    assert out == "café\n"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 8),
        ("application/octet-stream", b"plain ascii but declared binary"),
        ("text/plain", b"\xff\xfe\xfa not utf-8"),
        ("", b"\x00\x01\x02\x03"),
    ],
)
def test_binary_falls_back_to_hex(content_type: str, body: bytes) -> None:
    out = text_of(render_body(BodyInfo(body=body, content_type=content_type)))
    assert "00000000  " in out
    assert "|" in out


def test_empty_body() -> None:
    assert text_of(render_body(BodyInfo())) == "(no body)\n"
    assert text_of(render_body(BodyInfo(), mode="hex")) == "(no body)\n"
    out = text_of(render_body(BodyInfo(), truncated=True, full_size=10))
    assert out.splitlines() == ["⚠ body truncated: captured 0 B of 10 B", "(no body)"]


def test_truncation_is_the_first_line() -> None:
    body = b"x" * (64 * 1024)
    info = BodyInfo(body=body, content_type="text/plain", wire_size=len(body))
    out = text_of(render_body(info, truncated=True, full_size=20 * 1024 * 1024))
    assert out.splitlines()[0] == "⚠ body truncated: captured 64.0 KiB of 20.0 MiB"
    out = text_of(render_body(info, mode="hex", truncated=True))
    assert out.splitlines()[0] == "⚠ body truncated: captured 64.0 KiB"


def test_truncated_gzip_capture_reports_wire_bytes_and_notes() -> None:
    payload = json.dumps([{"n": i} for i in range(3000)]).encode()
    compressed = gzip.compress(payload)
    raw = message(
        "HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Encoding: gzip", compressed[:2000]
    )
    out = text_of(render_body(decode_body(raw), truncated=True, full_size=len(compressed)))
    lines = out.splitlines()
    assert lines[0] == f"⚠ body truncated: captured 2.0 KiB of {human_size(len(compressed))}"
    assert "⚠ gzip stream truncated; showing what decoded" in lines
    assert "⚠ not valid JSON; shown as captured" in lines
    assert any(line.startswith('[{"n": 0}') for line in lines)


def test_big_json_is_capped() -> None:
    # (speed is measured in tests/benchmarks/bench_console.py, never asserted here)
    body = json.dumps(
        [{"id": i, "name": f"item {i}", "tags": ["a", "b"]} for i in range(20000)]
    ).encode()
    assert len(body) > 1024 * 1024 * 0.8
    out = text_of(render_body(BodyInfo(body=body, content_type="application/json")))
    lines = out.splitlines()
    assert lines[0].startswith(f"⚠ pretty view shows only the first {PRETTY_LINES:,} lines")
    assert len(lines) == PRETTY_LINES + 1


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown render mode"):
        render_body(BodyInfo(body=b"x"), mode="fancy")


# --- render_body: raw and hex -----------------------------------------------------------


def test_raw_shows_the_body_unformatted_with_escapes() -> None:
    body = b'{"a":1}\r\n\x00\xff'
    out = text_of(render_body(BodyInfo(body=body, content_type="application/json"), mode="raw"))
    assert out == '{"a":1}\n\\0\\xff\n'


def test_hex_layout() -> None:
    out = text_of(render_body(BodyInfo(body=b"Hello, hex world!\x00\x01\x7f"), mode="hex"))
    assert out.splitlines() == [
        "00000000  48 65 6c 6c 6f 2c 20 68  65 78 20 77 6f 72 6c 64  |Hello, hex world|",
        "00000010  21 00 01 7f                                       |!...|",
    ]


def test_hex_of_a_big_body_shows_the_first_64_kib() -> None:
    body = bytes(range(256)) * (HEX_LIMIT // 256 + 400)
    out = text_of(render_body(BodyInfo(body=body), mode="hex"))
    lines = out.splitlines()
    assert len(lines) == HEX_LIMIT // 16 + 1
    assert lines[-2].startswith(f"{HEX_LIMIT - 16:08x}  f0 f1")
    more = len(body) - HEX_LIMIT
    assert lines[-1] == f"… {human_size(more)} more ({more:,} bytes) not shown"


# --- sizes and durations ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (64 * 1024, "64.0 KiB"),
        (1024 * 1024 - 1, "1.0 MiB"),
        (20 * 1024 * 1024, "20.0 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (5 * 1024**5, "5120.0 TiB"),
    ],
)
def test_human_size(n: int, expected: str) -> None:
    assert human_size(n) == expected


@pytest.mark.parametrize(
    ("ns", "expected"),
    [
        (0, "0ns"),
        (850, "850ns"),
        (850_000, "850µs"),
        (999_600, "1.0ms"),
        (12_300_000, "12.3ms"),
        (999_960_000, "1.00s"),
        (1_240_000_000, "1.24s"),
        (59_999_000_000, "1m00s"),
        (125_000_000_000, "2m05s"),
        (3_720_000_000_000, "1h02m"),
    ],
)
def test_human_duration(ns: int, expected: str) -> None:
    assert human_duration(ns) == expected
