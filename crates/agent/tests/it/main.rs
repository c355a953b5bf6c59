//! Integration tests of the agent, with real processes, sockets and files.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod agent_store;
mod common;
mod health;
mod logs;
mod orphans;
mod supervisor;
