//! Diagnostics: every error and warning the loader reports, each pinned to
//! a file, line and column, with the service and field it concerns and, when
//! there is one, a hint saying how to fix it.

use std::fmt;
use std::path::PathBuf;

use crate::yaml::Pos;

/// One error or warning about a stack file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line (0 when the problem is about the file as a whole).
    pub line: usize,
    /// 1-based column (0 when the problem is about the file as a whole).
    pub column: usize,
    /// The service concerned, if any.
    pub service: Option<String>,
    /// Dotted path of the field, e.g. `services.web.healthcheck.interval`.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// A diagnostic at `pos`.
    pub(crate) fn at(pos: &Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            file: pos.file.to_path_buf(),
            line: pos.line,
            column: pos.column,
            service: None,
            field: None,
            message: message.into(),
            hint: None,
        }
    }

    /// A diagnostic about a whole file (no position).
    pub(crate) fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.into(),
            line: 0,
            column: 0,
            service: None,
            field: None,
            message: message.into(),
            hint: None,
        }
    }

    /// Adds a hint.
    pub(crate) fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Sets the field path.
    pub(crate) fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Sets the service.
    pub(crate) fn service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        write!(f, ": ")?;
        // The field is shown relative to the service when there is one, as
        // the service is already named.
        let field = self.field.as_deref().and_then(|field| match &self.service {
            Some(svc) if field == format!("services.{svc}") => None,
            Some(svc) => Some(
                field
                    .strip_prefix(&format!("services.{svc}."))
                    .unwrap_or(field),
            ),
            None => Some(field),
        });
        match (&self.service, field) {
            (Some(svc), Some(field)) => write!(f, "service `{svc}`, field `{field}`: ")?,
            (Some(svc), None) => write!(f, "service `{svc}`: ")?,
            (None, Some(field)) => write!(f, "field `{field}`: ")?,
            (None, None) => {}
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// Loading failed; every error found is listed (not just the first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    /// The errors, in file order.
    pub errors: Vec<Diagnostic>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects errors and warnings while loading, so that one run reports every
/// problem instead of stopping at the first.
#[derive(Debug, Default)]
pub(crate) struct Diags {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl Diags {
    pub fn error(&mut self, d: Diagnostic) {
        if !self.errors.contains(&d) {
            self.errors.push(d);
        }
    }

    pub fn warn(&mut self, d: Diagnostic) {
        if !self.warnings.contains(&d) {
            self.warnings.push(d);
        }
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }
}
