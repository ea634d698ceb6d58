//! eBPF programs written in C under `ebpf/src/*.bpf.c`, compiled by clang in `build.rs` and
//! embedded here as ELF object bytes for aya to load.
//!
//! **Architecture invariant:** this crate only carries bytes; it knows nothing about loading,
//! maps or routes. `flocker-routing` owns the loader and the map layout contract documented
//! in the C sources.

#![forbid(unsafe_code)]

/// Keeps the embedded object 8-byte aligned: the ELF parser reads headers in place.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

static ROUTING_OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/routing.bpf.o")));

/// `routing.bpf.c`: programs `flk_connect4` (`cgroup/connect4`), `flk_getpeername4`
/// (`cgroup/getpeername4`), `flk_sendmsg4` (`cgroup/sendmsg4`), `flk_recvmsg4`
/// (`cgroup/recvmsg4`), their IPv6 twins `flk_connect6`, `flk_getpeername6`, `flk_sendmsg6`
/// and `flk_recvmsg6`, and `flk_tc_ingress` (TC classifier); maps `flk_routes`,
/// `flk_local`, `flk_orig`, `flk_udp_orig`, `flk_fwd`, `flk_rev`, `flk_ifaddr`,
/// `flk_ifaddr6`, `flk_stats`, `flk_routes6`, `flk_local6`, `flk_orig6` and `flk_udp_orig6`.
pub static ROUTING: &[u8] = &ROUTING_OBJECT.0;

#[cfg(test)]
mod tests {
    #[test]
    fn routing_object_is_an_aligned_bpf_elf() {
        assert_eq!(&super::ROUTING[..4], b"\x7fELF");
        assert_eq!(super::ROUTING.as_ptr() as usize % 8, 0);
        // e_machine 247 is EM_BPF.
        assert_eq!(
            u16::from_le_bytes([super::ROUTING[18], super::ROUTING[19]]),
            247
        );
    }
}
