"""A plain socket client for Airlock's privileged tests (stdlib only, run with /usr/bin/python3).

usage: client.py HOST PORT [--udp | --fastopen] [--pause SECONDS] [--message TEXT] [--source-port N]
                 [--mark N] [--linger]

--fastopen sends the first bytes with the SYN (sendto with MSG_FASTOPEN, no connect()).
--mark sets SO_MARK on the socket before connecting (needs CAP_NET_RAW or CAP_NET_ADMIN); the
mark read back is printed as "mark".

Connects, sends one line, half-closes, reads to EOF and prints one JSON object:
{"pid", "local", "peer", "response"} or {"pid", "error", "errno"}.
--linger: then stays alive until its stdin ends (the test decides when the process is gone).
"""
import json
import os
import socket
import struct
import sys
import time


def main():
    args = sys.argv[1:]
    host, port = args[0], int(args[1])
    udp = "--udp" in args
    fastopen = "--fastopen" in args
    pause = float(args[args.index("--pause") + 1]) if "--pause" in args else 0.0
    message = args[args.index("--message") + 1] if "--message" in args else "hello"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    out = {"pid": os.getpid()}
    sock = socket.socket(family, kind)
    sock.settimeout(10)
    if "--mark" in args:
        so_mark = 36
        mark = int(args[args.index("--mark") + 1], 0)
        sock.setsockopt(socket.SOL_SOCKET, so_mark, struct.pack("I", mark))
        out["mark"] = struct.unpack("I", sock.getsockopt(socket.SOL_SOCKET, so_mark, 4))[0]
    if "--source-port" in args:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", int(args[args.index("--source-port") + 1])))
    try:
        if fastopen:
            # A socket with a timeout is non-blocking underneath: sendto would say EINPROGRESS.
            sock.settimeout(None)
            sock.sendto((message + "\n").encode(), socket.MSG_FASTOPEN, (host, port))
            sock.settimeout(10)
        else:
            sock.connect((host, port))
        out["local"] = [sock.getsockname()[0], sock.getsockname()[1]]
        out["peer"] = [sock.getpeername()[0], sock.getpeername()[1]]
        if not udp:
            if pause:
                time.sleep(pause)
            if not fastopen:
                sock.sendall((message + "\n").encode())
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            out["response"] = data.decode()
    except OSError as e:
        out["error"] = type(e).__name__
        out["errno"] = e.errno
    print(json.dumps(out), flush=True)
    if "--linger" in args:
        sys.stdin.read()


if __name__ == "__main__":
    main()
