use super::*;

fn parse(s: &str) -> MediaType {
    MediaType::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn parses_types_and_parameters() {
    let m = parse("Application/JSON ; Charset=\"UTF-8\"");
    assert_eq!(m.essence, "application/json");
    assert_eq!(m.param("charset").as_deref(), Some("UTF-8"));
    assert_eq!(m.charset(), Ok(Some("utf-8".into())));
    assert!(m.require_utf8().is_ok());
    let m = parse("text/event-stream");
    assert_eq!(m.essence, "text/event-stream");
    assert_eq!(m.charset(), Ok(None));
    assert!(m.require_utf8().is_ok());
    assert_eq!(
        parse("text/plain; x=\"a;b,c\"").param("x").as_deref(),
        Some("a;b,c")
    );
    assert_eq!(
        parse(r#"text/plain; x="a\"b""#).param("x").as_deref(),
        Some("a\"b")
    );
}

#[test]
fn extended_values_and_sections_are_read_as_rfc_2231_says() {
    let m = parse("text/plain; title*=utf-8'en'%E2%82%AC%20rates");
    assert_eq!(m.param("title").as_deref(), Some("€ rates"));
    let m = parse("text/plain; TITLE*0=\"abc \"; title*1=def");
    assert_eq!(m.param("title").as_deref(), Some("abc def"));
    let m = parse("text/plain; title*1*=%20rates; title*0*=utf-8''%E2%82%AC");
    assert_eq!(m.param("title").as_deref(), Some("€ rates"));
    // Gaps, repeats, or a value in two notations read as no value.
    for unclear in [
        "text/plain; title*0=a; title*2=c",
        "text/plain; title*1=a",
        "text/plain; title*0=a; title*0=b",
        "text/plain; title=a; title*=utf-8''b",
        "text/plain; title*=a",
        "text/plain; title*=utf-8''%zz",
        "text/plain; title*00=a",
    ] {
        assert_eq!(parse(unclear).param("title"), None, "{unclear}");
    }
}

#[test]
fn utf8_in_any_spelling_is_accepted() {
    for ok in [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=UTF8",
        "application/json; charset=\"utf-8\"",
        "application/json; charset*=utf-8''utf-8",
        "application/json; CHARSET*=''UTF-8",
        "application/json; charset*=us-ascii'en'utf%2D8",
        "text/event-stream; charset*=UTF-8''%75%74%66%2D%38",
        "text/event-stream; x*0=a; x*1=b; charset=utf-8",
    ] {
        assert_eq!(parse(ok).require_utf8(), Ok(()), "{ok}");
    }
}

#[test]
fn any_other_charset_or_a_doubtful_one_is_refused() {
    use MediaError::*;
    let cases: &[(&str, MediaError)] = &[
        ("application/json; charset=utf-16", NotUtf8("utf-16".into())),
        (
            "application/json; charset=\"utf-7\"",
            NotUtf8("utf-7".into()),
        ),
        ("application/json; charset=\"\"", NotUtf8(String::new())),
        // Python's alias, not a WHATWG label.
        ("application/json; Charset=Utf_8", NotUtf8("utf_8".into())),
        (
            "text/event-stream; charset*=utf-8''utf-7",
            NotUtf8("utf-7".into()),
        ),
        (
            "text/event-stream; charset*=''utf%2D7",
            NotUtf8("utf-7".into()),
        ),
        ("application/json; charset*=utf-8''", NotUtf8(String::new())),
        // The extended value's own charset decides how Python decodes it.
        (
            "application/json; charset*=utf-16''",
            CharsetEncodedIn("utf-16".into()),
        ),
        (
            "text/event-stream; charset*=utf-16''%FF%FEu%00t%00f%00-%007%00",
            CharsetEncodedIn("utf-16".into()),
        ),
        // Sections, even when they join to UTF-8.
        (
            "text/event-stream; charset*0=utf; charset*1=-7",
            CharsetSections("charset*0".into()),
        ),
        (
            "text/event-stream; charset*0*=utf-8''utf; charset*1=-8",
            CharsetSections("charset*0*".into()),
        ),
        (
            "text/event-stream; charset*1=-8",
            CharsetSections("charset*1".into()),
        ),
        (
            "text/event-stream; charset*x=utf-8",
            CharsetSections("charset*x".into()),
        ),
        // Twice, or in two notations (Python reads the plain one, RFC 8187 the extended).
        (
            "application/json; charset=utf-8; charset=latin1",
            CharsetTwice,
        ),
        (
            "application/json; charset=utf-8; charset=utf-8",
            CharsetTwice,
        ),
        (
            "application/json; charset*=utf-8''utf-8; CHARSET*=utf-8''utf-8",
            CharsetTwice,
        ),
        (
            "text/event-stream; charset=utf-8; charset*=utf-8''utf-7",
            CharsetTwoNotations,
        ),
        (
            "text/event-stream; charset*=utf-8''utf-8; charset=utf-8",
            CharsetTwoNotations,
        ),
        // Malformed extended values.
        (
            "text/event-stream; charset*=utf-7",
            CharsetExtended("utf-7".into()),
        ),
        (
            "text/event-stream; charset*=utf-8''utf%2",
            CharsetExtended("utf-8''utf%2".into()),
        ),
        (
            "text/event-stream; charset*=utf-8''%FF",
            CharsetExtended("utf-8''%FF".into()),
        ),
        (
            "text/event-stream; charset*=\"utf-8''utf-8'\"",
            CharsetExtended("utf-8''utf-8'".into()),
        ),
    ];
    for (ct, want) in cases {
        assert_eq!(parse(ct).require_utf8().as_ref(), Err(want), "{ct}");
    }
}

#[test]
fn refuses_what_lenient_clients_read_differently() {
    for bad in [
        "application/json, text/plain",
        "application/json text/plain",
        "application/json; charset",
        "application/json; charset=\"utf-8",
        "application/json; charset = utf-7",
        "application/json; charset=utf-8 (comment)",
        "text/plain; x=application/json",
        "text/plain; x=\"a\"b",
        "json",
        "/json",
        "application/",
        "",
    ] {
        assert!(MediaType::parse(bad).is_err(), "{bad}");
    }
    // Parsed, but not what a JSON or an event-stream response is.
    for other in [
        "application/jsonx",
        "application/json-rpc",
        "text/plain; x=\"application/json\"",
        "application/vnd.api+json",
    ] {
        assert_ne!(parse(other).essence, "application/json", "{other}");
    }
}

#[test]
fn header_maps_with_several_types_or_another_charset_are_refused() {
    let mut h = http::HeaderMap::new();
    assert_eq!(content_type(&h), Ok(None));
    assert_eq!(utf8_content_type(&h), Ok(None));
    h.append(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    assert!(content_type(&h).unwrap().is_some());
    h.append(http::header::CONTENT_TYPE, "text/plain".parse().unwrap());
    assert_eq!(content_type(&h), Err(MediaError::Several));
    h.insert(
        http::header::CONTENT_TYPE,
        "text/event-stream; charset*=utf-8''utf-7".parse().unwrap(),
    );
    assert!(content_type(&h).is_ok());
    assert_eq!(
        utf8_content_type(&h),
        Err(MediaError::NotUtf8("utf-7".into()))
    );
    // The reason names the problem.
    assert!(
        MediaError::CharsetTwoNotations
            .to_string()
            .contains("`charset=` and `charset*=`")
    );
}
