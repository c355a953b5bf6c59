//! Traffic into services.
//!
//! Today: [`tcp::PortProxy`], which makes a published Compose port
//! (`ports: ["8000:5000"]`) mean what it means in Compose — something
//! listens on the host port — even though berth's process instances each
//! listen on their own allocated port: the proxy accepts on the published
//! port and forwards each connection to a healthy instance, round-robin.
//!
//! This crate sees only [`Backends`] tables handed to it through a
//! `tokio::sync::watch` channel; it never reads the store, so the server
//! decides what "healthy" means and the proxy only moves bytes.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod tcp;

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Published listener address → the healthy instance addresses behind it.
pub type Backends = BTreeMap<SocketAddr, Vec<SocketAddr>>;
