//! Parsing of the `since` parameter of the logs API: an RFC 3339 time, a
//! duration before now (`10m`, `1h30m`, `45s`: Compose's duration syntax,
//! parsed by [`berth_spec::units`] like every duration berth reads), or Unix
//! seconds.
//!
//! Pure functions: the caller passes `now`.

/// Why a `since` value could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {input:?} as a time: {reason}")]
pub struct TimeError {
    /// The value given.
    pub input: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// `since` → microseconds since the Unix epoch.
pub fn parse_since(input: &str, now_us: u64) -> Result<u64, TimeError> {
    let s = input.trim();
    let err = |reason| TimeError {
        input: input.to_owned(),
        reason,
    };
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().map_err(|_| err("number too large"))?;
        return secs.checked_mul(1_000_000).ok_or(err("number too large"));
    }
    if s.contains('T') || s.contains('t') || (s.len() >= 10 && s.as_bytes()[4] == b'-') {
        return parse_rfc3339(s).ok_or(err(
            "expected RFC 3339 like 2024-05-01T12:00:00Z, a duration like 10m, or Unix seconds",
        ));
    }
    let d = parse_duration_us(s).ok_or(err(
        "expected a duration like 10m, 1h30m or 45s, an RFC 3339 time, or Unix seconds",
    ))?;
    Ok(now_us.saturating_sub(d))
}

/// `1h30m`, `10m`, `45s`, `500ms` → microseconds: the stack file's duration
/// syntax ([`berth_spec::units::parse_duration_ns`]), so the API, the CLI and
/// stack files accept the same durations.
pub fn parse_duration_us(s: &str) -> Option<u64> {
    u64::try_from(berth_spec::units::parse_duration_ns(s)? / 1_000).ok()
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` → microseconds since the epoch.
fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = s.get(from..from + len)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (hour, min, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_us: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i.min(start + 6)];
        frac_us = digits.parse::<i64>().ok()? * 10i64.pow(6 - digits.len() as u32);
    }
    let offset_s: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let off = num(i + 1, 2)? * 3600 + num(i + 4, 2)? * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_s;
    let us = secs.checked_mul(1_000_000)?.checked_add(frac_us)?;
    u64::try_from(us).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000_000;

    #[test]
    fn durations_count_back_from_now() {
        assert_eq!(parse_since("10m", NOW), Ok(NOW - 600_000_000));
        assert_eq!(parse_since("1h30m", NOW), Ok(NOW - 5_400_000_000));
        assert_eq!(parse_since("500ms", NOW), Ok(NOW - 500_000));
        assert!(parse_since("10x", NOW).is_err());
        assert!(parse_since("m", NOW).is_err());
        assert_eq!(parse_since("1m30s", NOW), Ok(NOW - 90_000_000));
        assert_eq!(parse_since("1.5h", NOW), Ok(NOW - 5_400_000_000));
    }

    #[test]
    fn unix_seconds() {
        assert_eq!(parse_since("1700000000", NOW), Ok(NOW));
    }

    #[test]
    fn rfc3339_with_offsets_and_fractions() {
        // 2023-11-14T22:13:20Z is 1_700_000_000.
        assert_eq!(parse_since("2023-11-14T22:13:20Z", 0), Ok(NOW));
        assert_eq!(parse_since("2023-11-14T23:13:20+01:00", 0), Ok(NOW));
        assert_eq!(parse_since("2023-11-14T22:13:20.25Z", 0), Ok(NOW + 250_000));
        assert_eq!(parse_since("1970-01-01T00:00:00Z", 0), Ok(0));
        assert!(parse_since("2023-13-14T22:13:20Z", 0).is_err());
        assert!(parse_since("2023-11-14T22:13:20", 0).is_err());
    }
}
