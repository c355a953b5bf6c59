//! Human output: aligned tables, colours, and the `service.N |` log prefix.

use std::io::Write;

use berth_model::api::Instance;
use berth_model::{LogLine, LogStream};
use serde::Serialize;

/// Stdout was closed by its reader (`berth ps | head -1`). Not a failure:
/// the reader has what it wanted, so `main` exits quietly with success.
#[derive(Debug)]
pub struct BrokenPipe;

impl std::fmt::Display for BrokenPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for BrokenPipe {}

/// Whether `err` is (or wraps) a [`BrokenPipe`].
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.is::<BrokenPipe>()
            || e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Write `text` to stdout as is. Every command writes its output through
/// this (or [`print_line`] / [`print_json`]) so a closed pipe ends the
/// command quietly instead of panicking in `println!`.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                anyhow::Error::new(BrokenPipe)
            } else {
                anyhow::Error::new(e).context("cannot write to stdout")
            }
        })
}

/// [`print_out`] of `text` and a newline.
pub fn print_line(text: impl std::fmt::Display) -> anyhow::Result<()> {
    print_out(&format!("{text}\n"))
}

/// [`print_line`] of `value` as pretty JSON.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    print_line(serde_json::to_string_pretty(value)?)
}

/// ANSI colours cycled through by service, like Compose's.
const PALETTE: &[&str] = &["36", "33", "32", "35", "34", "96", "93", "92", "95", "94"];

/// A stable colour for a service name (same name, same colour, every run).
pub fn service_color(service: &str) -> &'static str {
    // FNV-1a: stable across runs and Rust versions, unlike `DefaultHasher`.
    let mut h: u32 = 0x811c_9dc5;
    for b in service.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    PALETTE[(h as usize) % PALETTE.len()]
}

/// Wrap `s` in an ANSI colour when `on`.
pub fn paint(s: &str, code: &str, on: bool) -> String {
    if on {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_owned()
    }
}

/// Formats log lines with a padded, coloured `service.N |` prefix.
#[derive(Debug)]
pub struct LogPrinter {
    /// Colours on.
    pub color: bool,
    /// Print the prefix.
    pub prefix: bool,
    /// Prefix width so far (grows, never shrinks, so columns stay aligned).
    pub width: usize,
}

impl LogPrinter {
    /// A printer; `width` starts at the longest expected prefix.
    pub fn new(color: bool, prefix: bool, width: usize) -> Self {
        Self {
            color,
            prefix,
            width,
        }
    }

    /// One formatted line (without newline).
    pub fn format(&mut self, line: &LogLine) -> String {
        if !self.prefix {
            return line.line.clone();
        }
        let name = if line.key.slot == 0 {
            line.key.service.clone()
        } else {
            line.key.short()
        };
        self.width = self.width.max(name.len());
        let head = format!("{name:<w$} |", w = self.width);
        let head = paint(&head, service_color(&line.key.service), self.color);
        match line.stream {
            LogStream::System => format!("{head} {}", paint(&line.line, "2", self.color)),
            _ => format!("{head} {}", line.line),
        }
    }

    /// Print one line to stdout; a closed stdout is a [`BrokenPipe`] error.
    pub fn print(&mut self, line: &LogLine) -> anyhow::Result<()> {
        print_line(self.format(line))
    }
}

/// An aligned text table.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these headers.
    pub fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// Add a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Drop columns that are empty in every row (but the header).
    pub fn drop_empty_columns(&mut self, droppable: &[usize]) {
        let mut drop: Vec<usize> = droppable
            .iter()
            .copied()
            .filter(|&c| {
                self.rows
                    .iter()
                    .skip(1)
                    .all(|r| r.get(c).is_none_or(|s| s.is_empty()))
            })
            .collect();
        drop.sort_unstable_by(|a, b| b.cmp(a));
        for c in drop {
            for r in &mut self.rows {
                if c < r.len() {
                    r.remove(c);
                }
            }
        }
    }

    /// Render with two spaces between columns; the last column is not padded.
    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; cols];
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i + 1 == r.len() {
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    let pad = widths[i] - c.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `1h02m`, `3m05s`, `12s`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The `ps` table of instances.
pub fn instance_table(rows: &[Instance], color: bool) -> String {
    let mut t = Table::new(&[
        "STACK", "SERVICE", "INSTANCE", "STATE", "HEALTH", "PID", "ADDRESS", "RESTARTS", "UPTIME",
        "NOTE",
    ]);
    for r in rows {
        let state = r.state.to_string();
        let note = [r.limits_warning.as_deref(), r.message.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; ");
        let health = r.health.to_string();
        t.row(vec![
            r.stack.clone(),
            r.service.clone(),
            r.instance.clone(),
            state,
            health,
            r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            r.address.clone().unwrap_or_else(|| "-".into()),
            r.restarts.to_string(),
            r.uptime_s.map(human_duration).unwrap_or_else(|| "-".into()),
            note.replace('\n', " "),
        ]);
    }
    t.drop_empty_columns(&[9]);
    let text = t.render();
    if !color {
        return text;
    }
    // Colour the STATE/HEALTH words after alignment, so padding stays right.
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                return format!("{l}\n");
            }
            let mut l = l.to_owned();
            for (word, code) in [
                (" running ", "32"),
                (" healthy ", "32"),
                (" unhealthy ", "31"),
                (" failed ", "31"),
                (" backoff ", "33"),
                (" starting ", "33"),
                (" pending ", "33"),
            ] {
                if let Some(pos) = l.find(word) {
                    let w = word.trim();
                    l.replace_range(pos + 1..pos + 1 + w.len(), &paint(w, code, true));
                }
            }
            format!("{l}\n")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_drop_empty_columns() {
        let mut t = Table::new(&["A", "LONG", "NOTE"]);
        t.row(vec!["xyz".into(), "1".into(), String::new()]);
        t.drop_empty_columns(&[2]);
        assert_eq!(t.render(), "A    LONG\nxyz  1\n");
    }

    #[test]
    fn colours_are_stable_per_service() {
        assert_eq!(service_color("web"), service_color("web"));
        assert_eq!(human_duration(3725), "1h02m");
        assert_eq!(human_duration(65), "1m05s");
    }
}
