//! Compose variable interpolation: `$VAR`, `${VAR}`, `${VAR:-default}`,
//! `${VAR-default}`, `${VAR:?err}`, `${VAR?err}`, `${VAR:+alt}`,
//! `${VAR+alt}`, `$$` for a literal dollar; defaults may nest further
//! substitutions. A `$` followed by anything else is an error, as in Compose.

/// Why a string could not be interpolated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpError {
    /// `${VAR:?msg}` / `${VAR?msg}` with the variable missing (or empty).
    #[error("required variable `{var}` is missing a value: {message}")]
    Required {
        /// The variable.
        var: String,
        /// The message written after `?`.
        message: String,
    },
    /// A malformed `$` expression.
    #[error("invalid interpolation `{text}`: {reason}")]
    Invalid {
        /// The offending text.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Interpolates `input`; `lookup` gives a variable's value; variables that
/// are unset and have no default are recorded in `unset` (Compose warns and
/// substitutes an empty string).
pub fn interpolate(
    input: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<String>,
) -> Result<String, InterpError> {
    if !input.contains('$') {
        return Ok(input.to_string());
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = matching_brace(body).ok_or_else(|| InterpError::Invalid {
                text: truncate(&rest[i..]),
                reason: "`${` is never closed by `}`",
            })?;
            out.push_str(&braced(&body[..end], lookup, unset)?);
            rest = &body[end + 1..];
        } else {
            let n = name_len(after);
            if n == 0 {
                return Err(InterpError::Invalid {
                    text: truncate(&rest[i..]),
                    reason: "`$` must start a variable (`$VAR`, `${VAR}`) or be doubled (`$$`) for a literal dollar",
                });
            }
            let name = &after[..n];
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => note_unset(unset, name),
            }
            rest = &after[n..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn note_unset(unset: &mut Vec<String>, name: &str) {
    if !unset.iter().any(|u| u == name) {
        unset.push(name.to_string());
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Length of the variable name at the start of `s`.
fn name_len(s: &str) -> usize {
    let mut n = 0;
    for (i, c) in s.char_indices() {
        let ok = c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit());
        if !ok {
            break;
        }
        n = i + c.len_utf8();
    }
    n
}

/// Index of the `}` closing a `${` whose body starts `s`.
fn matching_brace(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut depth = 1usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'$') => i += 2,
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 2;
            }
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    None
}

fn braced(
    body: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<String>,
) -> Result<String, InterpError> {
    let n = name_len(body);
    let invalid = |reason| InterpError::Invalid {
        text: truncate(&format!("${{{body}}}")),
        reason,
    };
    if n == 0 {
        return Err(invalid("expected a variable name after `${`"));
    }
    let name = &body[..n];
    let op = &body[n..];
    let value = lookup(name);
    if op.is_empty() {
        return Ok(match value {
            Some(v) => v,
            None => {
                note_unset(unset, name);
                String::new()
            }
        });
    }
    let (colon, op_rest) = match op.strip_prefix(':') {
        Some(r) => (true, r),
        None => (false, op),
    };
    let mut chars = op_rest.chars();
    let kind = chars.next();
    let arg = chars.as_str();
    // With a colon, an empty value counts as missing.
    let present = match &value {
        Some(v) => !(colon && v.is_empty()),
        None => false,
    };
    match kind {
        Some('-') => {
            if present {
                Ok(value.unwrap_or_default())
            } else {
                interpolate(arg, lookup, unset)
            }
        }
        Some('?') => {
            if present {
                Ok(value.unwrap_or_default())
            } else {
                Err(InterpError::Required {
                    var: name.to_string(),
                    message: interpolate(arg, lookup, unset)?,
                })
            }
        }
        Some('+') => {
            if present {
                interpolate(arg, lookup, unset)
            } else {
                Ok(String::new())
            }
        }
        _ => Err(invalid(
            "expected `}`, `:-`, `-`, `:?`, `?`, `:+` or `+` after the variable name",
        )),
    }
}
