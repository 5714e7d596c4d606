use super::*;

fn req(s: &str) -> Result<Option<RequestHead>, Malformed> {
    parse_request(s.as_bytes())
}

fn name(n: &str) -> Host {
    Host::Name(n.into())
}

#[test]
fn connect_names_its_target_and_keeps_the_rest_for_later() {
    let text = "CONNECT MCP.Internal.Test.:8443 HTTP/1.1\r\nHost: mcp.internal.test:8443\r\nProxy-Authorization: Basic dTpw\r\n\r\n\x16\x03\x01";
    let h = req(text).unwrap().unwrap();
    assert_eq!(
        h.target,
        Target::Tunnel {
            host: name("mcp.internal.test"),
            port: 8443
        }
    );
    assert_eq!(
        h.len,
        text.len() - 3,
        "the bytes after the head are not the head's"
    );
    assert_eq!(h.body, Body::None);
    assert!(!h.close);
    assert_eq!(h.authority(), "mcp.internal.test:8443");
    assert_eq!(h.host_header, Some((name("mcp.internal.test"), 8443)));
}

#[test]
fn incomplete_heads_wait_and_oversized_ones_are_refused() {
    assert_eq!(req("CONNECT a.test:443 HTTP/1.1\r\nHost: a"), Ok(None));
    let mut big = "CONNECT a.test:443 HTTP/1.1\r\nX: ".to_owned();
    big.push_str(&"a".repeat(MAX_HEAD));
    assert_eq!(req(&big), Err(Malformed::TooLarge));
    assert_eq!(Malformed::TooLarge.status(), 431);
}

#[test]
fn targets_in_every_form() {
    let fwd = |s: &str| req(&format!("GET {s} HTTP/1.1\r\n\r\n")).map(|h| h.unwrap().target);
    assert_eq!(
        fwd("http://Example.com/x?y=1"),
        Ok(Target::Forward {
            scheme: "http".into(),
            host: name("example.com"),
            port: 80
        })
    );
    assert_eq!(
        fwd("https://[::1]:8443"),
        Ok(Target::Forward {
            scheme: "https".into(),
            host: Host::Ip("::1".parse().unwrap()),
            port: 8443
        })
    );
    assert_eq!(fwd("/index.html"), Ok(Target::Proxy));
    assert!(fwd("gopher://x.test/").is_err(), "no default port");
    let secret = fwd("http://user:hunter2@x.test/").unwrap_err().to_string();
    assert!(!secret.contains("hunter2"), "{secret}");
    let token = fwd("x.test/?token=hunter2").unwrap_err().to_string();
    assert!(!token.contains("hunter2"), "{token}");
    assert!(fwd("x.test/").is_err(), "not a URL");
    let opts = req("OPTIONS * HTTP/1.1\r\nHost: proxy.test:3128\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(opts.target, Target::Proxy);
    assert_eq!(opts.host_header, Some((name("proxy.test"), 3128)));
    assert_eq!(opts.authority(), "proxy.test:3128 (origin-form)");
}

#[test]
fn ipv4_mapped_and_plain_addresses_are_addresses() {
    let t = |s: &str| req(&format!("CONNECT {s} HTTP/1.1\r\n\r\n")).map(|h| h.unwrap().target);
    assert_eq!(
        t("[::ffff:127.0.0.2]:8443"),
        Ok(Target::Tunnel {
            host: Host::Ip("127.0.0.2".parse().unwrap()),
            port: 8443
        })
    );
    assert_eq!(
        t("127.0.0.2:8443"),
        Ok(Target::Tunnel {
            host: Host::Ip("127.0.0.2".parse().unwrap()),
            port: 8443
        })
    );
}

#[test]
fn hosts_a_resolver_could_read_otherwise_are_refused() {
    for target in [
        "127.1:443",
        "2130706433:443",
        "0x7f.0.0.1:443",
        "a.0x7f:443",
        "mcp%2einternal.test:443",
        "user@mcp.internal.test:443",
        "mcp.internal.test",
        "mcp.internal.test:0",
        "mcp.internal.test:65536",
        "mcp.internal.test:+443",
        "mcp..internal.test:443",
        "[fe80::1%25eth0]:443",
        "[::1]443",
        ":443",
        "mcp.internal.test:443/x",
    ] {
        let r = req(&format!("CONNECT {target} HTTP/1.1\r\n\r\n"));
        assert!(r.is_err(), "{target}: {r:?}");
    }
}

#[test]
fn framing_that_two_parsers_could_read_differently_is_refused() {
    for head in [
        "POST http://a.test/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST http://a.test/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST http://a.test/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        "POST http://a.test/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        "CONNECT a.test:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
        "GET http://a.test/ HTTP/1.1\nHost: a.test\n\n",
        "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n folded\r\n\r\n",
        "GET http://a.test/ HTTP/1.1\r\nHost : a.test\r\n\r\n",
    ] {
        assert!(req(head).is_err(), "{head:?}");
    }
    let h = req("POST http://a.test/ HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(h.body, Body::Length(5));
}

#[test]
fn connection_close_is_read_from_both_headers_and_the_version() {
    let close = |s: &str| req(s).unwrap().unwrap().close;
    assert!(close("CONNECT a.test:443 HTTP/1.0\r\n\r\n"));
    assert!(!close(
        "CONNECT a.test:443 HTTP/1.0\r\nProxy-Connection: Keep-Alive\r\n\r\n"
    ));
    assert!(close(
        "CONNECT a.test:443 HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n"
    ));
    assert!(!close("CONNECT a.test:443 HTTP/1.1\r\n\r\n"));
}

#[test]
fn responses_are_framed_by_status_method_and_headers() {
    let resp = |s: &str, head: bool, connect: bool| {
        parse_response(s.as_bytes(), head, connect)
            .unwrap()
            .unwrap()
    };
    let ok = resp("HTTP/1.1 200 Connection established\r\n\r\n", false, true);
    assert_eq!((ok.status, ok.body), (200, Body::Tunnel));
    let denied = resp(
        "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 12\r\n\r\n",
        false,
        true,
    );
    assert_eq!(
        (denied.status, denied.body, denied.close),
        (407, Body::Length(12), false)
    );
    assert_eq!(
        resp("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, false).body,
        Body::None
    );
    assert_eq!(
        resp("HTTP/1.1 204 No Content\r\n\r\n", false, false).body,
        Body::None
    );
    assert_eq!(
        resp("HTTP/1.1 100 Continue\r\n\r\n", false, false).body,
        Body::None
    );
    let eof = resp("HTTP/1.0 200 OK\r\n\r\n", false, false);
    assert_eq!((eof.body, eof.close), (Body::UntilClose, true));
    assert_eq!(
        resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
            false
        )
        .body,
        Body::Chunked
    );
    assert_eq!(
        resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            false,
            false
        )
        .body,
        Body::UntilClose
    );
    assert_eq!(
        resp(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            false,
            false
        )
        .body,
        Body::Tunnel
    );
    assert_eq!(
        parse_response(b"HTTP/1.1 200 OK\r\n", false, true),
        Ok(None)
    );
}

/// Feed `input` in pieces of `step` bytes; the bytes used and whether the body ended.
fn follow(body: Body, input: &[u8], step: usize) -> Result<(usize, bool), Malformed> {
    let mut f = BodyFollower::new(body);
    let mut used = 0;
    for piece in input.chunks(step) {
        let p = f.feed(piece)?;
        used += p.used;
        if p.done {
            return Ok((used, true));
        }
    }
    Ok((used, false))
}

#[test]
fn chunked_bodies_end_where_they_end_in_any_split() {
    let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\nGET /next";
    let end = body.len() - b"GET /next".len();
    for step in 1..body.len() {
        assert_eq!(
            follow(Body::Chunked, body, step),
            Ok((end, true)),
            "step {step}"
        );
    }
    for bad in [
        &b"4\nWiki\r\n0\r\n\r\n"[..],
        b"x\r\n",
        b"4\r\nWikiX\r\n",
        b"\r\n",
        b"11111111111111111\r\n",
        b"0\r\n\n",
    ] {
        assert!(follow(Body::Chunked, bad, 64).is_err(), "{bad:?}");
    }
}

#[test]
fn lengths_and_close_delimited_bodies() {
    assert_eq!(follow(Body::Length(3), b"abcdef", 2), Ok((3, true)));
    assert_eq!(follow(Body::Length(10), b"abc", 2), Ok((3, false)));
    assert_eq!(follow(Body::UntilClose, b"abc", 2), Ok((3, false)));
    assert_eq!(follow(Body::None, b"abc", 2), Ok((0, true)));
    assert!(BodyFollower::new(Body::UntilClose).until_close());
}

mod generated {
    use proptest::prelude::*;

    /// Request-like bytes: a method, a target, header lines and a body from pieces that meet
    /// every branch of the parser, stitched with CRLF or, sometimes, something else.
    fn request_like() -> impl Strategy<Value = Vec<u8>> {
        let method = prop::sample::select(vec!["CONNECT", "GET", "POST", "HEAD", "OPTIONS", "get"]);
        let target = prop::sample::select(vec![
            "mcp.internal.test:8443",
            "[::1]:443",
            "127.1:443",
            "http://a.test/x",
            "https://u@a.test/",
            "/",
            "*",
            "a.test",
        ]);
        let header = prop::sample::select(vec![
            "Host: a.test",
            "Host: b.test:8080",
            "Content-Length: 3",
            "Content-Length: 3, 4",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: gzip",
            "Connection: close",
            "Proxy-Connection: keep-alive",
            "Proxy-Authorization: Basic YTpi",
            "X: \u{7f}",
        ]);
        let eol = prop::sample::select(vec!["\r\n", "\r\n", "\r\n", "\n", "\r"]);
        (
            method,
            target,
            prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2"]),
            prop::collection::vec((header, eol.clone()), 0..5),
            eol,
            prop::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(m, t, v, headers, end, body)| {
                let mut out = format!("{m} {t} {v}\r\n").into_bytes();
                for (h, e) in headers {
                    out.extend_from_slice(format!("{h}{e}").as_bytes());
                }
                out.extend_from_slice(end.as_bytes());
                out.extend_from_slice(b"3\r\nabc\r\n0\r\n\r\n");
                out.extend_from_slice(&body);
                out
            })
    }

    proptest! {
        #[test]
        fn any_bytes_keep_the_parser_invariants(data in prop::collection::vec(any::<u8>(), 0..300)) {
            crate::fuzzing::proxy_request(&data);
        }

        #[test]
        fn request_like_bytes_keep_the_parser_invariants(data in request_like()) {
            crate::fuzzing::proxy_request(&data);
        }
    }
}
