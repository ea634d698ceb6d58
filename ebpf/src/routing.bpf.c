// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0
//
// Socket-level routing for Flocker: a connect() from a process in the attached cgroup to a
// routed TCP port on one of this node's own addresses is rewritten to the backend (a local
// container or the hosting node) before the socket is bound to a destination, so its packets
// need no per-packet NAT. getpeername() is rewritten back so the application sees the address
// it dialled.
//
// All values in the maps use the byte order the kernel uses in struct bpf_sock_addr: the
// address as the four network-order bytes, the port as the network-order 16-bit value in the
// low half of a 32-bit word.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

struct backend {
	__u32 addr;
	__u32 port;
};

// external port -> backend; updated in place by the agent.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct backend);
} flk_routes SEC(".maps");

// this node's own IPv4 addresses: only connects to one of these are redirected.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} flk_local SEC(".maps");

// socket cookie -> the address the application dialled, for getpeername().
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct backend);
} flk_orig SEC(".maps");

SEC("cgroup/connect4")
int flk_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	__u32 daddr = ctx->user_ip4;
	__u32 dport = ctx->user_port;
	if (!bpf_map_lookup_elem(&flk_local, &daddr))
		return 1;
	struct backend *b = bpf_map_lookup_elem(&flk_routes, &dport);
	if (!b)
		return 1;
	struct backend orig = { .addr = daddr, .port = dport };
	__u64 cookie = bpf_get_socket_cookie(ctx);
	bpf_map_update_elem(&flk_orig, &cookie, &orig, BPF_ANY);
	ctx->user_ip4 = b->addr;
	ctx->user_port = b->port;
	return 1;
}

SEC("cgroup/getpeername4")
int flk_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct backend *orig = bpf_map_lookup_elem(&flk_orig, &cookie);
	if (!orig)
		return 1;
	ctx->user_ip4 = orig->addr;
	ctx->user_port = orig->port;
	return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
