//! Byte-level HTTP/1.1 for the router's own connections to instances:
//! response heads parsed with `httparse`, body framing (RFC 9112 §6.3) and
//! a chunked-coding decoder that works on whatever bytes have arrived.
//!
//! Everything here is pure (no I/O), so it is tested on byte strings,
//! including property tests that cut the input at every possible place.

use std::ops::Range;

/// Longest response head accepted from an instance (hyper's default
/// buffer limit is in the same range).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in one head (hyper's default is 100).
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest chunk-size line or trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// Why bytes from an instance are not acceptable HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CodecError {
    #[error("invalid response head: {0}")]
    Head(&'static str),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid chunked body: {0}")]
    Chunked(&'static str),
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD, 1xx, 204, 304, or `Content-Length: 0`).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the instance closes the connection.
    Close,
}

/// A parsed response head. Header names and values are ranges into the
/// buffer it was parsed from, so parsing allocates nothing.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(Range<usize>, Range<usize>)>,
    /// Bytes of the head, including the blank line.
    pub(crate) len: usize,
    pub(crate) framing: Framing,
    /// The instance lets the connection be used again after this response.
    pub(crate) keep_alive: bool,
}

/// Parse a response head at the start of `buf`. `Ok(None)`: not complete
/// yet. `request_was_head`: the response to a HEAD request has no body,
/// whatever its headers say.
pub(crate) fn parse_response(
    buf: &[u8],
    request_was_head: bool,
) -> Result<Option<ResponseHead>, CodecError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_HEAD {
                Err(CodecError::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(CodecError::Head("too many headers")),
        Err(_) => return Err(CodecError::Head("malformed")),
    };
    if len > MAX_HEAD {
        return Err(CodecError::HeadTooLarge);
    }
    let status = resp.code.ok_or(CodecError::Head("no status"))?;
    let minor = resp.version.ok_or(CodecError::Head("no version"))?;
    let mut headers = Vec::with_capacity(resp.headers.len());
    let mut content_length: Option<u64> = None;
    let mut chunked = None;
    let mut close = false;
    let mut keep_alive_token = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(h.value).ok_or(CodecError::Head("bad Content-Length"))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(CodecError::Head("conflicting Content-Length"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only the last coding decides (RFC 9112 §6.3 item 4).
            chunked = Some(last_token_is(h.value, b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= has_token(h.value, b"close");
            keep_alive_token |= has_token(h.value, b"keep-alive");
        }
        headers.push((range_in(buf, name), range_in(buf, h.value)));
    }
    let framing =
        if request_was_head || (100..200).contains(&status) || status == 204 || status == 304 {
            Framing::Empty
        } else if let Some(chunked) = chunked {
            if chunked {
                Framing::Chunked
            } else {
                Framing::Close
            }
        } else {
            match content_length {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None => Framing::Close,
            }
        };
    let keep_alive = framing != Framing::Close
        && !close
        && (minor >= 1 || keep_alive_token)
        // A head with both is a smuggling attempt or a broken instance:
        // answer this one, never reuse the connection.
        && !(chunked.is_some() && content_length.is_some());
    Ok(Some(ResponseHead {
        status,
        headers,
        len,
        framing,
        keep_alive,
    }))
}

/// The range `part` occupies inside `buf` (`part` is a sub-slice of it).
fn range_in(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(buf.as_ptr() as usize);
    start..start + part.len()
}

/// Digits only, no sign, no list (RFC 9110 §8.6).
pub(crate) fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

fn last_token_is(value: &[u8], token: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .find(|t| !t.is_empty())
        .is_some_and(|t| t.eq_ignore_ascii_case(token))
}

/// Headers a proxy must not forward (RFC 9110 §7.6.1), besides those the
/// `Connection` header names.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// One step of decoding a chunked body from the bytes at hand.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// The first `n` bytes are body data.
    Data(usize),
    /// The first `n` bytes are framing: drop them.
    Skip(usize),
    /// Nothing can be decoded until more bytes arrive.
    NeedMore,
    /// The body ended after the first `n` bytes (the last chunk and the
    /// trailers).
    Done(usize),
}

/// Decoder state for a chunked body (RFC 9112 §7.1). Trailers are read
/// and dropped.
#[derive(Debug, Default)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
    /// Data bytes left in the current chunk.
    remaining: u64,
    trailer_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data,
    DataEnd,
    Trailers,
    Done,
}

impl ChunkedDecoder {
    /// Decode from `buf` (the unconsumed bytes); the caller drops the bytes
    /// the step names before calling again.
    pub(crate) fn step(&mut self, buf: &[u8]) -> Result<Step, CodecError> {
        match self.state {
            ChunkState::Size => {
                let Some(eol) = find_crlf(buf) else {
                    return if buf.len() > MAX_CHUNK_LINE {
                        Err(CodecError::Chunked("chunk-size line too long"))
                    } else {
                        Ok(Step::NeedMore)
                    };
                };
                let line = &buf[..eol];
                // Extensions (`;name=value`) are allowed and ignored.
                let size = line
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                if size.is_empty() || size.len() > 15 {
                    return Err(CodecError::Chunked("bad chunk size"));
                }
                let mut n = 0u64;
                for &b in size {
                    let d = (b as char)
                        .to_digit(16)
                        .ok_or(CodecError::Chunked("bad chunk size"))?;
                    n = n * 16 + u64::from(d);
                }
                self.remaining = n;
                self.state = if n == 0 {
                    ChunkState::Trailers
                } else {
                    ChunkState::Data
                };
                Ok(Step::Skip(eol + 2))
            }
            ChunkState::Data => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                self.remaining -= n as u64;
                if self.remaining == 0 {
                    self.state = ChunkState::DataEnd;
                }
                Ok(Step::Data(n))
            }
            ChunkState::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(CodecError::Chunked("chunk data not followed by CRLF"));
                }
                self.state = ChunkState::Size;
                Ok(Step::Skip(2))
            }
            ChunkState::Trailers => {
                let Some(eol) = find_crlf(buf) else {
                    return if self.trailer_bytes + buf.len() > MAX_TRAILERS {
                        Err(CodecError::Chunked("trailers too long"))
                    } else {
                        Ok(Step::NeedMore)
                    };
                };
                if eol == 0 {
                    self.state = ChunkState::Done;
                    return Ok(Step::Done(2));
                }
                self.trailer_bytes += eol + 2;
                if self.trailer_bytes > MAX_TRAILERS {
                    return Err(CodecError::Chunked("trailers too long"));
                }
                Ok(Step::Skip(eol + 2))
            }
            ChunkState::Done => Ok(Step::Done(0)),
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Append the chunk-size line for `len` data bytes.
pub(crate) fn chunk_header(out: &mut Vec<u8>, len: usize) {
    use std::io::Write;
    let _ = write!(out, "{len:x}\r\n");
}

/// The last chunk with no trailers.
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    fn head(s: &str) -> ResponseHead {
        parse_response(s.as_bytes(), false).unwrap().unwrap()
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n").framing,
            Framing::Length(5)
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").framing,
            Framing::Empty
        );
        let c = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(c.framing, Framing::Chunked);
        assert!(c.keep_alive);
        let c = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        assert_eq!(c.framing, Framing::Close);
        assert!(!c.keep_alive);
        let c = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(c.framing, Framing::Close);
        assert!(!c.keep_alive);
        for s in [
            "204 No Content",
            "304 Not Modified",
            "101 Switching Protocols",
            "100 Continue",
        ] {
            let h = head(&format!("HTTP/1.1 {s}\r\nContent-Length: 9\r\n\r\n"));
            assert_eq!(h.framing, Framing::Empty, "{s}");
        }
        let h = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        assert!(h.keep_alive);
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        assert!(
            !head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n").keep_alive
        );
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n").keep_alive);
        assert!(
            head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n")
                .keep_alive
        );
        // Both framings: answered, never reused.
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.keep_alive);
    }

    #[test]
    fn bad_heads_are_errors_not_panics() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(parse_response(bad.as_bytes(), false).is_err(), "{bad:?}");
        }
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nA: b\r\n", false)
                .unwrap()
                .is_none()
        );
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("h{i}: v\r\n"))
            .collect();
        let s = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(
            parse_response(s.as_bytes(), false).unwrap_err(),
            CodecError::Head("too many headers")
        );
        let huge = format!("HTTP/1.1 200 OK\r\nA: {}", "x".repeat(MAX_HEAD));
        assert_eq!(
            parse_response(huge.as_bytes(), false).unwrap_err(),
            CodecError::HeadTooLarge
        );
    }

    #[test]
    fn header_ranges_point_into_the_buffer() {
        let s = b"HTTP/1.1 404 Not Here\r\nX-A: 1\r\nx-b:  two \r\n\r\nbody";
        let h = parse_response(s, false).unwrap().unwrap();
        assert_eq!(h.status, 404);
        let names: Vec<_> = h
            .headers
            .iter()
            .map(|(n, v)| (&s[n.clone()], &s[v.clone()]))
            .collect();
        assert_eq!(names, [(&b"X-A"[..], &b"1"[..]), (b"x-b", b"two")]);
        assert_eq!(&s[h.len..], b"body");
    }

    /// Decode `input` fed in pieces cut at `cuts`; returns the data and the
    /// bytes consumed at the end.
    fn decode_in_pieces(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, usize), CodecError> {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        let mut avail = 0; // bytes "arrived" so far
        let mut pos = 0; // bytes consumed
        let mut cuts = cuts
            .iter()
            .copied()
            .filter(|&c| c <= input.len())
            .collect::<Vec<_>>();
        cuts.sort_unstable();
        cuts.push(input.len());
        let mut next_cut = cuts.into_iter();
        loop {
            match d.step(&input[pos..avail])? {
                Step::Data(n) => {
                    out.extend_from_slice(&input[pos..pos + n]);
                    pos += n;
                }
                Step::Skip(n) => pos += n,
                Step::Done(n) => return Ok((out, pos + n)),
                Step::NeedMore => match next_cut.next() {
                    Some(c) => avail = avail.max(c),
                    None => return Err(CodecError::Chunked("truncated")),
                },
            }
        }
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let body =
            b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (data, used) = decode_in_pieces(body, &[]).unwrap();
        assert_eq!(data, b"Wikipedia in\r\n\r\nchunks.");
        assert_eq!(&body[used..], b"NEXT");
        for bad in [
            &b"x\r\n"[..],
            b"4\r\nWikiXX",
            b"ffffffffffffffff\r\n",
            b"\r\n",
        ] {
            assert!(decode_in_pieces(bad, &[]).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn chunked_round_trips_whatever_the_read_boundaries(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            cuts in proptest::collection::vec(0usize..3000, 0..12),
        ) {
            let mut enc = Vec::new();
            for c in &chunks {
                chunk_header(&mut enc, c.len());
                enc.extend_from_slice(c);
                enc.extend_from_slice(b"\r\n");
            }
            enc.extend_from_slice(LAST_CHUNK);
            let (data, used) = decode_in_pieces(&enc, &cuts).unwrap();
            prop_assert_eq!(data, chunks.concat());
            prop_assert_eq!(used, enc.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_in_pieces(&bytes, &[]);
            let _ = parse_response(&bytes, false);
        }
    }
}
