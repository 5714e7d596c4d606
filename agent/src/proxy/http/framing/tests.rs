use super::*;

/// Feed `input` in pieces of `piece` bytes the way `client_io` does; what passed, and the
/// refusal if one came.
fn run(input: &[u8], piece: usize) -> (Vec<u8>, Option<Malformed>) {
    let mut framer = Framer::default();
    let (mut buf, mut passed) = (Vec::new(), Vec::new());
    for chunk in input.chunks(piece.max(1)) {
        buf.extend_from_slice(chunk);
        while !buf.is_empty() {
            match framer.step(&buf) {
                Step::Pass(0) | Step::More => break,
                Step::Pass(n) => {
                    passed.extend(buf.drain(..n));
                }
                Step::Refuse(m) => return (passed, Some(m)),
            }
        }
    }
    (passed, None)
}

const GET: &[u8] = b"GET /mcp HTTP/1.1\r\nHost: x\r\n\r\n";

#[test]
fn well_formed_requests_pass_whole_in_any_pieces() {
    let post = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
    let chunked = b"POST /mcp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n";
    let pipelined = [GET, &post[..], &chunked[..], GET, b"\r\n", GET].concat();
    for piece in [1, 2, 7, 64, 4096] {
        let (passed, refused) = run(&pipelined, piece);
        assert_eq!(refused, None, "piece {piece}");
        assert_eq!(passed, pipelined, "piece {piece}");
    }
}

#[test]
fn malformed_heads_are_refused_with_the_reason() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            "a header line is not `name: value`: \"Bad Header\"",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n",
            "\"Bad Header: x\"",
        ),
        (
            b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
            "method is not a token",
        ),
        (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", "HTTP/1.0 or HTTP/1.1"),
        (b"GET / FTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.0 or HTTP/1.1"),
        (b"GET /a b HTTP/1.1\r\n\r\n", "HTTP/1.0 or HTTP/1.1"),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5x\r\n\r\n",
            "an invalid Content-Length: \"Content-Length: 5x\"",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "two different Content-Length values",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "last coding is not chunked",
        ),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding in an HTTP/1.0 request",
        ),
        (b"\x16\x03\x01\x00\x05hello", "method is not a token"),
    ];
    for (input, want) in cases {
        // Refused in any pieces (the line quoted is then what had arrived of it).
        assert!(run(input, 1).1.is_some(), "{input:?}");
        let (passed, refused) = run(input, input.len());
        assert!(passed.is_empty(), "{input:?}");
        let m = refused.unwrap_or_else(|| panic!("{:?} passed", String::from_utf8_lossy(input)));
        assert_eq!(m.status(), StatusCode::BAD_REQUEST);
        assert!(m.to_string().contains(want), "{m} / {want}");
        let answer = String::from_utf8(m.answer()).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(
            body.starts_with("Airlock: malformed HTTP request: "),
            "{body}"
        );
    }
}

#[test]
fn a_malformed_head_after_good_requests_is_caught_at_its_start() {
    let body = b"GET\r\nBad Header\r\n\r\n";
    let mut post = format!(
        "POST /mcp HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    post.extend_from_slice(body);
    let input = [GET, &post[..], b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"].concat();
    for piece in [1, 5, 4096] {
        let (passed, refused) = run(&input, piece);
        // The body that looks like a bad head is a body; the head after it is refused.
        assert_eq!(passed, [GET, &post[..]].concat(), "piece {piece}");
        assert!(refused.is_some(), "piece {piece}");
    }
}

#[test]
fn large_heads_and_many_headers_get_431() {
    let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
    big.resize(MAX_HEAD + 10, b'a');
    let (_, refused) = run(&big, 4096);
    assert_eq!(refused, Some(Malformed::TooLarge));
    let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
    let (_, refused) = run(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(), 4096);
    assert_eq!(refused, Some(Malformed::TooManyHeaders));
    assert_eq!(
        Malformed::TooManyHeaders.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
}

#[test]
fn an_http2_preface_gets_a_goaway_saying_http11() {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    for piece in [1, 4, 100] {
        assert_eq!(run(preface, piece).1, Some(Malformed::Http2Preface));
    }
    let answer = Malformed::Http2Preface.answer();
    // SETTINGS, then GOAWAY (type 7) with HTTP_1_1_REQUIRED and the reason.
    assert_eq!(&answer[..9], &[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    assert_eq!(answer[12], 7);
    let len = u32::from_be_bytes([0, answer[9], answer[10], answer[11]]) as usize;
    assert_eq!(answer.len(), 18 + len);
    assert_eq!(&answer[22..26], &[0, 0, 0, 0xd]);
    assert!(String::from_utf8_lossy(&answer[26..]).contains("HTTP/1.1"));
}

#[test]
fn framing_it_does_not_follow_stops_the_checks() {
    // Chunk syntax beyond the plain one, an upgrade, CONNECT: everything after passes.
    for head in [
        &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
    ] {
        let input = [head, b"not http at all\r\n\r\n"].concat();
        let (passed, refused) = run(&input, 3);
        assert_eq!(refused, None);
        assert_eq!(passed, input);
    }
}
