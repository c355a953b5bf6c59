//! The `Date` header of the router's own responses (error pages): an
//! origin of a response that has a clock sends one (RFC 9110 §6.6.1), and
//! clients and caches use it to age what they keep. Formatted at most once
//! per second per thread, as nginx and hyper do: the router's threads each
//! run one current-thread runtime, so a thread-local cache needs no lock.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    /// The second last formatted, and its IMF-fixdate.
    static CACHE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Append `date: <now as IMF-fixdate>\r\n` to `out`.
pub(crate) fn write_header(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            c.1 = httpdate::fmt_http_date(now);
            c.0 = secs;
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(c.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_an_imf_fixdate_of_now() {
        let before = SystemTime::now() - std::time::Duration::from_secs(1);
        let mut out = Vec::new();
        write_header(&mut out);
        write_header(&mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        let value = lines[0].strip_prefix("date: ").unwrap();
        assert_eq!(value.len(), 29, "{value:?}");
        let at = httpdate::parse_http_date(value).unwrap();
        assert!(at >= before && at <= SystemTime::now(), "{value}");
    }
}
