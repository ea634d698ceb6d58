//! Benchmarks that put this project beside its peers in one run; `cargo xtask bench NAME`
//! builds and runs the `flocker-bench` binary. Each module measures one area and prints a
//! table.
#![forbid(unsafe_code)]

pub mod failover;
pub mod migrate;
pub mod routing;
pub mod streamer;
