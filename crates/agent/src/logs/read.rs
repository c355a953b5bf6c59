//! Reading past log lines back from the files, merged across instances.

use std::fs;
use std::path::{Path, PathBuf};

use berth_model::{InstanceKey, LogLine, LogStream};

use super::LogError;
use super::writer::CURRENT;

/// Which past lines to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogQuery {
    /// Namespace.
    pub namespace: String,
    /// Stack.
    pub stack: String,
    /// Services to include; empty means all.
    pub services: Vec<String>,
    /// Only lines at or after this time (µs since the epoch).
    pub since_us: Option<u64>,
    /// Only the last N lines after merging.
    pub tail: Option<usize>,
}

fn parse_line(key: &InstanceKey, s: &str) -> Option<LogLine> {
    let (ts, rest) = s.split_once(' ')?;
    let (kind, text) = rest.split_at_checked(1)?;
    let stream = match kind {
        "o" => LogStream::Stdout,
        "e" => LogStream::Stderr,
        "s" => LogStream::System,
        _ => return None,
    };
    Some(LogLine {
        key: key.clone(),
        ts_us: ts.parse().ok()?,
        stream,
        line: text.strip_prefix(' ').unwrap_or(text).to_owned(),
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The instance's files, newest first.
fn files_newest_first(dir: &Path) -> Result<Vec<PathBuf>, LogError> {
    let mut rotated: Vec<(u32, PathBuf)> = Vec::new();
    for e in fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        rotated.push((n, e.path()));
    }
    rotated.sort();
    let mut out = vec![dir.join(CURRENT)];
    out.extend(rotated.into_iter().map(|(_, p)| p));
    Ok(out)
}

/// Which lines a paged or searched read keeps (besides the query's own
/// `since` and `tail`): applied before `tail` counts.
pub type LineFilter = std::sync::Arc<dyn Fn(&LogLine) -> bool + Send + Sync>;

fn read_instance(
    dir: &Path,
    key: &InstanceKey,
    q: &LogQuery,
    keep: &LineFilter,
) -> Result<Vec<LogLine>, LogError> {
    let since = q.since_us.unwrap_or(0);
    // Files newest first; each file's lines are in order, so chunks are
    // prepended, and reading stops once enough (or old enough) lines are seen.
    let mut chunks: Vec<Vec<LogLine>> = Vec::new();
    let mut count = 0;
    for path in files_newest_first(dir)? {
        let text = match fs::read(&path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
        let lines: Vec<LogLine> = text.lines().filter_map(|l| parse_line(key, l)).collect();
        let reached_since = lines.first().is_some_and(|l| l.ts_us < since);
        let kept: Vec<LogLine> = lines
            .into_iter()
            .filter(|l| l.ts_us >= since && keep(l))
            .collect();
        count += kept.len();
        chunks.push(kept);
        if reached_since || q.tail.is_some_and(|t| count >= t) {
            break;
        }
    }
    Ok(chunks.into_iter().rev().flatten().collect())
}

pub(crate) fn read(root: &Path, q: &LogQuery, keep: &LineFilter) -> Result<Vec<LogLine>, LogError> {
    let stack_dir = root.join(&q.namespace).join(&q.stack);
    let entries = match fs::read_dir(&stack_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&stack_dir)(e)),
    };
    let mut all = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some((service, slot)) = name.to_str().and_then(|n| n.rsplit_once('.')) else {
            continue;
        };
        let Ok(slot) = slot.parse() else { continue };
        if !q.services.is_empty() && !q.services.iter().any(|s| s == service) {
            continue;
        }
        let key = InstanceKey {
            namespace: q.namespace.clone(),
            stack: q.stack.clone(),
            service: service.to_owned(),
            slot,
        };
        all.extend(read_instance(&e.path(), &key, q, keep)?);
    }
    all.sort_by(|a, b| a.ts_us.cmp(&b.ts_us).then_with(|| a.key.cmp(&b.key)));
    if let Some(t) = q.tail
        && all.len() > t
    {
        all.drain(..all.len() - t);
    }
    Ok(all)
}
