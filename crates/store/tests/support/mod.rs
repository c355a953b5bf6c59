//! Test support shared by the store's integration tests.

#![allow(dead_code)] // each test binary uses a different part

pub mod etcd;
