//! eBPF programs written in C under `ebpf/src/*.bpf.c`, compiled by clang and embedded as object bytes (filled by the routing issue).
