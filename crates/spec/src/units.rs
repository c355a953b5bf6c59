//! Compose's small value languages: durations (`1m30s`), byte sizes
//! (`512M`), and signal names (`TERM`, `SIGTERM`, `15`).

/// Parses a Compose (Go-style) duration into nanoseconds: one or more
/// `NUMBER UNIT` groups, units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`; `0` alone
/// is allowed.
pub fn parse_duration_ns(s: &str) -> Option<u128> {
    let s = s.trim();
    if s == "0" {
        return Some(0);
    }
    if s.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_digit() || *c == '.'))
            .map_or(rest.len(), |(i, _)| i);
        if num_len == 0 {
            return None;
        }
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let factor: f64 = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * factor;
    }
    if !total.is_finite() || total > 1e30 {
        return None;
    }
    Some(total as u128)
}

/// A duration in whole milliseconds (sub-millisecond parts round down).
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    u64::try_from(parse_duration_ns(s)? / 1_000_000).ok()
}

/// Parses a byte size: a number with an optional unit `b`, `k`/`kb`,
/// `m`/`mb`, `g`/`gb`, `t`/`tb` (any case, powers of 1024, as Docker does).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.'))
        .map_or(s.len(), |(i, _)| i);
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0_f64.powi(4),
        _ => return None,
    };
    let v = n * mult;
    if !v.is_finite() || v >= u64::MAX as f64 {
        return None;
    }
    Some(v as u64)
}

const SIGNALS: &[(&str, u32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// Normalises a signal to its `SIGNAME` form (`TERM`, `sigterm`, `15` →
/// `SIGTERM`); `None` if it is not a Linux signal.
pub fn normalize_signal(s: &str) -> Option<String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u32>() {
        return SIGNALS
            .iter()
            .find(|(_, num)| *num == n)
            .map(|(name, _)| format!("SIG{name}"));
    }
    let upper = s.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(name, _)| *name == bare)
        .map(|(name, _)| format!("SIG{name}"))
}
