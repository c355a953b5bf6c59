//! `.env` and `env_file` parsing: `KEY=VALUE` lines, `#` comments, blank
//! lines, an optional `export ` prefix, single quotes (literal), double
//! quotes (with `\n`, `\t`, `\"`, `\\`, `\$` escapes, may span lines), and
//! unquoted values whose trailing ` # comment` is dropped. A line holding
//! only `KEY` means "take KEY from the environment" (value `None`).
//!
//! Unquoted and double-quoted values are then interpolated ([`resolve`]) as
//! Compose does; single-quoted ones are taken literally.

use std::collections::BTreeMap;
use std::path::Path;

use crate::diagnostics::{Diagnostic, Diags};
use crate::interpolate::{InterpError, interpolate};

/// One parsed entry, before interpolation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The variable name.
    pub key: String,
    /// The value as written (quotes removed, escapes applied; a `$` escaped
    /// in double quotes is kept as `$$` for interpolation). `None` for a
    /// bare `KEY` line.
    pub value: Option<String>,
    /// Single-quoted: not interpolated.
    pub literal: bool,
    /// 1-based line of the value (or of the key, for a bare `KEY`).
    pub line: usize,
    /// 1-based column of the value.
    pub column: usize,
}

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
            out.push(Entry {
                key: key.to_string(),
                value: None,
                literal: false,
                line: i + 1,
                column: indent + 1,
            });
            i += 1;
            continue;
        };
        let v = value.trim_start();
        let value_col = indent + line.len() - v.len();
        let start_line = i;
        let literal = v.starts_with('\'');
        let parsed = if let Some(body) = v.strip_prefix('\'') {
            match body.find('\'') {
                Some(end) => body[..end].to_string(),
                None => return Err(err(i, value_col, "unterminated single quote".into())),
            }
        } else if let Some(body) = v.strip_prefix('"') {
            // A double-quoted value may continue over several lines.
            let mut text = body.to_string();
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
        out.push(Entry {
            key: key.to_string(),
            value: Some(parsed),
            literal,
            line: start_line + 1,
            column: value_col + 1,
        });
        i += 1;
    }
    Ok(out)
}

/// Interpolates the values of one env file's `entries`, in order, as
/// Compose does: a variable is looked up with `lookup` first (the caller's
/// environment over the project's `.env`), then among the entries above it
/// in the same file. Single-quoted values are literal. A bare `KEY` takes
/// its value from `lookup` (`None` when it has none). Unset variables warn
/// and become empty; a failed `${VAR:?msg}` or a malformed `$` is an error
/// at the value's position and drops the entry. `service` names the service
/// whose `env_file` this is, for the diagnostics.
pub fn resolve(
    file: &Path,
    entries: Vec<Entry>,
    lookup: &dyn Fn(&str) -> Option<String>,
    service: Option<&str>,
    diags: &mut Diags,
) -> Vec<(String, Option<String>)> {
    let mut earlier: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let at = |msg: String| {
            let d = Diagnostic {
                file: file.to_path_buf(),
                line: e.line,
                column: e.column,
                service: None,
                field: None,
                message: msg,
                hint: None,
            };
            match service {
                Some(s) => d.service(s),
                None => d,
            }
        };
        let value = match e.value {
            None => lookup(&e.key),
            Some(v) if e.literal => Some(v),
            Some(v) => {
                let look = |name: &str| lookup(name).or_else(|| earlier.get(name).cloned());
                let mut unset = Vec::new();
                match interpolate(&v, &look, &mut unset) {
                    Ok(s) => {
                        for var in unset {
                            diags.warn(
                                at(format!(
                                    "variable `{var}` is not set; using an empty string"
                                ))
                                .hint(format!(
                                    "set `{var}` in the environment, in the `.env` file or above this line, or give a default with `${{{var}:-default}}`"
                                )),
                            );
                        }
                        Some(s)
                    }
                    Err(err) => {
                        let hint = match &err {
                            InterpError::Required { var, .. } => format!(
                                "set `{var}` in the environment, in the `.env` file or above this line"
                            ),
                            InterpError::Invalid { .. } => {
                                "write `$$` for a literal `$`, or single-quote the value".into()
                            }
                        };
                        diags.error(at(err.to_string()).hint(hint));
                        continue;
                    }
                }
            }
        };
        if let Some(v) = &value {
            earlier.insert(e.key.clone(), v.clone());
        }
        out.push((e.key, value));
    }
    out
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
                // Kept escaped: the value is interpolated next.
                Some('$') => out.push_str("$$"),
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
