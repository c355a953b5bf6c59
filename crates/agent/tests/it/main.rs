//! Integration tests of the agent, with real processes, sockets and files.

mod agent_store;
mod common;
mod health;
mod logs;
mod orphans;
mod supervisor;
