//! YAML → a small position-carrying tree.
//!
//! The tree is built from `saphyr-parser` events rather than through saphyr's
//! own document types because the loader needs, for every key and value, the
//! exact line and column, the raw text of scalars (so `1.10` stays `1.10`
//! and is not turned into a float), the quoting style (a quoted `"null"` is a
//! string), the `!reset`/`!override` tags Compose uses, and the `<<` merge
//! keys, which saphyr does not apply. Anchors and aliases are expanded here,
//! with a cap on the total size so a "billion laughs" document is an error
//! and not an out-of-memory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use crate::diagnostics::Diagnostic;

/// Upper bound on nodes in one document after alias expansion.
const MAX_NODES: usize = 200_000;

/// Where a node was written, and the directory its relative paths resolve
/// against (the file's folder, or an include's `project_directory`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pos {
    /// The file.
    pub file: Arc<Path>,
    /// Base directory for relative paths written in that file.
    pub base: Arc<Path>,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// A YAML node.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where the node starts.
    pub pos: Pos,
    /// A local tag such as `!reset`, if any.
    pub tag: Option<String>,
    /// The content.
    pub value: Value,
}

/// The content of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`, `~` or nothing.
    Null,
    /// A scalar as written; `quoted` is true for quoted and block scalars,
    /// which are always strings.
    Scalar {
        /// The text.
        text: String,
        /// Written quoted (or as a block).
        quoted: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in file order, merge keys applied, keys unique.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// A node with the given value at `pos`.
    pub fn new(pos: Pos, value: Value) -> Self {
        Node {
            pos,
            tag: None,
            value,
        }
    }

    /// A string scalar at `pos`.
    pub fn string(pos: Pos, text: impl Into<String>) -> Self {
        Node::new(
            pos,
            Value::Scalar {
                text: text.into(),
                quoted: true,
            },
        )
    }

    /// The scalar text (numbers and booleans included), if a scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The entries, if a mapping.
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The items, if a sequence.
    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// True for `null`.
    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }

    /// The value under `key`, if a mapping holding it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// The key node for `key`, if a mapping holding it.
    pub fn key_node(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(k, _)| k)
    }

    /// What kind of node this is, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Scalar { text, quoted } => {
                if *quoted {
                    "a string"
                } else if text == "true" || text == "false" {
                    "a boolean"
                } else if text.parse::<f64>().is_ok() {
                    "a number"
                } else {
                    "a string"
                }
            }
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// JSON rendering (for extension fields and `networks`): plain scalars
    /// become booleans and numbers where YAML would read them so.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Scalar { text, quoted: true } => J::String(text.clone()),
            Value::Scalar {
                text,
                quoted: false,
            } => plain_scalar_json(text),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// YAML 1.2 core-schema reading of a plain scalar.
pub fn plain_scalar_json(text: &str) -> serde_json::Value {
    use serde_json::Value as J;
    match text {
        "true" | "True" | "TRUE" => return J::Bool(true),
        "false" | "False" | "FALSE" => return J::Bool(false),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return J::from(i);
    }
    let numeric = !text.is_empty()
        && text.chars().any(|c| c.is_ascii_digit())
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    if numeric
        && let Ok(f) = text.parse::<f64>()
        && let Some(n) = serde_json::Number::from_f64(f)
    {
        return J::Number(n);
    }
    J::String(text.to_string())
}

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        tag: Option<String>,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        tag: Option<String>,
        items: Vec<Node>,
    },
}

struct Builder {
    file: Arc<Path>,
    base: Arc<Path>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    docs: Vec<Node>,
    nodes: usize,
}

impl Builder {
    fn pos(&self, span: &Span) -> Pos {
        Pos {
            file: self.file.clone(),
            base: self.base.clone(),
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }

    fn push(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            Some(Frame::Seq { items, .. } | Frame::Map { items, .. }) => items.push(node),
            None => self.docs.push(node),
        }
    }
}

fn count_nodes(node: &Node) -> usize {
    1 + match &node.value {
        Value::Seq(items) => items.iter().map(count_nodes).sum(),
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| count_nodes(k) + count_nodes(v))
            .sum(),
        _ => 0,
    }
}

/// Parses `content` (the text of `file`) into its single document's root,
/// `None` for a file with no document (empty or only comments).
pub fn parse(file: &Path, base: &Path, content: &str) -> Result<Option<Node>, Diagnostic> {
    let mut b = Builder {
        file: Arc::from(file),
        base: Arc::from(base),
        stack: Vec::new(),
        anchors: HashMap::new(),
        docs: Vec::new(),
        nodes: 0,
    };
    let mut parser = Parser::new_from_str(content);
    while let Some(ev) = parser.next_event() {
        let (ev, span) = ev.map_err(|e| {
            let mark = e.marker();
            Diagnostic {
                file: file.to_path_buf(),
                line: mark.line(),
                column: mark.col() + 1,
                service: None,
                field: None,
                message: format!("invalid YAML: {}", e.info()),
                hint: Some(
                    "check the indentation (spaces only, children indented more than their parent) \
                     and that every `key: value` has a space after the colon"
                        .into(),
                ),
            }
        })?;
        b.nodes += 1;
        if b.nodes > MAX_NODES {
            return Err(Diagnostic::at(&b.pos(&span), "document too large")
                .hint("split the file; berth accepts at most 200000 YAML nodes"));
        }
        match ev {
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart(_)
            | Event::DocumentEnd => {}
            Event::Alias(id) => {
                let pos = b.pos(&span);
                let Some(node) = b.anchors.get(&id).cloned() else {
                    return Err(Diagnostic::at(&pos, "alias to an unknown anchor"));
                };
                b.nodes += count_nodes(&node);
                if b.nodes > MAX_NODES {
                    return Err(
                        Diagnostic::at(&pos, "aliases expand to too large a document")
                            .hint("berth accepts at most 200000 YAML nodes after alias expansion"),
                    );
                }
                b.push(node, 0);
            }
            Event::Scalar(text, style, anchor, tag) => {
                let pos = b.pos(&span);
                let tag = tag.map(|t| format!("{}{}", t.handle, t.suffix));
                let quoted = style != ScalarStyle::Plain
                    || tag.as_deref().is_some_and(|t| t.ends_with("str"));
                let value = if !quoted && matches!(&*text, "" | "~" | "null" | "Null" | "NULL") {
                    Value::Null
                } else {
                    Value::Scalar {
                        text: text.into_owned(),
                        quoted,
                    }
                };
                b.push(Node { pos, tag, value }, anchor);
            }
            Event::SequenceStart(anchor, tag) => {
                let pos = b.pos(&span);
                b.stack.push(Frame::Seq {
                    pos,
                    anchor,
                    tag: tag.map(|t| format!("{}{}", t.handle, t.suffix)),
                    items: Vec::new(),
                });
            }
            Event::MappingStart(anchor, tag) => {
                let pos = b.pos(&span);
                b.stack.push(Frame::Map {
                    pos,
                    anchor,
                    tag: tag.map(|t| format!("{}{}", t.handle, t.suffix)),
                    items: Vec::new(),
                });
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq {
                    pos,
                    anchor,
                    tag,
                    items,
                }) = b.stack.pop()
                {
                    b.push(
                        Node {
                            pos,
                            tag,
                            value: Value::Seq(items),
                        },
                        anchor,
                    );
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map {
                    pos,
                    anchor,
                    tag,
                    items,
                }) = b.stack.pop()
                {
                    let entries = build_map(items)?;
                    b.push(
                        Node {
                            pos,
                            tag,
                            value: Value::Map(entries),
                        },
                        anchor,
                    );
                }
            }
        }
    }
    let mut docs = b.docs.into_iter();
    let first = docs.next();
    if let Some(second) = docs.next() {
        return Err(Diagnostic::at(
            &second.pos,
            "a stack file must hold a single YAML document",
        )
        .hint("remove the `---` separator, or split the documents into several files passed with -f"));
    }
    Ok(first.filter(|n| !n.is_null()))
}

/// Pairs up keys and values, applies `<<` merge keys (explicit keys win,
/// earlier merge sources win over later ones) and rejects duplicate keys.
fn build_map(items: Vec<Node>) -> Result<Vec<(Node, Node)>, Diagnostic> {
    let mut explicit: Vec<(Node, Node)> = Vec::new();
    let mut merged: Vec<(Node, Node)> = Vec::new();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let is_merge = matches!(&k.value, Value::Scalar { text, quoted: false } if text == "<<");
        if is_merge {
            let sources: Vec<Node> = match v.value {
                Value::Map(_) => vec![v],
                Value::Seq(items) => items,
                _ => {
                    return Err(Diagnostic::at(
                        &v.pos,
                        format!(
                            "merge key `<<` needs a mapping or a list of mappings, found {}",
                            v.kind()
                        ),
                    ));
                }
            };
            for src in sources {
                let Value::Map(entries) = src.value else {
                    return Err(Diagnostic::at(
                        &src.pos,
                        "merge key `<<` needs a mapping or a list of mappings",
                    ));
                };
                for (mk, mv) in entries {
                    if !merged.iter().any(|(k2, _)| k2.as_str() == mk.as_str()) {
                        merged.push((mk, mv));
                    }
                }
            }
            continue;
        }
        let key_text = match &k.value {
            Value::Scalar { text, .. } => text.clone(),
            Value::Null => String::new(),
            _ => {
                return Err(Diagnostic::at(&k.pos, "mapping keys must be plain strings")
                    .hint("complex keys (`? [a, b]`) are not used by Compose"));
            }
        };
        if explicit
            .iter()
            .any(|(k2, _)| k2.as_str() == Some(&key_text))
        {
            return Err(
                Diagnostic::at(&k.pos, format!("duplicate key `{key_text}`"))
                    .hint("each key may appear once in a mapping; remove or merge the duplicate"),
            );
        }
        let k = Node {
            value: Value::Scalar {
                text: key_text,
                quoted: true,
            },
            ..k
        };
        explicit.push((k, v));
    }
    for (mk, mv) in merged {
        if !explicit.iter().any(|(k2, _)| k2.as_str() == mk.as_str()) {
            explicit.push((mk, mv));
        }
    }
    Ok(explicit)
}
