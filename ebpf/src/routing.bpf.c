// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0
//
// Routing for Flocker in two parts.
//
// Socket level: a connect() from a process in the attached cgroup to a routed TCP port on one
// of this node's own addresses is rewritten to the backend (a local container or the hosting
// node) before the socket is bound to a destination, so its packets need no per-packet NAT.
// getpeername() is rewritten back so the application sees the address it dialled.
//
// Packet level (flk_tc_ingress, attached to the ingress of the node's interfaces): a TCP
// packet from outside to a routed port on a node address whose backend is reached through
// another interface (a local container) is rewritten to the backend and redirected to that
// interface, and the container's replies are rewritten back and redirected out, so these
// connections bypass netfilter and conntrack. Everything else (a backend on another node,
// reached back out of the interface the packet came in on; hairpin; IP options; fragments)
// is left to the stack, where the nftables chains handle it.
//
// All values in the maps use the byte order the kernel uses in struct bpf_sock_addr: the
// address as the four network-order bytes, the port as the network-order 16-bit value in the
// low half of a 32-bit word.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

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

// A connection the TC program forwarded: the outside client and the backend it was sent to.
struct flow {
	__u32 client_addr;
	__u32 backend_addr;
	__u16 client_port;
	__u16 backend_port;
};

// flow -> the node address and port the client dialled, for rewriting the replies.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct flow);
	__type(value, struct backend);
} flk_flows SEC(".maps");

#define IP_OFF ETH_HLEN
#define IP_CSUM_OFF (IP_OFF + offsetof(struct iphdr, check))
#define IP_TTL_OFF (IP_OFF + offsetof(struct iphdr, ttl))
#define IP_SADDR_OFF (IP_OFF + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (IP_OFF + offsetof(struct iphdr, daddr))
#define TCP_OFF (IP_OFF + sizeof(struct iphdr))
#define TCP_SPORT_OFF (TCP_OFF + offsetof(struct tcphdr, source))
#define TCP_DPORT_OFF (TCP_OFF + offsetof(struct tcphdr, dest))
#define TCP_CSUM_OFF (TCP_OFF + offsetof(struct tcphdr, check))

// Looks up the way to `daddr` as if forwarding the packet; returns the egress interface, or
// 0 when the packet is better left to the stack (no route, local delivery, forwarding off, or
// back out of the interface it came in on). `fib` keeps the MAC addresses when resolved.
static __always_inline __u32 egress(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
				    struct iphdr *ip, __u32 saddr, __u32 daddr, __u16 sport,
				    __u16 dport, long *rc)
{
	fib->family = AF_INET;
	fib->l4_protocol = IPPROTO_TCP;
	fib->tos = ip->tos;
	// 0 skips the MTU check: GRO hands us merged packets larger than the MTU, which the
	// egress device segments again.
	fib->tot_len = 0;
	fib->ifindex = skb->ingress_ifindex;
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	fib->sport = sport;
	fib->dport = dport;
	*rc = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
	if (*rc != BPF_FIB_LKUP_RET_SUCCESS && *rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return 0;
	if (fib->ifindex == skb->ingress_ifindex)
		return 0;
	return fib->ifindex;
}

// Rewrites one address and one port (the destination pair when `dst`, else the source pair),
// decrements the TTL, and sends the packet out of `ifindex`.
static __always_inline int rewrite_and_redirect(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
						long rc, __u32 ifindex, int dst, __u32 old_addr,
						__u32 new_addr, __u16 old_port, __u16 new_port,
						__u8 ttl)
{
	__u32 addr_off = dst ? IP_DADDR_OFF : IP_SADDR_OFF;
	__u32 port_off = dst ? TCP_DPORT_OFF : TCP_SPORT_OFF;
	__u16 old_ttl = bpf_htons((__u16)ttl << 8), new_ttl = bpf_htons((__u16)(ttl - 1) << 8);
	__u8 new_ttl_byte = ttl - 1;

	if (bpf_l4_csum_replace(skb, TCP_CSUM_OFF, old_addr, new_addr, BPF_F_PSEUDO_HDR | 4) ||
	    bpf_l4_csum_replace(skb, TCP_CSUM_OFF, old_port, new_port, 2) ||
	    bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, 4) ||
	    bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ttl, new_ttl, 2) ||
	    bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) ||
	    bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) ||
	    bpf_skb_store_bytes(skb, IP_TTL_OFF, &new_ttl_byte, 1, 0))
		return TC_ACT_SHOT;
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), fib->dmac, ETH_ALEN, 0) ||
		    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), fib->smac, ETH_ALEN, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(ifindex, 0);
	}
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

SEC("classifier")
int flk_tc_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + IP_OFF;
	struct tcphdr *tcp = data + TCP_OFF;

	if ((void *)(tcp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (ip->ihl != 5 || ip->protocol != IPPROTO_TCP || ip->ttl <= 1 ||
	    (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_OK;

	__u32 saddr = ip->saddr, daddr = ip->daddr;
	__u16 sport = tcp->source, dport = tcp->dest;
	__u8 ttl = ip->ttl;
	int syn = tcp->syn && !tcp->ack;
	struct bpf_fib_lookup fib = {};
	long rc = 0;

	if (bpf_map_lookup_elem(&flk_local, &daddr)) {
		__u32 key = dport;
		struct backend *b = bpf_map_lookup_elem(&flk_routes, &key);
		if (!b)
			return TC_ACT_OK;
		__u32 to_addr = b->addr;
		__u16 to_port = (__u16)b->port;
		struct flow f = { .client_addr = saddr, .backend_addr = to_addr,
				  .client_port = sport, .backend_port = to_port };
		struct backend *known = bpf_map_lookup_elem(&flk_flows, &f);
		int new_flow = !known || known->addr != daddr || known->port != dport;
		// Only a connection's first packet starts a flow here. Anything else is a
		// connection the stack already carries (one made before this route was local, or
		// the reply to one of the node's own connections that happens to use a routed
		// port), so conntrack decides, without a route lookup here.
		if (new_flow && !syn)
			return TC_ACT_OK;
		__u32 out = egress(skb, &fib, ip, saddr, to_addr, sport, to_port, &rc);
		if (!out)
			return TC_ACT_OK;
		if (new_flow) {
			struct backend dialled = { .addr = daddr, .port = dport };
			bpf_map_update_elem(&flk_flows, &f, &dialled, BPF_ANY);
		}
		return rewrite_and_redirect(skb, &fib, rc, out, 1, daddr, to_addr, dport, to_port,
					    ttl);
	}

	struct flow f = { .client_addr = daddr, .backend_addr = saddr,
			  .client_port = dport, .backend_port = sport };
	struct backend *dialled = bpf_map_lookup_elem(&flk_flows, &f);
	if (!dialled)
		return TC_ACT_OK;
	__u32 from_addr = dialled->addr;
	__u16 from_port = (__u16)dialled->port;
	__u32 out = egress(skb, &fib, ip, from_addr, daddr, from_port, dport, &rc);
	if (!out)
		return TC_ACT_OK;
	return rewrite_and_redirect(skb, &fib, rc, out, 0, saddr, from_addr, sport, from_port, ttl);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
