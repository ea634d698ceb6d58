//! Routing backends: route table model, nftables over netlink, eBPF over aya (filled by the routing issue).
