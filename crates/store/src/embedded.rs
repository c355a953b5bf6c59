//! Embedded store: TODO by store helper
