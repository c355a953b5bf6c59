//! Evaluating parsed constraints ([`berth_spec::constraint`]) against nodes:
//! where each attribute comes from on a [`Node`] record, and the node
//! capacity the resource check uses.
//!
//! Facts are stored as JSON values (numbers or strings, as the agent reports
//! them); comparisons read them as text, numeric ones parse that text.

use std::borrow::Cow;

use berth_model::Node;
use berth_spec::constraint::{Attribute, Constraint};

/// The attribute's value on `node`, `None` when the node lacks it.
pub fn lookup<'n>(node: &'n Node, attribute: &Attribute) -> Option<Cow<'n, str>> {
    match attribute {
        Attribute::Id => Some(Cow::Borrowed(node.id.as_str())),
        Attribute::Hostname => fact(node, "hostname").or(Some(Cow::Borrowed(node.id.as_str()))),
        Attribute::Role => fact(node, "role"),
        Attribute::Arch => fact(node, "arch"),
        Attribute::Os => fact(node, "os"),
        Attribute::Label(k) => node.labels.get(k).map(|v| Cow::Borrowed(v.as_str())),
        Attribute::Fact(k) => fact(node, k),
    }
}

/// Whether `node` satisfies `constraint`.
pub fn holds(constraint: &Constraint, node: &Node) -> bool {
    constraint.holds(lookup(node, &constraint.attribute).as_deref())
}

/// A fact as text (numbers in their JSON form, `true`/`false` for booleans).
pub fn fact<'n>(node: &'n Node, key: &str) -> Option<Cow<'n, str>> {
    node.facts.get(key).and_then(|v| match v {
        serde_json::Value::String(s) => Some(Cow::Borrowed(s.as_str())),
        serde_json::Value::Null => None,
        other => Some(Cow::Owned(other.to_string())),
    })
}

/// A numeric fact (`None` when missing or not a number).
pub fn fact_number(node: &Node, key: &str) -> Option<f64> {
    fact(node, key).and_then(|s| berth_spec::constraint::parse_number(&s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn attributes_come_from_id_labels_and_facts() {
        let mut facts = BTreeMap::new();
        facts.insert("arch".to_owned(), serde_json::json!("x86_64"));
        facts.insert("load_10m".to_owned(), serde_json::json!(0.12));
        facts.insert("kernel".to_owned(), serde_json::json!("6.1.0-13-amd64"));
        let node = Node {
            id: "n1".into(),
            address: "10.0.0.1".into(),
            labels: [("zone".to_owned(), "east".to_owned())].into(),
            facts,
            draining: false,
            updated_at: 0,
        };
        let ok = |e: &str| holds(&Constraint::parse(e).unwrap(), &node);
        assert!(ok("node.hostname == n1"));
        assert!(ok("node.id != n2"));
        assert!(ok("node.labels.zone == east"));
        assert!(ok("node.platform.arch == x86_64"));
        assert!(!ok("node.platform.os == linux"));
        assert!(ok("node.facts.load_10m < 0.25"));
        assert!(!ok("node.facts.load_10m > 0.25"));
        assert!(ok(r"node.facts.kernel ~= ^6\."));
        assert!(!ok("node.role == server"));
        assert_eq!(fact_number(&node, "load_10m"), Some(0.12));
    }
}
