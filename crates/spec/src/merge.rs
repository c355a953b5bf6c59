//! Compose merge rules, used both for `extends` and for several `-f` files:
//! mappings merge key by key, `command`/`entrypoint`/`healthcheck.test`
//! are replaced, `environment`/`labels`/`depends_on`/`extra_hosts` merge as
//! mappings whatever syntax each side used, other sequences (`ports`,
//! `volumes`, …) append the items not already present (a volume with the
//! same target is replaced), and the `!reset` / `!override` tags remove or
//! replace a value outright.

use crate::yaml::{Node, Value};

/// Sequences written as `KEY=VALUE` lists or as mappings; merged as mappings.
const LIST_OR_DICT: &[&str] = &[
    "environment",
    "labels",
    "extra_hosts",
    "args",
    "annotations",
    "sysctls",
];
/// Sequences that replace rather than append.
const REPLACE: &[&str] = &[
    "command",
    "entrypoint",
    "test",
    "profiles",
    "dns",
    "dns_search",
];

/// Structural equality, positions ignored.
pub fn same(a: &Node, b: &Node) -> bool {
    match (&a.value, &b.value) {
        (Value::Null, Value::Null) => true,
        (Value::Scalar { text: x, .. }, Value::Scalar { text: y, .. }) => x == y,
        (Value::Seq(x), Value::Seq(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter().all(|(k, v)| {
                    y.iter()
                        .any(|(k2, v2)| k.as_str() == k2.as_str() && same(v, v2))
                })
        }
        _ => false,
    }
}

/// `KEY=VALUE` list → mapping; a mapping is returned as is.
pub fn list_to_map(node: &Node, sep: char) -> Node {
    let Some(items) = node.as_seq() else {
        return node.clone();
    };
    let mut entries: Vec<(Node, Node)> = Vec::new();
    for item in items {
        let Some(text) = item.as_str() else {
            return node.clone();
        };
        let (k, v) = match text.split_once(sep) {
            Some((k, v)) => (k, Node::string(item.pos.clone(), v)),
            None => (text, Node::new(item.pos.clone(), Value::Null)),
        };
        entries.retain(|(k2, _)| k2.as_str() != Some(k));
        entries.push((Node::string(item.pos.clone(), k), v));
    }
    Node {
        value: Value::Map(entries),
        ..node.clone()
    }
}

/// `depends_on` list → mapping with the default condition.
fn depends_to_map(node: &Node) -> Node {
    let Some(items) = node.as_seq() else {
        return node.clone();
    };
    let mut entries = Vec::new();
    for item in items {
        let Some(text) = item.as_str() else {
            return node.clone();
        };
        let cond = Node::new(
            item.pos.clone(),
            Value::Map(vec![(
                Node::string(item.pos.clone(), "condition"),
                Node::string(item.pos.clone(), "service_started"),
            )]),
        );
        entries.push((Node::string(item.pos.clone(), text), cond));
    }
    Node {
        value: Value::Map(entries),
        ..node.clone()
    }
}

fn volume_target(node: &Node) -> Option<String> {
    if let Some(t) = node.get("target").and_then(Node::as_str) {
        return Some(t.to_string());
    }
    let text = node.as_str()?;
    let parts: Vec<&str> = text.split(':').collect();
    Some(match parts.len() {
        1 => parts[0].to_string(),
        _ => parts[1].to_string(),
    })
}

/// Merges `over` onto `base` under key `key` (the key decides the rule).
pub fn merge_value(key: &str, base: &Node, over: &Node) -> Node {
    if over.tag.as_deref() == Some("!override") {
        let mut n = over.clone();
        n.tag = None;
        return n;
    }
    if REPLACE.contains(&key) {
        return over.clone();
    }
    let (base, over) = if LIST_OR_DICT.contains(&key) {
        let sep = if key == "extra_hosts" { ':' } else { '=' };
        (list_to_map(base, sep), list_to_map(over, sep))
    } else if key == "depends_on" {
        (depends_to_map(base), depends_to_map(over))
    } else {
        (base.clone(), over.clone())
    };
    match (&base.value, &over.value) {
        (Value::Map(_), Value::Map(_)) => merge_maps(&base, &over),
        (Value::Seq(b), Value::Seq(o)) => {
            let mut items = b.clone();
            for item in o {
                if key == "volumes" {
                    let t = volume_target(item);
                    if t.is_some() {
                        items.retain(|x| volume_target(x) != t);
                    }
                } else if items.iter().any(|x| same(x, item)) {
                    continue;
                }
                items.push(item.clone());
            }
            Node {
                value: Value::Seq(items),
                ..over
            }
        }
        _ => over,
    }
}

/// Merges two mappings key by key; a `!reset` value removes the key.
pub fn merge_maps(base: &Node, over: &Node) -> Node {
    let mut entries: Vec<(Node, Node)> = base.as_map().map(<[_]>::to_vec).unwrap_or_default();
    for (k, v) in over.as_map().unwrap_or_default() {
        let key = k.as_str().unwrap_or_default();
        let existing = entries.iter().position(|(k2, _)| k2.as_str() == Some(key));
        if v.tag.as_deref() == Some("!reset") {
            if let Some(i) = existing {
                entries.remove(i);
            }
            continue;
        }
        match existing {
            Some(i) => {
                let merged = merge_value(key, &entries[i].1, v);
                entries[i].1 = merged;
            }
            None => {
                let mut v = v.clone();
                if v.tag.as_deref() == Some("!override") {
                    v.tag = None;
                }
                entries.push((k.clone(), v));
            }
        }
    }
    Node {
        pos: over.pos.clone(),
        tag: None,
        value: Value::Map(entries),
    }
}

/// Drops `!reset` entries from a mapping that had nothing to reset.
pub fn strip_resets(node: &mut Node) {
    if let Value::Map(entries) = &mut node.value {
        entries.retain(|(_, v)| v.tag.as_deref() != Some("!reset"));
        for (_, v) in entries.iter_mut() {
            strip_resets(v);
        }
    }
}
