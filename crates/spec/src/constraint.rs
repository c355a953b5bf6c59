//! The syntax of placement constraints (`deploy.placement.constraints`):
//! parsed here so a stack file with a bad constraint is refused at load time
//! with its position; the scheduler evaluates the parsed form against nodes.
//!
//! ```text
//! ATTRIBUTE OP VALUE
//!   ATTRIBUTE  node.id | node.hostname | node.role | node.platform.arch
//!              | node.platform.os | node.labels.<key> | node.facts.<key>
//!   OP         ==  !=              string equality (Swarm's two operators)
//!              <  <=  >  >=        numeric: both sides are read as numbers
//!                                  (the value may carry a size suffix: 2G)
//!              ~=  !~              the attribute matches / does not match
//!                                  the regular expression VALUE (unanchored)
//! ```
//!
//! A node that lacks the attribute satisfies only `!=` and `!~` (Swarm's
//! rule for a missing label), and never a numeric comparison.

use std::fmt;

/// The facts berth's agents report for every node (`node.facts.<name>`;
/// `role` is set by the server). A constraint may name another fact, but
/// no node has it unless something else reports it, so the loader warns.
pub const KNOWN_FACTS: [&str; 15] = [
    "cpus",
    "memory_total",
    "memory_free",
    "load_1m",
    "load_5m",
    "load_15m",
    "disk_free",
    "arch",
    "os",
    "kernel",
    "hostname",
    "virtualized",
    "virtualization",
    "docker",
    "role",
];

/// A parsed constraint.
#[derive(Debug, Clone)]
pub struct Constraint {
    /// What is looked up on the node.
    pub attribute: Attribute,
    /// How it is compared.
    pub op: Op,
    /// The right-hand side.
    pub value: Operand,
    /// The expression as written (trimmed), for reasons and messages.
    pub text: String,
}

/// A node attribute.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attribute {
    /// `node.id`.
    Id,
    /// `node.hostname`: the `hostname` fact, else the node id.
    Hostname,
    /// `node.role`: the `role` fact.
    Role,
    /// `node.platform.arch`: the `arch` fact.
    Arch,
    /// `node.platform.os`: the `os` fact.
    Os,
    /// `node.labels.<key>`.
    Label(String),
    /// `node.facts.<key>`.
    Fact(String),
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id => f.write_str("node.id"),
            Self::Hostname => f.write_str("node.hostname"),
            Self::Role => f.write_str("node.role"),
            Self::Arch => f.write_str("node.platform.arch"),
            Self::Os => f.write_str("node.platform.os"),
            Self::Label(k) => write!(f, "node.labels.{k}"),
            Self::Fact(k) => write!(f, "node.facts.{k}"),
        }
    }
}

impl Attribute {
    /// Parse `node.labels.zone` and friends.
    pub fn parse(s: &str) -> Result<Self, ConstraintError> {
        let attr = match s {
            "node.id" => Self::Id,
            "node.hostname" => Self::Hostname,
            "node.role" => Self::Role,
            "node.platform.arch" => Self::Arch,
            "node.platform.os" => Self::Os,
            _ => {
                let (kind, key) = if let Some(k) = s.strip_prefix("node.labels.") {
                    (true, k)
                } else if let Some(k) = s.strip_prefix("node.facts.") {
                    (false, k)
                } else {
                    return Err(ConstraintError::UnknownAttribute(s.to_owned()));
                };
                if key.is_empty() {
                    return Err(ConstraintError::UnknownAttribute(s.to_owned()));
                }
                if kind {
                    Self::Label(key.to_owned())
                } else {
                    Self::Fact(key.to_owned())
                }
            }
        };
        Ok(attr)
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
    /// `~=`: matches the regular expression.
    Match,
    /// `!~`: does not match the regular expression.
    NotMatch,
}

impl Op {
    /// Two-character operators first so `<=` is not read as `<`.
    const ALL: [(&'static str, Op); 8] = [
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("~=", Op::Match),
        ("!~", Op::NotMatch),
        ("<", Op::Lt),
        (">", Op::Gt),
    ];
}

/// The right-hand side of a constraint, prepared for its operator.
#[derive(Debug, Clone)]
pub enum Operand {
    /// For `==` / `!=`.
    Text(String),
    /// For `<`, `<=`, `>`, `>=`.
    Number(f64),
    /// For `~=` / `!~`.
    Pattern(regex::Regex),
}

/// Why a constraint could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// No operator between attribute and value.
    #[error("expected `ATTRIBUTE OP VALUE` with OP one of == != < <= > >= ~= !~")]
    NoOperator,
    /// The attribute is not one berth knows.
    #[error(
        "unknown attribute {0:?} (use node.id, node.hostname, node.role, node.platform.arch, node.platform.os, node.labels.<key> or node.facts.<key>)"
    )]
    UnknownAttribute(String),
    /// Nothing after the operator.
    #[error("missing value after the operator")]
    MissingValue,
    /// A numeric comparison with a value that is not a number.
    #[error("{0:?} is not a number (numeric comparisons take e.g. 0.25, 4 or 2G)")]
    NotANumber(String),
    /// The regular expression does not compile.
    #[error("invalid regular expression {pattern:?}: {reason}")]
    BadPattern {
        /// As written.
        pattern: String,
        /// The regex engine's message.
        reason: String,
    },
}

impl Constraint {
    /// Parse `ATTRIBUTE OP VALUE`.
    pub fn parse(expr: &str) -> Result<Self, ConstraintError> {
        let text = expr.trim();
        let end = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
            .unwrap_or(text.len());
        let (attr, rest) = text.split_at(end);
        let rest = rest.trim_start();
        let Some((sym, op)) = Op::ALL.iter().find(|(s, _)| rest.starts_with(s)) else {
            if attr.is_empty() {
                return Err(ConstraintError::NoOperator);
            }
            // `zone==east` without `node.` still deserves the attribute error.
            return match Attribute::parse(attr) {
                Err(e) => Err(e),
                Ok(_) => Err(ConstraintError::NoOperator),
            };
        };
        let attribute = Attribute::parse(attr)?;
        let raw = rest[sym.len()..].trim();
        if raw.is_empty() {
            return Err(ConstraintError::MissingValue);
        }
        let value = match op {
            Op::Eq | Op::Ne => Operand::Text(raw.to_owned()),
            Op::Lt | Op::Le | Op::Gt | Op::Ge => Operand::Number(
                parse_number(raw).ok_or_else(|| ConstraintError::NotANumber(raw.to_owned()))?,
            ),
            Op::Match | Op::NotMatch => Operand::Pattern(regex::Regex::new(raw).map_err(|e| {
                ConstraintError::BadPattern {
                    pattern: raw.to_owned(),
                    // The engine's message spans lines (the pattern with
                    // a caret); its last line says what is wrong.
                    reason: e
                        .to_string()
                        .lines()
                        .last()
                        .unwrap_or_default()
                        .trim()
                        .trim_start_matches("error: ")
                        .to_owned(),
                }
            })?),
        };
        Ok(Self {
            attribute,
            op: *op,
            value,
            text: format!("{attr} {sym} {raw}"),
        })
    }

    /// Whether an attribute value (`None`: the node lacks it) satisfies it.
    pub fn holds(&self, actual: Option<&str>) -> bool {
        match (&self.value, actual) {
            (Operand::Text(v), a) => (a == Some(v.as_str())) == (self.op == Op::Eq),
            (Operand::Pattern(p), a) => a.is_some_and(|a| p.is_match(a)) == (self.op == Op::Match),
            (Operand::Number(_), None) => false,
            (Operand::Number(v), Some(a)) => match parse_number(a) {
                None => false,
                Some(a) => match self.op {
                    Op::Lt => a < *v,
                    Op::Le => a <= *v,
                    Op::Gt => a > *v,
                    Op::Ge => a >= *v,
                    _ => false,
                },
            },
        }
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A plain number, or a size with a unit suffix (`2G` = 2 GiB in bytes).
pub fn parse_number(s: &str) -> Option<f64> {
    let s = s.trim();
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Some(v),
        Ok(_) => None,
        #[allow(clippy::cast_precision_loss)] // sizes up to 2^53 are exact
        Err(_) => crate::units::parse_size(s).map(|b| b as f64),
    }
}

/// A placement preference `spread: node.labels.zone`: only attributes that
/// name a label or fact (or the platform) make sense to spread over.
pub fn parse_spread(expr: &str) -> Result<Attribute, ConstraintError> {
    Attribute::parse(expr.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_operator() {
        let c = Constraint::parse("node.labels.zone==east").unwrap();
        assert_eq!(c.attribute, Attribute::Label("zone".into()));
        assert!(c.holds(Some("east")) && !c.holds(Some("west")) && !c.holds(None));
        let c = Constraint::parse(" node.hostname != web-3 ").unwrap();
        assert!(c.holds(None) && c.holds(Some("web-2")) && !c.holds(Some("web-3")));
        let c = Constraint::parse("node.facts.load_10m < 0.25").unwrap();
        assert!(c.holds(Some("0.1")) && !c.holds(Some("0.25")) && !c.holds(None));
        assert!(!c.holds(Some("high")));
        let c = Constraint::parse("node.facts.load_10m <= 0.25").unwrap();
        assert!(c.holds(Some("0.25")));
        let c = Constraint::parse("node.facts.mem_free >= 2G").unwrap();
        assert!(c.holds(Some("2147483648")) && !c.holds(Some("2147483647")));
        let c = Constraint::parse("node.facts.cpus > 4").unwrap();
        assert!(c.holds(Some("8")) && !c.holds(Some("4")));
        let c = Constraint::parse(r"node.facts.kernel ~= ^6\.").unwrap();
        assert!(c.holds(Some("6.1.0-13-amd64")) && !c.holds(Some("5.10.0")));
        assert!(!c.holds(None));
        let c = Constraint::parse(r"node.facts.kernel !~ ^6\.").unwrap();
        assert!(c.holds(None) && c.holds(Some("5.10")));
        assert_eq!(c.to_string(), r"node.facts.kernel !~ ^6\.");
    }

    #[test]
    fn bad_constraints_say_what_is_wrong() {
        assert_eq!(
            Constraint::parse("node.labels.zone east").unwrap_err(),
            ConstraintError::NoOperator
        );
        assert!(matches!(
            Constraint::parse("zone == east").unwrap_err(),
            ConstraintError::UnknownAttribute(a) if a == "zone"
        ));
        assert_eq!(
            Constraint::parse("node.facts.load_1m < low").unwrap_err(),
            ConstraintError::NotANumber("low".into())
        );
        assert_eq!(
            Constraint::parse("node.labels.zone ==").unwrap_err(),
            ConstraintError::MissingValue
        );
        assert!(matches!(
            Constraint::parse("node.facts.kernel ~= ([").unwrap_err(),
            ConstraintError::BadPattern { .. }
        ));
    }
}
