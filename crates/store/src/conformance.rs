//! Conformance suite: TODO by store helper
