"""Turn captured HTTP messages into Rich renderables for the request detail view.

Captures are raw HTTP/1.1 bytes, often cut short by the capture limit, so everything
here is tolerant: a truncated chunked or gzip body decodes as far as it goes, a body
that fails to decode is shown as captured with a note, and nothing raises on bad input.
Rendering is bounded so a large body never stalls the UI.
"""

from __future__ import annotations

import codecs
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Span, Text

__all__ = [
    "FORM_ROWS",
    "HEX_LIMIT",
    "JSON_FORMAT_LIMIT",
    "PRETTY_LIMIT",
    "PRETTY_LINES",
    "RAW_LIMIT",
    "XML_FORMAT_LIMIT",
    "BodyInfo",
    "RenderMode",
    "decode_body",
    "human_duration",
    "human_size",
    "plural",
    "render_body",
]

RenderMode = Literal["pretty", "raw", "hex"]

PRETTY_LIMIT = 256 * 1024
"""Most characters the pretty view shows (after re-formatting)."""
PRETTY_LINES = 5_000
"""Most lines the pretty view shows; laying out highlighted lines is the slow part."""
FORM_ROWS = 1_000
"""Most form fields the pretty view tabulates."""
JSON_FORMAT_LIMIT = 4 * 1024 * 1024
"""Largest JSON body that is parsed and re-indented (json is fast)."""
XML_FORMAT_LIMIT = 256 * 1024
"""Largest XML body that is parsed and re-indented (minidom is slow and memory-hungry)."""
RAW_LIMIT = 1024 * 1024
"""Most bytes the raw view shows."""
HEX_LIMIT = 64 * 1024
"""Most bytes the hex view dumps."""
DECODE_LIMIT = 32 * 1024 * 1024
"""Most bytes a Content-Encoding may expand to (guards against decompression bombs)."""

_TRUNCATED_STYLE = "bold yellow"
_NOTE_STYLE = "yellow"
_ESCAPE_STYLE = "dim"
_OFFSET_STYLE = "dim"

_BINARY_TYPES = {
    "application/octet-stream",
    "application/pdf",
    "application/zip",
    "application/gzip",
    "application/x-gzip",
    "application/x-tar",
    "application/x-7z-compressed",
    "application/wasm",
    "application/grpc",
    "application/protobuf",
    "application/x-protobuf",
    "application/vnd.google.protobuf",
    "application/msgpack",
    "application/x-msgpack",
    "application/cbor",
}
_BINARY_PREFIXES = ("image/", "audio/", "video/", "font/")
_SYNTAX_BY_TYPE = {
    "text/css": "css",
    "text/javascript": "javascript",
    "application/javascript": "javascript",
    "application/x-javascript": "javascript",
    "application/yaml": "yaml",
    "application/x-yaml": "yaml",
    "text/yaml": "yaml",
    "text/x-yaml": "yaml",
    "text/markdown": "markdown",
    "application/graphql": "graphql",
    "application/sql": "sql",
    "text/csv": "text",
}


@dataclass
class BodyInfo:
    """A captured message split into head and decoded body, with notes on what happened."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    content_type: str = ""
    """Media type, lower case, without parameters (``""`` when absent)."""
    charset: str | None = None
    notes: list[str] = field(default_factory=list)
    """Human-readable remarks about decoding (truncated gzip, unknown encoding, ...)."""
    start_line: str = ""
    """The request or status line, e.g. ``GET / HTTP/1.1``."""
    wire_size: int = 0
    """Body bytes as captured, before de-chunking and decompression."""

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        for key, value in reversed(self.headers):
            if key.lower() == wanted:
                return value
        return None


# --- decoding -------------------------------------------------------------------------


def _split_head(raw: bytes) -> tuple[bytes, bytes, bool]:
    """Split at the blank line; return ``(head, body, complete)``."""
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n")
    if crlf != -1 and (lf == -1 or crlf < lf):
        return raw[:crlf], raw[crlf + 4 :], True
    if lf != -1:
        return raw[:lf], raw[lf + 2 :], True
    return raw, b"", False


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Parse the start line and header fields, folding obsolete continuation lines."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    start_line = lines[0].strip() if lines else ""
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        if sep and name.strip():
            headers.append((name.strip(), value.strip()))
    return start_line, headers


def _tokens(values: list[str]) -> list[str]:
    """Comma-separated tokens from every value of a list header, lower case."""
    return [t.strip().lower() for value in values for t in value.split(",") if t.strip()]


def _dechunk(data: bytes, notes: list[str]) -> bytes:
    """Undo chunked framing as far as the bytes go; note truncation or bad framing."""
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\n", pos)
        if eol == -1:
            notes.append("chunked body truncated")
            break
        size_text = data[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            notes.append(f"bad chunk size at byte {pos}; rest shown as captured")
            out += data[pos:]
            break
        start = eol + 1
        if size == 0:
            break
        chunk = data[start : start + size]
        out += chunk
        if len(chunk) < size:
            notes.append("chunked body truncated")
            break
        pos = start + size
        if data.startswith(b"\r\n", pos):
            pos += 2
        elif data.startswith(b"\n", pos):
            pos += 1
    return bytes(out)


def _zlib_decode(data: bytes, wbits: int) -> tuple[bytes, bool]:
    """Inflate ``data``; return ``(output, complete)``.  Raises ``zlib.error``."""
    decoder = zlib.decompressobj(wbits)
    out = decoder.decompress(data, DECODE_LIMIT)
    if decoder.unconsumed_tail:
        raise zlib.error(f"expands past {human_size(DECODE_LIMIT)}")
    return out, decoder.eof


def _gunzip(data: bytes) -> tuple[bytes, bool]:
    return _zlib_decode(data, 16 + zlib.MAX_WBITS)


def _inflate(data: bytes) -> tuple[bytes, bool]:
    # "deflate" should be zlib-wrapped, but plenty of servers send raw deflate.
    try:
        return _zlib_decode(data, zlib.MAX_WBITS)
    except zlib.error:
        return _zlib_decode(data, -zlib.MAX_WBITS)


def _load_brotli() -> Callable[[bytes], bytes] | None:
    try:
        import brotli  # type: ignore[import-not-found]
    except ImportError:
        try:
            import brotlicffi as brotli  # type: ignore[import-not-found]
        except ImportError:
            return None
    return brotli.decompress


_brotli_decompress = _load_brotli()


def _unbrotli(data: bytes) -> tuple[bytes, bool]:
    if _brotli_decompress is None:
        raise LookupError("brotli support is not installed")
    try:
        return _brotli_decompress(data), True
    except Exception as exc:  # brotli raises its own error type
        raise zlib.error(str(exc)) from None


_DECODERS: dict[str, Callable[[bytes], tuple[bytes, bool]]] = {
    "gzip": _gunzip,
    "x-gzip": _gunzip,
    "deflate": _inflate,
    "br": _unbrotli,
}


def _undo_codings(body: bytes, codings: list[str], notes: list[str]) -> bytes:
    """Undo content codings (applied in order, so undone in reverse); stop at a failure."""
    for coding in reversed(codings):
        if coding == "identity":
            continue
        decoder = _DECODERS.get(coding)
        if decoder is None:
            notes.append(f"content-encoding {coding!r} not supported; shown as captured")
            break
        try:
            decoded, complete = decoder(body)
        except LookupError as exc:
            notes.append(f"{coding}: {exc}; shown as captured")
            break
        except zlib.error as exc:
            notes.append(f"could not decode {coding} ({exc}); shown as captured")
            break
        if not complete:
            notes.append(f"{coding} stream truncated; showing what decoded")
        body = decoded
    return body


def _media_type(value: str | None) -> tuple[str, str | None]:
    """``("application/json", "utf-8")`` from a Content-Type value."""
    if not value:
        return "", None
    media, *params = value.split(";")
    charset = None
    for param in params:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip():
            charset = val.strip().strip("\"'").lower()
    return media.strip().lower(), charset


def decode_body(raw_message: bytes) -> BodyInfo:
    """Split a captured HTTP/1.1 message and decode its body for display.

    Undoes ``Transfer-Encoding: chunked`` and ``Content-Encoding`` gzip/deflate (and br
    when a brotli module is installed).  Never raises: truncated framing decodes as far
    as it goes and anything undecodable is kept as captured, with a note saying why.
    """
    notes: list[str] = []
    head, body, complete = _split_head(raw_message)
    start_line, headers = _parse_head(head)
    # Skip interim 1xx responses (e.g. 100 Continue) to reach the final one.
    while (
        re.match(r"HTTP/\d(\.\d)? 1\d\d\b", start_line)
        and start_line.split()[1] != "101"
        and body.startswith(b"HTTP/")
    ):
        head, body, complete = _split_head(body)
        start_line, headers = _parse_head(head)
    if not complete:
        notes.append("message head incomplete")
    info = BodyInfo(headers=headers, start_line=start_line, wire_size=len(body), notes=notes)

    transfer = _tokens([v for k, v in headers if k.lower() == "transfer-encoding"])
    if transfer and transfer[-1] == "chunked":
        body = _dechunk(body, notes)
        transfer = transfer[:-1]
    content = _tokens([v for k, v in headers if k.lower() == "content-encoding"])
    # Transfer codings other than chunked are rare but undone the same way.
    body = _undo_codings(body, content + transfer, notes) if body else body

    info.body = body
    info.content_type, info.charset = _media_type(info.header("content-type"))
    return info


# --- sizes and durations --------------------------------------------------------------


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 request``, ``2 requests``, ``1,024 requests``; ``many`` for irregular words."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def human_size(n: int) -> str:
    """``0 B``, ``512 B``, ``1.5 KiB``, ``20.0 MiB`` — binary units, one decimal."""
    if n < 0:
        return f"-{human_size(-n)}"
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if round(value, 1) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_duration(ns: int) -> str:
    """``850ns``, ``850µs``, ``12.3ms``, ``1.24s``, ``2m05s``, ``1h02m`` from nanoseconds."""
    if ns < 0:
        return f"-{human_duration(-ns)}"
    if ns < 1_000:
        return f"{ns}ns"
    if round(ns / 1_000) < 1_000:
        return f"{ns / 1_000:.0f}µs"
    if round(ns / 1_000_000, 1) < 1_000:
        return f"{ns / 1_000_000:.1f}ms"
    if round(ns / 1e9, 2) < 60:
        return f"{ns / 1e9:.2f}s"
    seconds = round(ns / 1e9)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    minutes = seconds // 60
    return f"{minutes // 60}h{minutes % 60:02d}m"


# --- rendering ------------------------------------------------------------------------

# C0 controls except tab and newline, DEL, and C1 controls: never send these to a terminal.
_CONTROL = re.compile(r"\r\n|[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_ESCAPES = {"\r": "\\r", "\x1b": "\\e", "\x00": "\\0"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\r\n":
        return "\n"
    return _ESCAPES.get(char) or f"\\x{ord(char):02x}"


def _escape_controls(text: str) -> str:
    """Replace control characters with visible escapes (CRLF becomes a newline)."""
    return _CONTROL.sub(_escape, text)


def _escaped_text(text: str) -> Text:
    """Text with control characters shown as dim escapes, so they stand out from data."""
    pieces: list[str] = []
    spans: list[Span] = []
    pos = length = 0
    for match in _CONTROL.finditer(text):
        pieces.append(text[pos : match.start()])
        length += match.start() - pos
        replacement = _escape(match)
        pieces.append(replacement)
        if replacement != "\n":
            spans.append(Span(length, length + len(replacement), _ESCAPE_STYLE))
        length += len(replacement)
        pos = match.end()
    pieces.append(text[pos:])
    return Text("".join(pieces), spans=spans)


def _decode_text(data: bytes, charset: str | None, notes: list[str]) -> str | None:
    """Decode as text, tolerating a multi-byte character cut at the end; ``None`` if binary."""
    encoding = charset or "utf-8"
    if b"\x00" in data[:8192] and not encoding.startswith(("utf-16", "utf-32", "utf16", "utf32")):
        return None
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        notes.append(f"unknown charset {charset!r}; decoding as utf-8")
        decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        return decoder.decode(data, final=False)
    except UnicodeDecodeError:
        return None


def _is_binary_type(content_type: str) -> bool:
    return content_type in _BINARY_TYPES or content_type.startswith(_BINARY_PREFIXES)


def _kind(content_type: str, text: str) -> str:
    """Pick a pretty-printer from the media type, sniffing when there is none."""
    if content_type in ("application/x-ndjson", "application/jsonl", "application/json-seq"):
        return "ndjson"
    if content_type.endswith(("/json", "+json")):
        return "json"
    if content_type in ("text/html", "application/xhtml+xml"):
        return "html"
    if content_type.endswith(("/xml", "+xml")):
        return "xml"
    if content_type == "application/x-www-form-urlencoded":
        return "form"
    if content_type in _SYNTAX_BY_TYPE:
        return "syntax"
    if not content_type:
        stripped = text.lstrip()[:1]
        if stripped in ("{", "["):
            return "json"
        if stripped == "<":
            return (
                "html" if text.lstrip()[:15].lower().startswith(("<!doctype", "<html")) else "xml"
            )
    return "text"


def _cap(text: str) -> tuple[str, str | None]:
    """Cut ``text`` to the pretty view's size and line limits; say why when it was cut.

    Rich's rendering time grows with lines and highlighted spans, so both are bounded.
    """
    cut = len(text)
    if cut > PRETTY_LIMIT:
        newline = text.rfind("\n", 0, PRETTY_LIMIT)
        cut = newline if newline > PRETTY_LIMIT // 2 else PRETTY_LIMIT
    if text.count("\n", 0, cut) >= PRETTY_LINES:
        pos = -1
        for _ in range(PRETTY_LINES):
            pos = text.find("\n", pos + 1)
        cut = pos
    if cut == len(text):
        return text, None
    shown = text[:cut]
    lines = shown.count("\n") + 1
    return shown, (
        f"pretty view shows only the first {lines:,} lines ({human_size(len(shown))}); "
        "raw shows more"
    )


def _pretty_json(text: str) -> str | None:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):  # invalid, absurdly deep, or an over-long int
        return None


def _pretty_xml(data: bytes, text: str) -> str | None:
    # Imported here, as is rich.syntax below: the list view needs this module's
    # human_size, not these (~10 ms of imports before the console's first frame).
    from xml.dom import minidom
    from xml.parsers.expat import ExpatError

    try:
        pretty = minidom.parseString(data).toprettyxml(indent="  ")
    except (ExpatError, ValueError, RecursionError):
        return None
    # minidom keeps the original whitespace as text nodes; drop the blank lines they leave.
    lines = [line for line in pretty.splitlines() if line.strip()]
    if lines and lines[0].startswith("<?xml") and not text.lstrip().startswith("<?xml"):
        lines = lines[1:]
    return "\n".join(lines)


def _highlight(code: str, lexer: str, theme: str) -> Text:
    """Syntax-highlight ``code`` into a plain Text (cheaper to render than ``Syntax``)."""
    from rich.syntax import Syntax

    code = _escape_controls(code)
    text = Syntax(code, lexer, theme=theme).highlight(code)
    text.rstrip()
    text.style = ""  # no background: let the widget's own show through
    return text


def _form_table(text: str, notes: list[str]) -> Table:
    """A urlencoded form as a key/value table (first :data:`FORM_ROWS` fields)."""
    pairs = parse_qsl(text, keep_blank_values=True)
    if len(pairs) > FORM_ROWS:
        notes.append(f"pretty view shows only the first {FORM_ROWS:,} of {len(pairs):,} fields")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    table.add_column("key", style="bold", overflow="fold")
    table.add_column("value", overflow="fold")
    for key, value in pairs[:FORM_ROWS]:
        table.add_row(_escaped_text(key), _escaped_text(value))
    return table


def _pretty(info: BodyInfo, theme: str, notes: list[str]) -> RenderableType:
    body = info.body
    if _is_binary_type(info.content_type):
        return _hex(body)
    text = _decode_text(body, info.charset, notes)
    if text is None:
        notes.append("body is not text; shown as hex")
        return _hex(body)

    kind = _kind(info.content_type, text)
    formatted: str | None = None
    if kind == "json" and len(body) <= JSON_FORMAT_LIMIT:
        formatted = _pretty_json(text)
        if formatted is None:
            notes.append("not valid JSON; shown as captured")
    elif kind == "xml" and len(body) <= XML_FORMAT_LIMIT:
        formatted = _pretty_xml(body, text)
    shown, cap_note = _cap(formatted if formatted is not None else text)
    if cap_note:
        notes.append(cap_note)

    if kind in ("json", "ndjson"):
        return _highlight(shown, "json", theme)
    if kind in ("html", "xml"):
        return _highlight(shown, kind, theme)
    if kind == "syntax":
        return _highlight(shown, _SYNTAX_BY_TYPE[info.content_type], theme)
    if kind == "form":
        return _form_table(shown, notes)
    return _escaped_text(shown)


def _raw(info: BodyInfo, notes: list[str]) -> Text:
    encoding = info.charset or "utf-8"
    try:
        codecs.lookup(encoding)
    except LookupError:
        encoding = "utf-8"
    # Binary bodies turn into a wall of escapes that is slow to lay out; show less of them.
    limit = RAW_LIMIT if _decode_text(info.body[:8192], encoding, []) is not None else HEX_LIMIT
    if len(info.body) > limit:
        notes.append(
            f"raw view shows the first {human_size(limit)} of {human_size(len(info.body))}"
        )
    return _escaped_text(info.body[:limit].decode(encoding, errors="backslashreplace"))


_PRINTABLE = bytes(b if 0x20 <= b < 0x7F else 0x2E for b in range(256))


def _hex(data: bytes) -> Text:
    """``hexdump -C`` style lines: offset, two groups of eight bytes, and ``|ascii|``."""
    shown = data[:HEX_LIMIT]
    lines: list[str] = []
    spans: list[Span] = []
    length = 0
    for offset in range(0, len(shown), 16):
        row = shown[offset : offset + 16]
        left, right = row[:8].hex(" "), row[8:].hex(" ")
        ascii_part = row.translate(_PRINTABLE).decode("ascii")
        line = f"{offset:08x}  {left:<23}  {right:<23}  |{ascii_part}|"
        spans.append(Span(length, length + 8, _OFFSET_STYLE))
        lines.append(line)
        length += len(line) + 1
    if len(data) > HEX_LIMIT:
        more = len(data) - HEX_LIMIT
        footer = f"… {human_size(more)} more ({more:,} bytes) not shown"
        spans.append(Span(length, length + len(footer), _NOTE_STYLE))
        lines.append(footer)
    return Text("\n".join(lines), spans=spans)


def render_body(
    info: BodyInfo,
    mode: str = "pretty",
    truncated: bool = False,
    full_size: int | None = None,
    theme: str = "ansi_dark",
) -> RenderableType:
    """Render a decoded body for the detail view.

    ``mode`` is ``pretty`` (JSON/XML re-formatted and highlighted, HTML highlighted, forms
    as a table, text as text, binary as hex), ``raw`` (text with visible escapes) or
    ``hex``.  ``truncated`` and ``full_size`` describe the capture and put a warning on
    the first line; ``theme`` is a Rich/Pygments syntax theme (``ansi_dark`` keeps to
    the terminal's own 16 colours).
    """
    notes = list(info.notes)
    if not info.body:
        body: RenderableType = Text("(no body)", style="dim")
    elif mode == "hex":
        body = _hex(info.body)
    elif mode == "raw":
        body = _raw(info, notes)
    elif mode == "pretty":
        body = _pretty(info, theme, notes)
    else:
        raise ValueError(f"unknown render mode {mode!r}; expected pretty, raw or hex")

    lines: list[RenderableType] = []
    if truncated:
        captured = human_size(info.wire_size or len(info.body))
        of = f" of {human_size(full_size)}" if full_size is not None else ""
        lines.append(Text(f"⚠ body truncated: captured {captured}{of}", style=_TRUNCATED_STYLE))
    lines.extend(Text(f"⚠ {note}", style=_NOTE_STYLE) for note in notes)
    if not lines:
        return body
    return Group(*lines, body)
