r"""Census client for Airlock's privileged tests: one way per run to open a TCP conversation with HOST:PORT.

Standard library only; run with /usr/bin/python3 (3.11), as root or as another user, e.g.
  setpriv --reuid=65534 --regid=65534 --clear-groups [--inh-caps=+net_raw --ambient-caps=+net_raw] \
      /usr/bin/python3 census.py METHOD HOST PORT [options]

usage: census.py METHOD HOST PORT [--source ADDR] [--source-port N] [--timeout S] [--deadline S]
                 [--iface IFACE] [--dst-mac MAC] [--message TEXT] [--family 4|6] [--uring-socket]
                 [--trick auto|absorber|broadcast|offhost|none]

Sends one line, `hello <METHOD>\n` (or --message TEXT plus a newline), reads the answer (up to 4 KiB: until
EOF, 4 KiB, or 0.3 s of quiet after the first bytes; --timeout S, default 5, for the first byte) and prints ONE
JSON object on stdout (`hold` prints one per exchange):
  {"method", "pid", "ok", "response", "error", "errno", "stage", "local", "peer", ...extras}
ok is true iff a non-empty answer came back. On failure, error is the exception's class name (EOFError: the
peer closed without answering; TimeoutError: no answer in time; DeadlineExceeded: the whole run's --deadline,
default 2*timeout+3 s, ran out), errno its errno (or null), and stage where it happened:
  resolve | socket | setsockopt | bind | listen | connect | send | recv | io_uring_setup | mmap |
  io_uring_enter | fork | child-connect | recv-fd | absorber | syn | ack | done (success)
Exit status: 0 ok, 1 not ok, 2 usage, 3 deadline.  Extras: family, dial (the address dialled), source,
handshake/trick/rst/remote (crafted methods), connect_pid/io_pid (fd-passing), seq (hold), eof, sent, detail.
tfo-sendto's sendto() is its connect: a refusal or timeout there is stage "connect".

Methods
  connect       socket()+connect() to HOST, AF chosen by the address form (127.0.0.1, 0.0.0.0, ::, ::1,
                ::ffff:0.0.0.0, ::ffff:127.0.0.1, 127.0.0.2, an interface address ...); a name (localhost) is
                resolved with getaddrinfo (--family 4|6 to restrict) and each address tried in order.
                --source/--source-port bind first.
  bind-then-connect-unspecified
                bind --source ADDR (default HOST) then connect to the unspecified address of its family
                (0.0.0.0, ::, or ::ffff:0.0.0.0 for a mapped source; HOST itself if it is one of those).
                IPv4: the kernel dials the bound source. IPv6: the kernel dials ::1 (or 127.0.0.1 mapped).
  tfo-sendto    sendto(MSG_FASTOPEN) without connect() (blocking, bounded by SO_SNDTIMEO).
  tfo-connect   setsockopt(TCP_FASTOPEN_CONNECT=30), connect(), send().
  io_uring      IORING_OP_CONNECT, IORING_OP_SEND, IORING_OP_RECV through raw io_uring_setup/io_uring_enter
                syscalls and mmap()ed rings (no liburing). --uring-socket: create the socket with
                IORING_OP_SOCKET too.
  mptcp         socket(AF_INET[6], SOCK_STREAM, IPPROTO_MPTCP=262); falls back to TCP when the peer lacks MPTCP.
  raw-tcp       AF_INET SOCK_RAW IPPROTO_TCP (the kernel writes the IP header; the source must be local).
  raw-hdrincl   AF_INET SOCK_RAW IPPROTO_RAW (IP_HDRINCL) to send, an IPPROTO_TCP raw socket to receive.
  raw6-tcp      AF_INET6 SOCK_RAW IPPROTO_TCP.      raw6-hdrincl: AF_INET6 SOCK_RAW IPPROTO_RAW.
  packet        AF_PACKET SOCK_RAW (bound to lo and --iface, default lo): whole Ethernet+IP+TCP frames, family
                by HOST; answers read on an AF_PACKET SOCK_DGRAM socket on every interface.
                The crafted methods report "handshake": "none" | "syn-ack" | "full" and "trick" (below).
  fd-passing    a forked child connect()s and hands the fd over an AF_UNIX socketpair (SCM_RIGHTS); the
                parent sends and receives on it. Reports connect_pid (child) and io_pid (parent); a failure
                in the child is stage "child-connect" with the child's own stage in child_stage.
  hold          connect, send, read, print the first JSON line at once; then for each line read from stdin
                send it and print a further JSON line with the answer (seq 1, 2, ...); exits at EOF. The
                deadline covers the first exchange only; each later exchange has --timeout.

Crafted handshakes with CAP_NET_RAW only (no CAP_NET_ADMIN, no iptables): what was found on Linux 6.18
  The problem: a SYN sent from a raw or packet socket gets its SYN-ACK, but the SYN-ACK meets the local TCP
  stack, which finds no socket for the 4-tuple and answers with a RST that kills the server's request socket.
  On loopback all of this happens inside the sendto() that sent the SYN, so a hand-made ACK always comes too
  late ("--trick none": "handshake": "syn-ack", "rst": true, which still proves that the SYN reached the
  listener). Four ways around it, each giving a full conversation with an unmodified listening server:
  * "broadcast" (IPv4; raw-hdrincl, or packet to a local non-loopback address): the source is the subnet
    broadcast of the destination's interface (127.255.255.255 for 127/8). The server accepts the SYN: on
    loopback the sender's route is kept, so no martian-source check runs; injected on lo, only a source that
    is an interface address counts as martian. Its answers are routed as RTN_BROADCAST, and
    tcp_v4_send_reset() never answers a segment whose route is not RTN_LOCAL: no RST, ever. accept() reports
    the broadcast address as the peer. For a non-loopback address the answers are also broadcast on that
    interface's segment, so auto uses this only for 127/8. Needs IP_HDRINCL or a packet socket: a
    non-HDRINCL raw socket may only send from a local address (__ip_dev_find), and 127.255.255.255 is not one.
  * "absorber" (IPv4 and IPv6, a local source such as 127.0.0.1, ::1 or the route's source): before the SYN,
    plant an ESTABLISHED kernel socket with the very 4-tuple src:P <-> backend:Q without any connect() to the
    backend. Listen on src:P with backlog 0, spoof a SYN from backend:Q, read the cookie SYN-ACK, and spoof the
    ACK: the cookie makes the kernel build the child. Cookies are needed because a normal request socket
    would be reset by the backend's listener, which answers the SYN-ACK with a RST. Backlog 0 alone does not
    give cookies (the queue counts as full only when qlen > backlog), so first leave one request pending:
    connect() to our own listener (not a backend) and close first, leaving our side in TIME_WAIT. Then spoof
    a SYN from that TIME_WAIT's port. The listener's SYN-ACK meets the TIME_WAIT, which answers with an ACK,
    not a RST, and the request stays queued until its first retransmission, about 1 s. Drain the accept
    queue: once cookies are on, the TIME_WAIT's ACK (seq and ack both one past the FIN) passes as a cookie and
    makes a stray child that would overflow backlog 0. Then send the real SYN. The server's SYN-ACK meets the
    planted socket, which sends a challenge ACK (RFC 5961), not a RST. That ACK fails the server's request
    socket's ACK check and goes to its listener, whose RST kills the planted socket; the request itself
    survives (TcpExtTCPSYNChallenge, no EmbryonicRsts). Plant a second socket the same way; its cookie
    SYN-ACK meets the server's request socket, is handed to its listener, and that RST is ignored by ours.
    Then send ACK+data: the server's connection is established, and everything it sends meets the planted
    socket, which only answers with out-of-window duplicate ACKs, rate-limited to 2/s
    (tcp_invalid_ratelimit), which the server ignores. accept() reports the real src:P. Traces: a kernel log
    line per run ("Possible SYN flooding on port SRC:P. Sending cookies.") and TcpExtTCPReqQFullDoCookies.
    Remote backends: the cookie SYN-ACK then leaves the host, so a packet socket captures it. Spoofing the
    backend's address needs IP_HDRINCL for IPv4 (raw-tcp falls back to "none"); IPv6 raw sockets accept it
    with IPV6_FREEBIND.
  * "offhost" (--source ADDR not on this host; raw-hdrincl, packet): the server's answers leave through the
    route to ADDR, which must go somewhere that stays silent (for example a blackholed prefix behind a
    gateway). A packet socket on every interface sees them as outgoing frames. Only local destinations.
  * packet over IPv4 to 127/8 cannot work: frames injected on lo meet the input route, which treats 127/8
    addresses as martians unless route_localnet is set. To a local non-loopback address, only broadcast or
    offhost sources work, because interface addresses are martian sources on lo. To a remote backend the
    absorber cannot be primed, because that needs a frame from a local address, so auto uses "none". IPv6 has
    none of these checks: packet to ::1, or to any local or remote address, works with the absorber. Frames
    for addresses of this host go in on lo; frames for other hosts go out on --iface, addressed to --dst-mac
    or to the IPv4 next hop's MAC from /proc/net/arp.
  auto: raw-hdrincl/packet to 127/8 -> broadcast; raw-tcp/packet over IPv4 to a remote backend -> none;
  --source not on this host -> offhost; everything else -> absorber. packet over IPv4 to a local
  non-loopback address needs --source or --trick broadcast (neither is a default: both send the server's
  answers out of an interface). A run ends with a RST to the server. --source/--source-port override the
  source (default: HOST itself if local, else the route's source; the broadcast address for "broadcast").
  Extras: "handshake" ("full": the server acknowledged our data or sent data), "trick", "rst", "remote".
"""
import ctypes
import errno as E
import ipaddress
import json
import mmap
import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time

IPPROTO_MPTCP = 262
TCP_FASTOPEN_CONNECT = 30
MSG_FASTOPEN = 0x20000000
IP_FREEBIND = 15
IPV6_FREEBIND = 78
IPV6_HDRINCL = 36
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
MAX_ANSWER = 4096
IDLE = 0.3
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

OUT_LOCK = threading.Lock()
STATE = {"done": False}


class Failure(Exception):
    """A refusal or failure to report: name, errno, stage."""

    def __init__(self, name, err=None, stage=None, msg=""):
        super().__init__(msg or name)
        self.name, self.err, self.stage = name, err, stage


def emit(obj, final=True):
    with OUT_LOCK:
        if STATE["done"]:
            return False
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()
        if final:
            STATE["done"] = True
        return True


class Run:
    """The JSON result being built, with the current stage."""

    def __init__(self, method, args):
        self.args = args
        self.r = {"method": method, "pid": os.getpid(), "ok": False, "response": None, "error": None,
                  "errno": None, "stage": "socket", "local": None, "peer": None}

    def stage(self, name):
        self.r["stage"] = name

    def fail(self, exc):
        if isinstance(exc, Failure):
            self.r["error"], self.r["errno"] = exc.name, exc.err
            if exc.stage:
                self.r["stage"] = exc.stage
            if str(exc) != exc.name:
                self.r["detail"] = str(exc)
        else:
            self.r["error"] = type(exc).__name__
            self.r["errno"] = getattr(exc, "errno", None)
            if str(exc):
                self.r["detail"] = str(exc)

    def answer(self, data, eof):
        self.r["response"] = data.decode("utf-8", "replace") if data else None
        self.r["eof"] = eof
        if data:
            self.r["ok"] = True
            self.r["stage"] = "done"
        elif eof:
            raise Failure("EOFError", None, "recv", "peer closed without answering")
        else:
            raise Failure("TimeoutError", None, "recv", "no answer in time")


def start_watchdog(run, seconds):
    def fire():
        r = dict(run.r)
        r["ok"] = False
        r["error"], r["errno"] = "DeadlineExceeded", E.ETIMEDOUT
        r["detail"] = "run exceeded %.1f s (stuck at stage %s)" % (seconds, r["stage"])
        if emit(r):
            os._exit(3)
    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def pair(sa):
    return [sa[0], sa[1]] if sa else None


def parse_ip(text):
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


def family_of(text):
    ip = parse_ip(text)
    if ip is None:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def resolve(run, host, port, family=None):
    """getaddrinfo in the kernel-facing order: literals give one sockaddr, names all of theirs."""
    run.stage("resolve")
    fam = family_of(host)
    flags = socket.AI_NUMERICHOST if fam else 0
    want = fam or family or socket.AF_UNSPEC
    try:
        infos = socket.getaddrinfo(host, port, want, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as e:
        raise Failure("gaierror", e.errno, "resolve", str(e))
    return [(i[0], i[4]) for i in infos]


def answer_of(sock, timeout):
    """Read until EOF, 4 KiB, or IDLE quiet after the first bytes; TimeoutError before any byte."""
    buf = b""
    end = time.monotonic() + timeout
    eof = False
    while len(buf) < MAX_ANSWER:
        left = end - time.monotonic()
        if buf:
            left = min(left, IDLE)
        if left <= 0:
            break
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            break
        chunk = sock.recv(MAX_ANSWER - len(buf))
        if not chunk:
            eof = True
            break
        buf += chunk
    return buf, eof


def prepare(run, sock, family):
    a = run.args
    if family == socket.AF_INET6:
        run.stage("setsockopt")
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            pass
    if a.source or a.source_port:
        run.stage("bind")
        src = a.source or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((src, a.source_port or 0))


def note_addrs(run, sock):
    try:
        run.r["local"] = pair(sock.getsockname())
    except OSError:
        pass
    try:
        run.r["peer"] = pair(sock.getpeername())
    except OSError:
        pass


def converse(run, sock, data):
    run.stage("send")
    sock.sendall(data)
    run.r["sent"] = True
    run.stage("recv")
    buf, eof = answer_of(sock, run.args.timeout)
    note_addrs(run, sock)
    run.answer(buf, eof)


def open_connected(run, host, port, proto=0, tfo=False):
    """socket()+connect() to each resolved address in turn; returns the connected socket."""
    a = run.args
    last = None
    for family, sa in resolve(run, host, port, a.family):
        run.r["family"] = "inet6" if family == socket.AF_INET6 else "inet"
        run.r["dial"] = pair(sa)
        run.stage("socket")
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            prepare(run, sock, family)
            if tfo:
                run.stage("setsockopt")
                sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
            run.stage("connect")
            sock.settimeout(a.timeout)
            sock.connect(sa)
            sock.settimeout(None)
            note_addrs(run, sock)
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise last or Failure("gaierror", None, "resolve", "no address")


# ---------------------------------------------------------------- plain socket methods

def m_connect(run):
    sock = open_connected(run, run.args.host, run.args.port)
    converse(run, sock, run.args.data)


def m_mptcp(run):
    sock = open_connected(run, run.args.host, run.args.port, proto=IPPROTO_MPTCP)
    converse(run, sock, run.args.data)


def m_tfo_connect(run):
    sock = open_connected(run, run.args.host, run.args.port, tfo=True)
    converse(run, sock, run.args.data)


def m_tfo_sendto(run):
    a = run.args
    family, sa = resolve(run, a.host, a.port, a.family)[0]
    run.r["family"] = "inet6" if family == socket.AF_INET6 else "inet"
    run.r["dial"] = pair(sa)
    run.stage("socket")
    sock = socket.socket(family, socket.SOCK_STREAM)
    prepare(run, sock, family)
    # The sendto() is the connect: stage "connect" until it returns. Blocking, bounded by SO_SNDTIMEO:
    # non-blocking, the kernel sends the SYN, returns EINPROGRESS and drops the data when it has no Fast Open
    # cookie for the server.
    run.stage("setsockopt")
    tv = struct.pack("@ll", int(a.timeout), int((a.timeout % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    run.stage("connect")
    try:
        sock.sendto(a.data, MSG_FASTOPEN, sa)
    except BlockingIOError as e:  # SO_SNDTIMEO ran out during the handshake
        raise Failure("TimeoutError", E.ETIMEDOUT, "connect", "handshake not done in time (%s)" % e)
    run.r["sent"] = True
    run.stage("recv")
    buf, eof = answer_of(sock, a.timeout)
    note_addrs(run, sock)
    run.answer(buf, eof)


def m_bind_unspecified(run):
    a = run.args
    src = a.source or a.host
    ip = parse_ip(src)
    if ip is None:
        raise Failure("ValueError", None, "resolve", "--source must be an address")
    host_ip = parse_ip(a.host)
    mapped = getattr(host_ip, "ipv4_mapped", None)
    if host_ip is not None and (host_ip.is_unspecified or (mapped is not None and mapped.is_unspecified)):
        dial = a.host
    elif ip.version == 6 and ip.ipv4_mapped is not None:
        dial = "::ffff:0.0.0.0"
    elif ip.version == 6:
        dial = "::"
    else:
        dial = "0.0.0.0"
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    run.r["family"] = "inet6" if family == socket.AF_INET6 else "inet"
    run.r["source"] = src
    run.r["dial"] = [dial, a.port]
    run.stage("socket")
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        run.stage("setsockopt")
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    run.stage("bind")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((src, a.source_port or 0))
    run.stage("connect")
    sock.settimeout(a.timeout)
    sock.connect((dial, a.port))
    sock.settimeout(None)
    note_addrs(run, sock)
    converse(run, sock, a.data)


def m_fd_passing(run):
    a = run.args
    run.stage("socket")
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    run.stage("fork")
    pid = os.fork()
    if pid == 0:
        parent.close()
        signal.alarm(int(a.deadline) + 1)
        info = {"pid": os.getpid()}
        sub = Run("fd-passing-child", a)
        try:
            sock = open_connected(sub, a.host, a.port)
            info.update(local=sub.r["local"], peer=sub.r["peer"], dial=sub.r.get("dial"))
            socket.send_fds(child, [json.dumps(info).encode()], [sock.fileno()])
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            info.update(error=type(e).__name__, errno=getattr(e, "errno", None), stage=sub.r["stage"],
                        detail=str(e))
            try:
                child.sendall(json.dumps(info).encode())
            except OSError:
                pass
        os._exit(0)
    child.close()
    run.r["connect_pid"] = pid
    run.r["io_pid"] = os.getpid()
    run.stage("recv-fd")
    parent.settimeout(a.timeout + 1)
    try:
        msg, fds, _flags, _addr = socket.recv_fds(parent, 4096, 1)
    finally:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    info = json.loads(msg.decode() or "{}")
    if "error" in info:
        run.r["dial"] = info.get("dial")
        run.r["child_stage"] = info.get("stage")
        raise Failure(info["error"], info.get("errno"), "child-connect", info.get("detail", ""))
    if not fds:
        raise Failure("EOFError", None, "recv-fd", "no descriptor received")
    run.r["dial"] = info.get("dial")
    sock = socket.socket(fileno=fds[0])
    note_addrs(run, sock)
    converse(run, sock, a.data)


def m_hold(run):
    a = run.args
    sock = open_connected(run, a.host, a.port)
    run.r["seq"] = 0
    try:
        converse(run, sock, a.data)
    except Exception as e:  # noqa: BLE001
        run.fail(e)
    WATCHDOG[0].cancel()
    first = dict(run.r)
    if not emit(first, final=False):
        os._exit(3)
    seq = 0
    for line in sys.stdin:
        seq += 1
        r = Run("hold", a)
        r.r.update(seq=seq, local=run.r["local"], peer=run.r["peer"], stage="send")
        try:
            sock.sendall(line.encode() if line.endswith("\n") else (line + "\n").encode())
            r.r["sent"] = True
            r.stage("recv")
            buf, eof = answer_of(sock, a.timeout)
            r.answer(buf, eof)
        except Exception as e:  # noqa: BLE001
            r.fail(e)
        emit(r.r, final=False)
    STATE["done"] = True
    return "held"


# ---------------------------------------------------------------- io_uring

class Uring:
    SETUP, ENTER = 425, 426          # same numbers on every architecture (generic table, Linux >= 5.1)
    OFF_SQ_RING, OFF_CQ_RING, OFF_SQES = 0, 0x8000000, 0x10000000
    FEAT_SINGLE_MMAP = 1
    ENTER_GETEVENTS = 1
    OP_CONNECT, OP_SEND, OP_RECV, OP_SOCKET = 16, 26, 27, 45

    def __init__(self, run, entries=8):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        run.stage("io_uring_setup")
        params = ctypes.create_string_buffer(120)
        fd = self.sys(self.SETUP, entries, ctypes.addressof(params))
        if fd < 0:
            err = ctypes.get_errno()
            raise Failure("PermissionError" if err in (E.EPERM, E.EACCES) else "OSError", err,
                          "io_uring_setup", os.strerror(err))
        self.fd = fd
        p = struct.unpack_from("<10I", params, 0)
        sq_entries, cq_entries, self.features = p[0], p[1], p[5]
        sq = struct.unpack_from("<8IQ", params, 40)
        cq = struct.unpack_from("<8IQ", params, 80)
        run.stage("mmap")
        sq_size = sq[6] + sq_entries * 4
        cq_size = cq[5] + cq_entries * 16
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if self.features & self.FEAT_SINGLE_MMAP:
            self.sqm = self.cqm = mmap.mmap(fd, max(sq_size, cq_size), mmap.MAP_SHARED, prot,
                                            offset=self.OFF_SQ_RING)
        else:
            self.sqm = mmap.mmap(fd, sq_size, mmap.MAP_SHARED, prot, offset=self.OFF_SQ_RING)
            self.cqm = mmap.mmap(fd, cq_size, mmap.MAP_SHARED, prot, offset=self.OFF_CQ_RING)
        self.sqes = mmap.mmap(fd, sq_entries * 64, mmap.MAP_SHARED, prot, offset=self.OFF_SQES)
        self.sq_head, self.sq_tail, self.sq_mask, self.sq_array = sq[0], sq[1], sq[2], sq[6]
        self.cq_head, self.cq_tail, self.cq_mask, self.cqes = cq[0], cq[1], cq[2], cq[5]
        self.run = run
        self.next_id = 1

    def sys(self, *args):
        return self.libc.syscall(*[ctypes.c_long(x) for x in args])

    def u32(self, m, off, value=None):
        if value is None:
            return struct.unpack_from("<I", m, off)[0]
        struct.pack_into("<I", m, off, value & 0xFFFFFFFF)

    def submit(self, op, fd, addr=0, length=0, off=0, op_flags=0):
        mask = self.u32(self.sqm, self.sq_mask)
        tail = self.u32(self.sqm, self.sq_tail)
        idx = tail & mask
        uid = self.next_id
        self.next_id += 1
        sqe = struct.pack("<BBHiQQIIQHHiQQ", op, 0, 0, fd, off, addr, length, op_flags, uid, 0, 0, 0, 0, 0)
        self.sqes[idx * 64:(idx + 1) * 64] = sqe
        self.u32(self.sqm, self.sq_array + idx * 4, idx)
        self.u32(self.sqm, self.sq_tail, tail + 1)
        self.run.stage("io_uring_enter")
        n = self.sys(self.ENTER, self.fd, 1, 0, 0, 0, 0)
        if n < 0:
            err = ctypes.get_errno()
            raise Failure("OSError", err, "io_uring_enter", os.strerror(err))
        return uid

    def wait(self, uid, timeout, stage):
        """Poll the completion queue (entering with GETEVENTS, min_complete 0, to run task work)."""
        self.run.stage(stage)
        end = time.monotonic() + timeout
        while True:
            self.sys(self.ENTER, self.fd, 0, 0, self.ENTER_GETEVENTS, 0, 0)
            head = self.u32(self.cqm, self.cq_head)
            tail = self.u32(self.cqm, self.cq_tail)
            while head != tail:
                off = self.cqes + (head & self.u32(self.cqm, self.cq_mask)) * 16
                user_data, res, _flags = struct.unpack_from("<QiI", self.cqm, off)
                head += 1
                self.u32(self.cqm, self.cq_head, head)
                if user_data == uid:
                    return res
            if time.monotonic() >= end:
                return None
            time.sleep(0.005)


def sockaddr_bytes(family, sa):
    if family == socket.AF_INET:
        return struct.pack("<H", socket.AF_INET) + struct.pack(">H", sa[1]) + socket.inet_aton(sa[0]) + b"\0" * 8
    return (struct.pack("<H", socket.AF_INET6) + struct.pack(">HI", sa[1], sa[2]) +
            socket.inet_pton(socket.AF_INET6, sa[0].split("%")[0]) + struct.pack("<I", sa[3]))


def errno_failure(res, stage):
    err = -res
    names = {E.ECONNREFUSED: "ConnectionRefusedError", E.ECONNRESET: "ConnectionResetError",
             E.EPERM: "PermissionError", E.EACCES: "PermissionError", E.ETIMEDOUT: "TimeoutError",
             E.EPIPE: "BrokenPipeError", E.ECONNABORTED: "ConnectionAbortedError"}
    return Failure(names.get(err, "OSError"), err, stage, os.strerror(err))


def m_io_uring(run):
    a = run.args
    family, sa = resolve(run, a.host, a.port, a.family)[0]
    run.r["family"] = "inet6" if family == socket.AF_INET6 else "inet"
    run.r["dial"] = pair(sa)
    ring = Uring(run)
    if a.uring_socket:
        uid = ring.submit(Uring.OP_SOCKET, int(family), off=socket.SOCK_STREAM, length=0)
        res = ring.wait(uid, a.timeout, "socket")
        if res is None or res < 0:
            raise errno_failure(res if res is not None else -E.ETIMEDOUT, "socket")
        sock = socket.socket(fileno=res)
    else:
        run.stage("socket")
        sock = socket.socket(family, socket.SOCK_STREAM)
    prepare(run, sock, family)
    addr = ctypes.create_string_buffer(sockaddr_bytes(family, sa))
    uid = ring.submit(Uring.OP_CONNECT, sock.fileno(), addr=ctypes.addressof(addr), off=len(addr.raw))
    res = ring.wait(uid, a.timeout, "connect")
    if res is None:
        raise Failure("TimeoutError", E.ETIMEDOUT, "connect", "IORING_OP_CONNECT did not complete")
    if res < 0:
        raise errno_failure(res, "connect")
    note_addrs(run, sock)
    out = ctypes.create_string_buffer(a.data, len(a.data))
    uid = ring.submit(Uring.OP_SEND, sock.fileno(), addr=ctypes.addressof(out), length=len(a.data))
    res = ring.wait(uid, a.timeout, "send")
    if res is None or res < 0:
        raise errno_failure(res if res is not None else -E.ETIMEDOUT, "send")
    run.r["sent"] = True
    buf = b""
    eof = False
    inb = ctypes.create_string_buffer(MAX_ANSWER)
    end = time.monotonic() + a.timeout
    while len(buf) < MAX_ANSWER:
        left = end - time.monotonic()
        if buf:
            left = min(left, IDLE)
        if left <= 0:
            break
        uid = ring.submit(Uring.OP_RECV, sock.fileno(), addr=ctypes.addressof(inb), length=MAX_ANSWER - len(buf))
        res = ring.wait(uid, left, "recv")
        if res is None:
            break
        if res < 0:
            if buf:
                break
            raise errno_failure(res, "recv")
        if res == 0:
            eof = True
            break
        buf += inb.raw[:res]
    run.stage("recv")
    note_addrs(run, sock)
    run.answer(buf, eof)


# ---------------------------------------------------------------- crafted TCP

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class Seg:
    __slots__ = ("src", "dst", "sport", "dport", "seq", "ack", "flags", "data")

    def __repr__(self):
        return "%s:%d>%s:%d f=%02x seq=%d ack=%d len=%d" % (self.src, self.sport, self.dst, self.dport,
                                                            self.flags, self.seq, self.ack, len(self.data))


def tcp_bytes(family, src, dst, sport, dport, seq, ack, flags, data=b"", opts=b"", win=65535):
    off = (20 + len(opts)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, off << 4, flags, win, 0, 0)
    seg = hdr + opts + data
    if family == socket.AF_INET:
        pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(seg))
    else:
        pseudo = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) +
                  struct.pack("!I3xB", len(seg), 6))
    c = csum(pseudo + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


# --disguise: how segments to the target port are wrapped, to test parsers that stop early
# (crafted methods only): an atomic IPv6 fragment, five IPv6 destination-options headers, an IPv4
# first fragment holding 8 bytes of TCP (and the rest in a second one), three 802.1Q tags of VID 0
# (packet only; the receiving kernel strips them on lo).
DISGUISES = ("none", "frag6", "dst5", "frag4", "vlan3")


def disguised_packets(family, src, dst, seg, how):
    """The IP packets carrying `seg`, wrapped as `how` says."""
    if how == "frag6" and family == socket.AF_INET6:
        frag = struct.pack("!BBHI", 6, 0, 0, random.randrange(1 << 32))
        return [ipv6_with(src, dst, 44, frag + seg)]
    if how == "dst5" and family == socket.AF_INET6:
        ext = b""
        for i in range(5):
            nxt = 60 if i < 4 else 6
            ext += struct.pack("!BB", nxt, 0) + b"\x01\x04\0\0\0\0"
        return [ipv6_with(src, dst, 60, ext + seg)]
    if how == "frag4" and family == socket.AF_INET:
        ident = random.randrange(65536)
        first, rest = seg[:8], seg[8:]
        return [ipv4_fragment(src, dst, ident, 0, True, first), ipv4_fragment(src, dst, ident, 1, False, rest)]
    return [ip_bytes(family, src, dst, seg)]


def ipv6_with(src, dst, next_header, payload):
    return (struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64) + socket.inet_pton(socket.AF_INET6, src) +
            socket.inet_pton(socket.AF_INET6, dst) + payload)


def ipv4_fragment(src, dst, ident, offset8, more, payload):
    flags = (0x2000 if more else 0) | offset8
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, flags, 64, 6, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def ip_bytes(family, src, dst, payload):
    if family == socket.AF_INET:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), random.randrange(65536), 0x4000, 64, 6, 0,
                          socket.inet_aton(src), socket.inet_aton(dst))
        return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload
    return (struct.pack("!IHBB", 6 << 28, len(payload), 6, 64) + socket.inet_pton(socket.AF_INET6, src) +
            socket.inet_pton(socket.AF_INET6, dst) + payload)


def parse_tcp(family, src, dst, raw):
    if len(raw) < 20:
        return None
    s = Seg()
    s.sport, s.dport, s.seq, s.ack, off, s.flags = struct.unpack("!HHIIBB", raw[:14])
    s.src, s.dst = src, dst
    s.data = raw[(off >> 4) * 4:]
    return s


def parse_packet(family, raw):
    """A TCP segment from an IP packet (header included), or None."""
    if family == socket.AF_INET:
        if len(raw) < 20 or raw[0] >> 4 != 4 or raw[9] != 6:
            return None
        ihl = (raw[0] & 15) * 4
        total = struct.unpack("!H", raw[2:4])[0]
        return parse_tcp(socket.AF_INET, socket.inet_ntoa(raw[12:16]), socket.inet_ntoa(raw[16:20]),
                         raw[ihl:total])
    if len(raw) < 40 or raw[0] >> 4 != 6 or raw[6] != 6:
        return None
    plen = struct.unpack("!H", raw[4:6])[0]
    return parse_tcp(socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, raw[8:24]),
                     socket.inet_ntop(socket.AF_INET6, raw[24:40]), raw[40:40 + plen])


def drop_all_filter(sock):
    """Attach a classic BPF 'return 0' so a send-only raw socket queues nothing."""
    insn = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))
    prog = struct.pack("@HP", 1, ctypes.addressof(insn))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


class Wire:
    """Sends and receives whole TCP segments: kind raw | hdrincl | packet, for one family."""

    def __init__(self, run, kind, family, iface, capture_all=False):
        self.run, self.kind, self.family, self.iface = run, kind, family, iface
        self.senders = {}
        self.capture = capture_all or kind == "packet"
        run.stage("socket")
        if kind == "packet":
            # Frames for an address of this host go in on lo (injected there, they are received), frames
            # for another host out on --iface, to --dst-mac or the next hop's MAC from /proc/net/arp.
            self.local = local_addresses(family)
            self.txs = {}
            for name in {"lo", iface}:
                t = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                run.stage("bind")
                t.bind((name, 0))
                drop_all_filter(t)
                self.txs[name] = t
            self.mac_src = self.txs[iface].getsockname()[4][:6] if iface != "lo" else b"\0" * 6
            self.macs = {}
        elif kind == "hdrincl":
            self.rx = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)
            self.tx = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            run.stage("setsockopt")
            if family == socket.AF_INET:
                self.tx.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            else:
                self.tx.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
            drop_all_filter(self.tx)
        else:
            self.rx = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)
        if self.capture:
            # Cooked packet socket on every interface: sees what is delivered here and, outgoing, what the
            # kernel sends off the host (replies to a source that is not local).
            run.stage("socket")
            self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        elif family == socket.AF_INET6:
            run.stage("setsockopt")
            self.rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        self.rx.setblocking(False)

    def sender(self, src):
        """raw kind: one raw socket bound to each source address (the kernel writes the IP header)."""
        s = self.senders.get(src)
        if s is None:
            s = socket.socket(self.family, socket.SOCK_RAW, socket.IPPROTO_TCP)
            try:
                if self.family == socket.AF_INET:
                    s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
                else:
                    s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            except OSError:
                pass
            s.bind((src, 0))
            drop_all_filter(s)
            self.senders[src] = s
        return s

    def send(self, src, sport, dst, dport, seq, ack, flags, data=b"", opts=b""):
        seg = tcp_bytes(self.family, src, dst, sport, dport, seq, ack, flags, data, opts)
        if self.kind == "raw":
            self.sender(src).sendto(seg, (dst, 0))
        elif self.kind == "hdrincl":
            self.tx.sendto(ip_bytes(self.family, src, dst, seg), (dst, 0))
        else:
            ethertype = 0x0800 if self.family == socket.AF_INET else 0x86DD
            how = self.run.args.disguise if dport == self.run.args.port else "none"
            tags = struct.pack("!HH", 0x8100, 0) * 3 if how == "vlan3" else b""
            for packet in disguised_packets(self.family, src, dst, seg, how):
                frame = tags + struct.pack("!H", ethertype) + packet
                if dst in self.local or ipaddress.ip_address(dst).is_loopback:
                    self.txs["lo"].send(b"\0" * 12 + frame)
                else:
                    self.txs[self.iface].send(self.mac_for(dst) + self.mac_src + frame)

    def mac_for(self, dst):
        mac = self.macs.get(dst) or self.run.args.dst_mac or next_hop_mac(dst, self.iface)
        if not mac:
            raise Failure("ValueError", None, "syn", "no MAC known for the next hop to %s on %s: give --dst-mac"
                          % (dst, self.iface))
        self.macs[dst] = mac
        return mac

    def recv(self, until, match):
        """Next segment for which match(seg) is true, or None at `until` (monotonic)."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.rx], [], [], left)
            if not r:
                return None
            while True:
                try:
                    seg = self.read_one()
                except BlockingIOError:
                    break
                if seg is not None and match(seg):
                    return seg

    def read_one(self):
        if self.capture:
            packet, addr = self.rx.recvfrom(70000)
            if addr[2] == PACKET_OUTGOING and addr[0] == "lo":
                return None  # on lo every packet shows twice; keep the incoming copy
            fam = {0x0800: socket.AF_INET, 0x86DD: socket.AF_INET6}.get(addr[1])
            if fam != self.family:
                return None
            return parse_packet(fam, packet)
        if self.family == socket.AF_INET:
            return parse_packet(socket.AF_INET, self.rx.recv(70000))
        data, anc, _flags, addr = self.rx.recvmsg(70000, socket.CMSG_SPACE(20))
        dst = None
        for level, kind, payload in anc:
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                dst = socket.inet_ntop(socket.AF_INET6, payload[:16])
        return parse_tcp(socket.AF_INET6, addr[0].split("%")[0], dst, data)


def next_hop_mac(dst, iface):
    """IPv4: the gateway from /proc/net/route (or dst itself when on-link), its MAC from /proc/net/arp."""
    if ":" in dst:
        return None
    hop, best = dst, -1
    d = struct.unpack("<I", socket.inet_aton(dst))[0]
    try:
        with open("/proc/net/route") as f:
            for line in list(f)[1:]:
                x = line.split()
                if x[0] != iface:
                    continue
                dest, gw, mask = int(x[1], 16), int(x[2], 16), int(x[7], 16)
                plen = bin(mask).count("1")
                if d & mask == dest and plen > best:
                    best, hop = plen, (socket.inet_ntoa(struct.pack("<I", gw)) if gw else dst)
        with open("/proc/net/arp") as f:
            for line in list(f)[1:]:
                x = line.split()
                if x[0] == hop and x[5] == iface and x[3] != "00:00:00:00:00:00":
                    return bytes.fromhex(x[3].replace(":", ""))
    except (OSError, IndexError, ValueError):
        pass
    return None


def norm(family, text):
    return socket.inet_ntop(family, socket.inet_pton(family, text))


MSS_OPT = struct.pack("!BBH", 2, 4, 1460)


class Absorber:
    """A SYN-cookie listener on src:sport whose children are planted for the tuple with the backend."""

    def __init__(self, run, wire, src, sport, dst, dport):
        self.run, self.wire = run, wire
        self.src, self.sport, self.dst, self.dport = src, sport, dst, dport
        self.children = []
        run.stage("listen")
        self.lsock = socket.socket(wire.family, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if wire.family == socket.AF_INET6:
            self.lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.lsock.bind((src, sport))
        self.lsock.listen(0)
        self.lsock.setblocking(False)

    def prime(self, until):
        """Leave one request pending in the listener's SYN queue, so that (backlog 0) it answers in cookies.

        connect() to our own listener (not a backend), close first: our side sits in TIME_WAIT. A SYN spoofed
        from that TIME_WAIT's port makes a request socket whose SYN-ACK meets the TIME_WAIT, which answers
        with an ACK, not a RST; the listener's RST to that ACK ends the TIME_WAIT, not the request, which
        stays queued until its first retransmission (about 1 s)."""
        self.run.stage("absorber")
        k = socket.socket(self.wire.family, socket.SOCK_STREAM)
        k.settimeout(max(0.1, until - time.monotonic()))
        k.bind((self.src, 0))
        k.connect((self.src, self.sport))
        kport = k.getsockname()[1]
        end = min(until, time.monotonic() + 0.5)
        child = None
        while child is None and time.monotonic() < end:
            try:
                child, _ = self.lsock.accept()
            except BlockingIOError:
                time.sleep(0.002)
        k.close()
        if child is None:
            return False
        child.settimeout(max(0.1, end - time.monotonic()))
        try:
            child.recv(1)
        except OSError:
            pass
        child.close()
        time.sleep(0.01)
        self.wire.send(self.src, kport, self.src, self.sport, random.getrandbits(32), 0, SYN, opts=MSS_OPT)
        time.sleep(0.005)
        self.drain()
        return True

    def drain(self):
        """Accept and drop stray children (with backlog 0 one queued child refuses every SYN): when the
        listener is already in cookie mode, the TIME_WAIT's ACK (seq and ack both one past the FIN) passes
        as a valid cookie and makes a child."""
        while True:
            try:
                stray, _ = self.lsock.accept()
            except BlockingIOError:
                return
            stray.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stray.close()

    def plant(self, until):
        """Spoof SYN backend->us, read the cookie, spoof the ACK; True when the child socket exists."""
        if not self.prime(until):
            return False
        self.run.stage("absorber")
        w = self.wire
        x = random.getrandbits(32)
        w.send(self.dst, self.dport, self.src, self.sport, x, 0, SYN, opts=MSS_OPT)
        seg = w.recv(min(until, time.monotonic() + 1.0),
                     lambda s: (s.sport == self.sport and s.dport == self.dport and s.src == self.src
                                and s.dst == self.dst and s.flags & (SYN | ACK) == SYN | ACK
                                and s.ack == (x + 1) & 0xFFFFFFFF))
        if seg is None:
            return False
        w.send(self.dst, self.dport, self.src, self.sport, x + 1, seg.seq + 1, ACK)
        end = min(until, time.monotonic() + 0.5)
        while time.monotonic() < end:
            try:
                child, _ = self.lsock.accept()
                self.children.append(child)
                return True
            except BlockingIOError:
                time.sleep(0.002)
        return False

    def close(self):
        for c in self.children:
            c.close()
        self.lsock.close()


def pick_port(run):
    return run.args.source_port or random.randrange(20000, 32000)


def ipv4_interfaces():
    """{address: subnet broadcast} of this host's IPv4 addresses (SIOCGIFCONF, SIOCGIFNETMASK; no privilege)."""
    import fcntl
    out = {}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        buf = ctypes.create_string_buffer(40 * 64)
        ifc = struct.pack("iL", len(buf), ctypes.addressof(buf))
        n = struct.unpack("iL", fcntl.ioctl(s.fileno(), 0x8912, ifc))[0]
        for off in range(0, n, 40):
            name, addr = buf.raw[off:off + 16], socket.inet_ntoa(buf.raw[off + 20:off + 24])
            try:  # the kernel adds the broadcast route from the prefix (whatever `brd` says): SIOCGIFNETMASK
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x891B, name + b"\0" * 24)[20:24])
                net = ipaddress.ip_network("%s/%s" % (addr, mask), strict=False)
                out[addr] = str(net.broadcast_address) if net.prefixlen < 31 else None
            except (OSError, ValueError):
                out[addr] = None
    except OSError:
        pass
    finally:
        s.close()
    return out


def local_addresses(family):
    """Addresses on this host's interfaces (best effort): IPv4 from ipv4_interfaces, IPv6 /proc/net/if_inet6."""
    out = set()
    if family == socket.AF_INET:
        out.update(ipv4_interfaces())
    else:
        try:
            with open("/proc/net/if_inet6") as f:
                for line in f:
                    h = line.split()[0]
                    out.add(norm(socket.AF_INET6, ":".join(h[i:i + 4] for i in range(0, 32, 4))))
        except OSError:
            pass
    return out


def route_source(family, dst, port):
    """The source address the kernel would use towards dst (a UDP connect(), which sends nothing)."""
    u = socket.socket(family, socket.SOCK_DGRAM)
    try:
        u.connect((dst, port))
        return u.getsockname()[0]
    finally:
        u.close()


def choose_trick(kind, family, dst, source):
    """auto: what completes a handshake from here (see the notes at the top)."""
    dip = ipaddress.ip_address(dst)
    local = dip.is_loopback or dst in local_addresses(family)
    if family == socket.AF_INET and dip.is_loopback and kind != "raw":
        return "broadcast"
    if kind == "packet" and family == socket.AF_INET and local:
        # Injected IPv4 frames meet the input route: local sources are martians; only a source that is not
        # on this host (its reply captured where it leaves) or a subnet broadcast can work. Neither is a
        # default: both send the server's answers out of an interface.
        if source:
            return "offhost"
        raise Failure("ValueError", None, "resolve", "packet over IPv4 to a non-loopback address needs "
                      "--source ADDR (not on this host; answers captured where they leave) or --trick broadcast "
                      "(answers broadcast on the interface's segment): local sources are martians on input")
    if source and family_of(source) == family and norm(family, source) not in local_addresses(family):
        return "offhost"
    if kind == "raw" and family == socket.AF_INET and not local:
        return "none"  # planting needs a packet from the remote backend's address: IP_HDRINCL only
    if kind == "packet" and family == socket.AF_INET and not local:
        return "none"  # priming the cookie listener needs a frame from a local address: a martian on lo
    return "absorber"


def m_crafted(run, kind, family):
    a = run.args
    infos = [i for i in resolve(run, a.host, a.port, family) if i[0] == family]
    if not infos:
        raise Failure("gaierror", None, "resolve", "no %s address for %s" % (
            "IPv4" if family == socket.AF_INET else "IPv6", a.host))
    dst = norm(family, infos[0][1][0].split("%")[0])
    dport = a.port
    trick = a.trick if a.trick != "auto" else choose_trick(kind, family, dst, a.source)
    if trick == "broadcast" and family != socket.AF_INET:
        raise Failure("ValueError", None, "resolve", "the broadcast trick is IPv4 only")
    if a.source:
        src = a.source
    elif trick == "broadcast":
        src = "127.255.255.255" if ipaddress.ip_address(dst).is_loopback else ipv4_interfaces().get(dst)
        if not src:
            raise Failure("ValueError", None, "resolve", "no broadcast address known for %s" % dst)
    elif trick == "offhost":
        raise Failure("ValueError", None, "resolve", "trick offhost needs --source ADDR not local to the host")
    elif ipaddress.ip_address(dst).is_loopback or dst in local_addresses(family):
        src = dst
    else:
        src = route_source(family, dst, dport)
    src = norm(family, src)
    run.r.update(family="inet6" if family == socket.AF_INET6 else "inet", dial=[dst, dport], trick=trick,
                 handshake="none", rst=False)
    # Answers that leave the host (off-host sources; the absorber's cookie SYN-ACK to a remote backend) are
    # seen only by a packet socket.
    remote = not (ipaddress.ip_address(dst).is_loopback or dst in local_addresses(family))
    run.r["remote"] = remote
    wire = Wire(run, kind, family, a.iface, capture_all=(trick == "offhost" or remote))
    absorber = None
    for attempt in range(20):
        sport = pick_port(run)
        if trick != "absorber":
            break
        try:
            absorber = Absorber(run, wire, src, sport, dst, dport)
            break
        except OSError as e:
            if a.source_port or e.errno != E.EADDRINUSE or attempt == 19:
                raise
    run.r["local"] = [src, sport]
    run.r["peer"] = [dst, dport]
    until = time.monotonic() + a.timeout
    M = 0xFFFFFFFF
    y = random.getrandbits(32)
    snd_nxt = y
    synced = False
    try:
        if absorber and not absorber.plant(until):
            raise Failure("TimeoutError", None, "absorber", "could not plant the absorbing socket")
        run.stage("syn")
        wire.send(src, sport, dst, dport, y, 0, SYN, opts=MSS_OPT)
        snd_nxt = (y + 1) & M

        def from_server(s):
            return s.src == dst and s.sport == dport and s.dst == src and s.dport == sport

        # Only a RST that answers our SYN (ACK of y+1) counts: with the absorber, the backend's listener also
        # sends RSTs to this port that answer the planted socket's segments.
        seg = wire.recv(until, lambda s: from_server(s) and s.flags & ACK and s.ack == snd_nxt
                        and (s.flags & RST or s.flags & SYN))
        if seg is None:
            detail = "no SYN-ACK"
            if kind == "packet" and family == socket.AF_INET and ipaddress.ip_address(dst).is_loopback:
                detail += (" (IPv4 frames injected on %s with a 127/8 address are martians to the input route "
                           "unless route_localnet is set)" % a.iface)
            raise Failure("TimeoutError", None, "syn", detail)
        if seg.flags & RST:
            run.r["rst"] = True
            raise Failure("ConnectionRefusedError", E.ECONNREFUSED, "syn", "RST in answer to the SYN")
        run.r["handshake"] = "syn-ack"
        synced = True
        rcv_nxt = (seg.seq + 1) & M
        if absorber:
            # The planted child was reset by the backend's listener; plant another for the data phase.
            if not absorber.plant(until):
                raise Failure("TimeoutError", None, "absorber", "could not re-plant the absorbing socket")
        run.stage("ack")
        wire.send(src, sport, dst, dport, snd_nxt, rcv_nxt, ACK | PSH, a.data)
        data_end = (snd_nxt + len(a.data)) & M
        run.r["sent"] = True
        run.stage("recv")
        buf = b""
        eof = False
        while len(buf) < MAX_ANSWER:
            limit = min(until, time.monotonic() + IDLE) if buf else until
            seg = wire.recv(limit, from_server)
            if seg is None:
                break
            if (seg.seq - rcv_nxt) & M > 65535 and (rcv_nxt - seg.seq) & M > 65535:
                continue  # far outside our window: not our stream (e.g. segments spoofed for the absorber)
            if seg.flags & RST:
                if (seg.seq - rcv_nxt) & M > 65535:
                    continue
                run.r["rst"] = True
                synced = False
                if not buf:
                    raise Failure("ConnectionResetError", E.ECONNRESET, "recv", "RST from the peer")
                break
            if seg.flags & ACK and 0 < (seg.ack - snd_nxt) & M <= len(a.data):
                run.r["handshake"] = "full"
                if seg.ack == data_end:
                    snd_nxt = data_end
            if seg.data and seg.seq == rcv_nxt:
                buf += seg.data
                rcv_nxt = (rcv_nxt + len(seg.data)) & M
                run.r["handshake"] = "full"
            if seg.flags & FIN and (seg.seq + len(seg.data)) & M == rcv_nxt:
                rcv_nxt = (rcv_nxt + 1) & M
                eof = True
            if seg.data or seg.flags & FIN:
                wire.send(src, sport, dst, dport, data_end, rcv_nxt, ACK)
            if eof:
                break
        run.answer(buf[:MAX_ANSWER], eof)
    finally:
        if synced:
            try:
                wire.send(src, sport, dst, dport, (y + 1 + (len(a.data) if run.r.get("sent") else 0)) & M, 0,
                          RST)
            except OSError:
                pass
        if absorber:
            time.sleep(0.01)
            absorber.close()


# ---------------------------------------------------------------- main

METHODS = {
    "connect": m_connect,
    "bind-then-connect-unspecified": m_bind_unspecified,
    "tfo-sendto": m_tfo_sendto,
    "tfo-connect": m_tfo_connect,
    "io_uring": m_io_uring,
    "mptcp": m_mptcp,
    "raw-tcp": lambda run: m_crafted(run, "raw", socket.AF_INET),
    "raw-hdrincl": lambda run: m_crafted(run, "hdrincl", socket.AF_INET),
    "raw6-tcp": lambda run: m_crafted(run, "raw", socket.AF_INET6),
    "raw6-hdrincl": lambda run: m_crafted(run, "hdrincl", socket.AF_INET6),
    "packet": None,  # family chosen from HOST below
    "fd-passing": m_fd_passing,
    "hold": m_hold,
}
WATCHDOG = [None]


class Args:
    pass


def parse_args(argv):
    usage = "\n\n".join(__doc__.split("\n\n")[1:3])
    if len(argv) < 3 or argv[0] not in METHODS:
        sys.stderr.write(usage + "\nmethods: " + " ".join(METHODS) + "\n")
        sys.exit(2)
    a = Args()
    a.method, a.host = argv[0], argv[1]
    try:
        a.port = int(argv[2])
    except ValueError:
        sys.stderr.write("PORT must be a number\n")
        sys.exit(2)
    opts = {"--source": None, "--source-port": None, "--timeout": "5", "--deadline": None, "--iface": "lo",
            "--message": None, "--family": None, "--trick": "auto", "--dst-mac": None, "--disguise": "none"}
    flags = {"--uring-socket": False}
    rest = argv[3:]
    i = 0
    while i < len(rest):
        k = rest[i]
        if k in flags:
            flags[k] = True
            i += 1
        elif k in opts and i + 1 < len(rest):
            opts[k] = rest[i + 1]
            i += 2
        else:
            sys.stderr.write("unknown or incomplete option: %s\n" % k)
            sys.exit(2)
    a.source = opts["--source"]
    a.source_port = int(opts["--source-port"]) if opts["--source-port"] else 0
    a.timeout = float(opts["--timeout"])
    a.deadline = float(opts["--deadline"]) if opts["--deadline"] else 2 * a.timeout + 3
    a.iface = opts["--iface"]
    a.family = {None: None, "4": socket.AF_INET, "6": socket.AF_INET6}[opts["--family"]]
    a.trick = opts["--trick"]
    a.dst_mac = bytes.fromhex(opts["--dst-mac"].replace(":", "")) if opts["--dst-mac"] else None
    a.uring_socket = flags["--uring-socket"]
    a.disguise = opts["--disguise"]
    if a.disguise not in DISGUISES:
        sys.stderr.write("--disguise must be one of %s\n" % ", ".join(DISGUISES))
        sys.exit(2)
    text = opts["--message"] if opts["--message"] is not None else "hello %s" % a.method
    a.data = (text if text.endswith("\n") else text + "\n").encode()
    if a.trick not in ("auto", "absorber", "broadcast", "offhost", "none"):
        sys.stderr.write("--trick must be auto, absorber, broadcast, offhost or none\n")
        sys.exit(2)
    return a


def main():
    a = parse_args(sys.argv[1:])
    run = Run(a.method, a)
    WATCHDOG[0] = start_watchdog(run, a.deadline)
    method = METHODS[a.method]
    if a.method == "packet":
        fam = family_of(a.host) or a.family or socket.AF_INET
        method = lambda run: m_crafted(run, "packet", fam)  # noqa: E731
    try:
        if method(run) == "held":
            os._exit(0)
    except Exception as e:  # noqa: BLE001 - every failure is a result
        run.fail(e)
    WATCHDOG[0].cancel()
    emit(run.r)
    sys.stdout.flush()
    os._exit(0 if run.r["ok"] else 1)


if __name__ == "__main__":
    main()
