//! `.env` and `env_file` parsing: `KEY=VALUE` lines, `#` comments, blank
//! lines, an optional `export ` prefix, single quotes (literal), double
//! quotes (with `\n`, `\t`, `\"`, `\\` escapes, may span lines), and unquoted
//! values whose trailing ` # comment` is dropped. A line holding only `KEY`
//! means "take KEY from the environment" (value `None`).

use std::path::Path;

use crate::diagnostics::Diagnostic;

/// One parsed entry.
pub type Entry = (String, Option<String>);

/// Parses an env file's text. Errors carry the line and column.
pub fn parse(file: &Path, content: &str) -> Result<Vec<Entry>, Diagnostic> {
    let mut out: Vec<Entry> = Vec::new();
    let lines: Vec<&str> = content.lines().collect();
    let mut i = 0;
    let err = |line: usize, col: usize, msg: String| Diagnostic {
        file: file.to_path_buf(),
        line: line + 1,
        column: col + 1,
        service: None,
        field: None,
        message: msg,
        hint: Some("env files hold `KEY=VALUE` lines; `#` starts a comment".into()),
    };
    while i < lines.len() {
        let raw = lines[i].trim_start_matches('\u{feff}');
        let indent = raw.len() - raw.trim_start().len();
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            i += 1;
            continue;
        }
        let (line, indent) = match line.strip_prefix("export ") {
            Some(r) => (r.trim_start(), indent + 7),
            None => (line, indent),
        };
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v)),
            None => (line, None),
        };
        let key_ok = !key.is_empty()
            && !key
                .chars()
                .any(|c| c.is_whitespace() || c == '#' || c == '\'' || c == '"');
        if !key_ok {
            return Err(err(i, indent, format!("invalid variable name `{key}`")));
        }
        let Some(value) = value else {
            out.push((key.to_string(), None));
            i += 1;
            continue;
        };
        let v = value.trim_start();
        let value_col = indent + line.len() - v.len();
        let parsed = if let Some(body) = v.strip_prefix('\'') {
            match body.find('\'') {
                Some(end) => body[..end].to_string(),
                None => return Err(err(i, value_col, "unterminated single quote".into())),
            }
        } else if let Some(body) = v.strip_prefix('"') {
            // A double-quoted value may continue over several lines.
            let mut text = body.to_string();
            let start_line = i;
            loop {
                if let Some(s) = close_double(&text) {
                    break s;
                }
                i += 1;
                if i >= lines.len() {
                    return Err(err(
                        start_line,
                        value_col,
                        "unterminated double quote".into(),
                    ));
                }
                text.push('\n');
                text.push_str(lines[i]);
            }
        } else {
            let v = match v.find(" #") {
                Some(c) => &v[..c],
                None => v,
            };
            v.trim_end().to_string()
        };
        out.push((key.to_string(), Some(parsed)));
        i += 1;
    }
    Ok(out)
}

/// Unescapes a double-quoted body up to its closing quote, `None` if the
/// quote is not closed in `s`.
fn close_double(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some('$') => out.push('$'),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    None
}
