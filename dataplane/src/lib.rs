//! The per-node agent `flocker-agent`: API server over mutual TLS ([`api`]), container
//! runtime over the Docker API ([`containers`]), volume backends ([`volume`]), the ownership
//! rules of the migration protocol ([`ownership`]), volume transfers between agents
//! ([`transfer`], over `flocker_client::AgentClient`) and the route table ([`routes`], programmed by `flocker-routing`).
//!
//! **Architecture invariant:** every side effect goes through one seam per subsystem
//! ([`containers::ContainerRuntime`], [`volume::Runner`] (the streamer's),
//! `flocker_routing::RoutingBackend`), so the decisions above them are unit-tested without
//! root; the integration tests run the real daemons.

#![forbid(unsafe_code)]

pub mod agent;
#[cfg(test)]
mod agent_tests;
pub mod answer;
pub mod api;
pub mod config;
pub mod containers;
pub mod daemon;
pub mod files;
pub mod hold;
pub mod hosts;
pub mod identity;
pub mod idle;
pub mod limits;
pub mod listeners;
pub mod metrics;
pub mod netns_holder;
pub mod ownership;
pub mod readiness;
pub mod restart_memory;
pub mod revocation;
pub mod routes;
pub mod server;
#[cfg(feature = "sim")]
pub mod sim;
pub mod supervisor;
pub mod test_hooks;
pub mod tls;
pub mod transfer;
#[cfg(test)]
mod trust_tests;
pub mod volume;
