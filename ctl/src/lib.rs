//! The `flockerctl` library: configuration parsing and validation, the cluster planner, the
//! deploy driver and the cluster CA tooling. The binary in `main.rs` only wires these.
#![forbid(unsafe_code)]

pub mod ca;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod planner;
pub mod render;
