//! The per-node agent: API server, container runtime, volume backends and routing backends.
