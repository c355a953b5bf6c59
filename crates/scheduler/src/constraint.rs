//! Swarm-syntax placement constraints: `node.labels.zone == east`,
//! `node.hostname != web-3`, `node.platform.arch == x86_64`.
//!
//! Attributes: `node.id`, `node.hostname` (the node id), `node.labels.<k>`,
//! `node.platform.arch`, `node.platform.os` and `node.facts.<k>` (facts are
//! compared as strings here; numeric comparisons come with the cluster work).

use berth_model::Node;

/// A parsed constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    attribute: String,
    equal: bool,
    value: String,
}

/// Why a constraint could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(String);

impl std::error::Error for ParseError {}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Constraint {
    /// Parse `ATTRIBUTE == VALUE` or `ATTRIBUTE != VALUE`.
    pub fn parse(expr: &str) -> Result<Self, ParseError> {
        let (attr, value, equal) = if let Some((a, v)) = expr.split_once("==") {
            (a, v, true)
        } else if let Some((a, v)) = expr.split_once("!=") {
            (a, v, false)
        } else {
            return Err(ParseError(
                "expected `ATTRIBUTE == VALUE` or `ATTRIBUTE != VALUE`".into(),
            ));
        };
        let attribute = attr.trim().to_owned();
        if !attribute.starts_with("node.") {
            return Err(ParseError(format!(
                "unknown attribute {attribute:?} (attributes start with `node.`)"
            )));
        }
        Ok(Self {
            attribute,
            equal,
            value: value.trim().to_owned(),
        })
    }

    /// Whether the node satisfies it. A missing attribute never equals.
    pub fn holds(&self, node: &Node) -> bool {
        let actual = self.lookup(node);
        (actual.as_deref() == Some(self.value.as_str())) == self.equal
    }

    fn lookup(&self, node: &Node) -> Option<String> {
        let a = self.attribute.as_str();
        match a {
            "node.id" | "node.hostname" => Some(node.id.clone()),
            "node.platform.arch" => fact(node, "arch"),
            "node.platform.os" => fact(node, "os"),
            _ => {
                if let Some(k) = a.strip_prefix("node.labels.") {
                    node.labels.get(k).cloned()
                } else if let Some(k) = a.strip_prefix("node.facts.") {
                    fact(node, k)
                } else {
                    None
                }
            }
        }
    }
}

fn fact(node: &Node, key: &str) -> Option<String> {
    node.facts.get(key).map(|v| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}
