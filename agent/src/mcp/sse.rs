//! Server-sent events, sans-IO: an incremental parser that accepts the stream in chunks of any
//! size and hands back whole events, and an encoder that re-emits them.
//!
//! What an intermediary must keep (see the SSE section of the HTML standard and
//! `notes/MCP-PROTOCOL.md`): CR, LF and CRLF line ends (a CR may end one chunk and its LF start
//! the next); multi-line `data:` joined with `\n`; `id`, `event`, `retry` and comment lines and
//! empty priming events passed on unchanged. An event that is not rewritten is re-emitted byte
//! for byte; a rewritten one is re-encoded with its fields in their original order and the data
//! on one `data:` line.

use std::fmt;

/// One line of an event, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `: text` (the text after the colon, verbatim).
    Comment(String),
    /// `name: value` (one leading space of the value removed, as the standard says).
    Field { name: String, value: String },
}

/// A complete event: the lines up to (not including) the blank line that ended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub lines: Vec<Line>,
    /// The bytes as received, terminator included: re-emitted when the event is unchanged.
    pub raw: Vec<u8>,
}

impl Event {
    fn field(&self, name: &str) -> Option<&str> {
        self.lines.iter().rev().find_map(|l| match l {
            Line::Field { name: n, value } if n == name => Some(value.as_str()),
            _ => None,
        })
    }

    /// The event type (`event:`), if given.
    pub fn event_type(&self) -> Option<&str> {
        self.field("event")
    }

    pub fn id(&self) -> Option<&str> {
        self.field("id")
    }

    /// The data lines joined with `\n`; `None` when the event has no `data` field.
    pub fn data(&self) -> Option<String> {
        let mut out: Option<String> = None;
        for l in &self.lines {
            if let Line::Field { name, value } = l
                && name == "data"
            {
                match &mut out {
                    Some(s) => {
                        s.push('\n');
                        s.push_str(value);
                    }
                    None => out = Some(value.clone()),
                }
            }
        }
        out
    }

    /// The event with its data replaced by `data` (one line per `\n`-separated part; callers
    /// pass compact JSON, one line), other lines kept in place, LF line ends.
    pub fn encode_with_data(&self, data: &str) -> Vec<u8> {
        self.encode(Some(data))
    }

    /// The event's lines re-encoded with LF line ends; its data replaced by `data`, or, when
    /// `None`, left out (an event without data).
    pub fn encode(&self, data: Option<&str>) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.map_or(0, str::len) + 64);
        let mut data_written = data.is_none();
        let write_data = |out: &mut Vec<u8>| {
            for part in data.unwrap_or("").split('\n') {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(part.as_bytes());
                out.push(b'\n');
            }
        };
        for l in &self.lines {
            match l {
                Line::Comment(c) => {
                    out.push(b':');
                    out.extend_from_slice(c.as_bytes());
                    out.push(b'\n');
                }
                Line::Field { name, .. } if name == "data" => {
                    if !data_written {
                        write_data(&mut out);
                        data_written = true;
                    }
                }
                Line::Field { name, value } => {
                    out.extend_from_slice(name.as_bytes());
                    if !value.is_empty() {
                        out.extend_from_slice(b": ");
                        out.extend_from_slice(value.as_bytes());
                    } else {
                        out.push(b':');
                    }
                    out.push(b'\n');
                }
            }
        }
        if !data_written {
            write_data(&mut out);
        }
        out.push(b'\n');
        out
    }
}

/// Encode a new event (e.g. an answer Airlock injects) with `event: message` semantics left to
/// the caller.
pub fn encode_event(event_type: Option<&str>, data: &str) -> Vec<u8> {
    let mut lines = Vec::new();
    if let Some(t) = event_type {
        lines.push(Line::Field {
            name: "event".into(),
            value: t.into(),
        });
    }
    Event {
        lines,
        raw: Vec::new(),
    }
    .encode_with_data(data)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseError {
    /// One event grew past the configured cap before its blank line arrived.
    EventTooLarge { limit: usize },
    /// A line that is not UTF-8.
    NotUtf8,
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseError::EventTooLarge { limit } => {
                write!(
                    f,
                    "an SSE event is larger than {limit} bytes (`max_sse_event_bytes`)"
                )
            }
            SseError::NotUtf8 => write!(f, "an SSE line is not UTF-8"),
        }
    }
}

impl std::error::Error for SseError {}

/// The incremental parser. Memory is bounded by `max_event` (the raw bytes of one event).
#[derive(Debug)]
pub struct Parser {
    max_event: usize,
    /// The raw bytes of the event being read (complete lines and the partial one).
    raw: Vec<u8>,
    /// Where the partial line starts in `raw`.
    line_start: usize,
    lines: Vec<Line>,
    /// The previous chunk ended with CR: a LF at the start of the next one belongs to it.
    after_cr: bool,
    /// Nothing read yet: a UTF-8 byte-order mark is skipped (kept in `raw`).
    at_start: bool,
}

impl Parser {
    pub fn new(max_event: usize) -> Parser {
        Parser {
            max_event,
            raw: Vec::new(),
            line_start: 0,
            lines: Vec::new(),
            after_cr: false,
            at_start: true,
        }
    }

    /// Feed bytes; complete events are appended to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        if self.after_cr && !input.is_empty() {
            self.after_cr = false;
            if input[0] == b'\n' {
                // The LF of a CRLF split across chunks: its line was ended at the CR (an event
                // must not wait for the next chunk). The LF is dropped: a lone CR is the same
                // line end to every client.
                input = &input[1..];
            }
        }
        while !input.is_empty() {
            let Some(pos) = input.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.raw.extend_from_slice(input);
                self.check_size()?;
                return Ok(());
            };
            self.raw.extend_from_slice(&input[..pos]);
            let (term_len, complete) = match input[pos] {
                b'\r' if pos + 1 < input.len() && input[pos + 1] == b'\n' => (2, true),
                b'\r' if pos + 1 == input.len() => (1, false),
                _ => (1, true),
            };
            self.raw.extend_from_slice(&input[pos..pos + term_len]);
            self.check_size()?;
            if !complete {
                self.after_cr = true;
            }
            let line_end = self.raw.len() - term_len;
            self.end_line(line_end, out)?;
            input = &input[pos + term_len..];
        }
        Ok(())
    }

    fn check_size(&self) -> Result<(), SseError> {
        if self.raw.len() > self.max_event {
            return Err(SseError::EventTooLarge {
                limit: self.max_event,
            });
        }
        Ok(())
    }

    fn end_line(&mut self, line_end: usize, out: &mut Vec<Event>) -> Result<(), SseError> {
        let mut line = &self.raw[self.line_start..line_end];
        if self.at_start {
            self.at_start = false;
            if let Some(rest) = line.strip_prefix(b"\xEF\xBB\xBF") {
                line = rest;
            }
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        if line.is_empty() {
            let raw = std::mem::take(&mut self.raw);
            let lines = std::mem::take(&mut self.lines);
            self.line_start = 0;
            out.push(Event { lines, raw });
            return Ok(());
        }
        let parsed = if let Some(comment) = line.strip_prefix(':') {
            Line::Comment(comment.to_owned())
        } else if let Some((name, value)) = line.split_once(':') {
            Line::Field {
                name: name.to_owned(),
                value: value.strip_prefix(' ').unwrap_or(value).to_owned(),
            }
        } else {
            Line::Field {
                name: line.to_owned(),
                value: String::new(),
            }
        };
        self.lines.push(parsed);
        self.line_start = self.raw.len();
        Ok(())
    }

    /// Bytes of an event that the stream ended in the middle of (a client discards those).
    pub fn pending_bytes(&self) -> usize {
        self.raw.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = Parser::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        out
    }

    /// The semantic content of events: what a client sees.
    fn summary(events: &[Event]) -> Vec<(Vec<Line>, Option<String>)> {
        events.iter().map(|e| (e.lines.clone(), e.data())).collect()
    }

    const STREAM: &[u8] = b"\xEF\xBB\xBF: priming comment\r\nid: 0\r\nretry: 3000\r\ndata:\r\n\r\n\
event: message\ndata: {\"jsonrpc\":\"2.0\",\ndata: \"method\":\"notifications/progress\"}\n\n\
id: 7\rdata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\r\rfield-without-colon\n\n";

    #[test]
    fn whole_stream_parses_into_events() {
        let events = parse_all(&[STREAM]);
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].id(), Some("0"));
        assert_eq!(events[0].data().as_deref(), Some(""));
        assert_eq!(events[0].lines[0], Line::Comment(" priming comment".into()));
        assert_eq!(events[1].event_type(), Some("message"));
        assert_eq!(
            events[1].data().as_deref(),
            Some("{\"jsonrpc\":\"2.0\",\n\"method\":\"notifications/progress\"}")
        );
        assert_eq!(events[2].id(), Some("7"));
        assert_eq!(
            events[3].lines,
            vec![Line::Field {
                name: "field-without-colon".into(),
                value: String::new()
            }]
        );
        // Unchanged events re-emit byte for byte.
        let raw: Vec<u8> = events.iter().flat_map(|e| e.raw.clone()).collect();
        assert_eq!(raw, STREAM);
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let whole = summary(&parse_all(&[STREAM]));
        for i in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(i);
            assert_eq!(summary(&parse_all(&[a, b])), whole, "split at byte {i}");
        }
        // And byte by byte.
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(summary(&parse_all(&bytes)), whole);
    }

    #[test]
    fn every_pair_of_split_points_gives_the_same_events() {
        let whole = summary(&parse_all(&[STREAM]));
        for i in 0..STREAM.len() {
            for j in i..=STREAM.len() {
                let got = parse_all(&[&STREAM[..i], &STREAM[i..j], &STREAM[j..]]);
                assert_eq!(summary(&got), whole, "splits at {i} and {j}");
            }
        }
    }

    #[test]
    fn an_event_is_handed_out_as_soon_as_its_blank_line_arrives() {
        let mut p = Parser::new(1024);
        let mut out = Vec::new();
        p.feed(b"data: a\r\n\r", &mut out).unwrap();
        // The CR ends the event: it must not wait for the LF (which may come much later).
        assert_eq!(out.len(), 1);
        p.feed(b"\ndata: b\n", &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(p.pending_bytes(), b"data: b\n".len());
    }

    #[test]
    fn rewritten_event_keeps_other_fields_in_order() {
        let events =
            parse_all(&[b"id: 4\nevent: message\n: note\ndata: {\"a\":\ndata: 1}\nretry: 10\n\n"]);
        let out = events[0].encode_with_data("{\"a\":2}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "id: 4\nevent: message\n: note\ndata: {\"a\":2}\nretry: 10\n\n"
        );
        let fresh = encode_event(Some("message"), "{}");
        assert_eq!(fresh, b"event: message\ndata: {}\n\n");
    }

    #[test]
    fn oversized_event_is_an_error_not_a_buffer_that_grows() {
        let mut p = Parser::new(16);
        let mut out = Vec::new();
        assert_eq!(
            p.feed(b"data: 0123456789abcdef", &mut out),
            Err(SseError::EventTooLarge { limit: 16 })
        );
        let mut p = Parser::new(16);
        // Many small events are fine: the cap is per event.
        for _ in 0..100 {
            p.feed(b"data: x\n\n", &mut out).unwrap();
        }
        assert_eq!(out.len(), 100);
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let mut p = Parser::new(64);
        assert_eq!(
            p.feed(b"data: \xff\n\n", &mut Vec::new()),
            Err(SseError::NotUtf8)
        );
    }
}
