//! Stack files → [`types::Stack`].
pub mod types;
