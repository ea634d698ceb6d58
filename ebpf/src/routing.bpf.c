// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0
//
// Routing for Flocker in two parts.
//
// Socket level: a connect() from a process in the attached cgroup to a routed TCP or UDP port
// on one of this node's own addresses is rewritten to the backend (a local container or the
// hosting node) before the socket is bound to a destination, so its packets need no per-packet
// NAT. getpeername() is rewritten back so the application sees the address it dialled. An
// unconnected UDP socket's sendmsg() to a routed port is rewritten the same way, datagram by
// datagram, and its recvmsg() rewrites the source of the backend's replies back to the address
// the client sent to (flk_udp_orig), so a client that checks who answered accepts them.
// IPv6 sockets get the same from the 6 variants, over maps of their own (flk_routes6,
// flk_local6, flk_orig6, flk_udp_orig6).
//
// Packet level (flk_tc_ingress, attached to the ingress of the node's interfaces): the first
// packet of a TCP connection, or any UDP datagram, to a routed port on a node address (IPv4 or
// IPv6) starts a flow, unless the flow it belongs to is known. Its packets are rewritten to
// the backend and redirected to the interface the backend is reached through, and the
// backend's replies are rewritten back and redirected to the client, so these flows bypass
// netfilter and conntrack. When the backend is another node, or back out of the interface the
// client came in on (hairpin), the source is translated too, to the address of the interface
// it leaves by (flk_ifaddr, flk_ifaddr6) and a port of SNAT_FIRST.. (flk_fwd and flk_rev hold
// both directions' translations). A TCP flow is forgotten with the last ACK after both FINs,
// or a RST (a translated port stays taken a while longer). UDP has no end: a UDP flow is over
// after flk_udp_idle_ns without a packet either way, and a datagram whose route now leads
// elsewhere starts a new flow there. Left to the stack: IPv4 packets with options, fragments,
// IPv6 packets with extension headers, and TCP packets of connections no flow knows.
//
// All values in the maps use the byte order the kernel uses in struct bpf_sock_addr: the
// address as the four network-order bytes, the port as the network-order 16-bit value in the
// low half of a 32-bit word. A flk_routes key is such a port with the IP protocol number in
// bits 16-23 (route_key).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

struct backend {
	__u32 addr;
	// The port in the low half; FLK_REMOTE set when the backend is another node.
	__u32 port;
};

#define FLK_REMOTE (1u << 16)

// (protocol, external port) -> backend; updated in place by the agent.
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

// A UDP socket and the backend it sent to: whose replies recvmsg() rewrites.
struct udp_peer {
	__u64 cookie;
	__u32 addr;
	__u32 port;
};

// (socket, backend) -> the address the application sent to, for recvmsg() on UDP sockets.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct udp_peer);
	__type(value, struct backend);
} flk_udp_orig SEC(".maps");

static __always_inline __u32 route_key(__u32 port, __u32 protocol)
{
	return (port & 0xffff) | (protocol << 16);
}

// The backend of a routed TCP or UDP destination on a node address, or NULL.
static __always_inline struct backend *routed(struct bpf_sock_addr *ctx)
{
	__u32 protocol = ctx->protocol;
	if (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
		return NULL;
	__u32 daddr = ctx->user_ip4;
	if (!bpf_map_lookup_elem(&flk_local, &daddr))
		return NULL;
	__u32 key = route_key(ctx->user_port, protocol);
	return bpf_map_lookup_elem(&flk_routes, &key);
}

// Services by name: a service address and port (key in the byte order of bpf_sock_addr,
// the port word carrying the protocol as route_key does) -> the local container, or the
// hosting node's address and relay port. Updated in place by the agent.
struct svc_key {
	__u32 addr;
	__u32 port;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct svc_key);
	__type(value, struct backend);
} flk_svc SEC(".maps");

// The backend of a TCP or UDP destination that is a service address and port, or NULL.
static __always_inline struct backend *service(struct bpf_sock_addr *ctx)
{
	__u32 protocol = ctx->protocol;
	if (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
		return NULL;
	struct svc_key key = { .addr = ctx->user_ip4,
			       .port = route_key(ctx->user_port, protocol) };
	return bpf_map_lookup_elem(&flk_svc, &key);
}

// Rewrites the destination to the backend `b`, remembering for UDP replies what it was.
static __always_inline void redirect(struct bpf_sock_addr *ctx, const struct backend *b,
				     __u64 cookie)
{
	struct backend orig = { .addr = ctx->user_ip4, .port = ctx->user_port };
	if (ctx->protocol == IPPROTO_UDP) {
		struct udp_peer peer = { .cookie = cookie, .addr = b->addr, .port = b->port & 0xffff };
		bpf_map_update_elem(&flk_udp_orig, &peer, &orig, BPF_ANY);
	}
	ctx->user_ip4 = b->addr;
	ctx->user_port = b->port & 0xffff;
}

SEC("cgroup/connect4")
int flk_connect4(struct bpf_sock_addr *ctx)
{
	struct backend *b = routed(ctx);
	if (!b)
		b = service(ctx);
	if (!b)
		return 1;
	struct backend orig = { .addr = ctx->user_ip4, .port = ctx->user_port };
	__u64 cookie = bpf_get_socket_cookie(ctx);
	bpf_map_update_elem(&flk_orig, &cookie, &orig, BPF_ANY);
	redirect(ctx, b, cookie);
	return 1;
}

SEC("cgroup/sendmsg4")
int flk_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct backend *b = routed(ctx);
	if (!b)
		b = service(ctx);
	if (!b)
		return 1;
	redirect(ctx, b, bpf_get_socket_cookie(ctx));
	return 1;
}

SEC("cgroup/recvmsg4")
int flk_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct udp_peer peer = { .cookie = bpf_get_socket_cookie(ctx), .addr = ctx->user_ip4,
				 .port = ctx->user_port & 0xffff };
	struct backend *orig = bpf_map_lookup_elem(&flk_udp_orig, &peer);
	if (!orig)
		return 1;
	ctx->user_ip4 = orig->addr;
	ctx->user_port = orig->port;
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

// IPv6 at the socket: connect6, sendmsg6, recvmsg6 and getpeername6 do for IPv6 sockets what
// their 4 variants do, with their own maps (an IPv6 route's backend is an IPv6 address). IPv6
// packets from outside meet the TC program below, which reads the same flk_routes6 and
// flk_local6.

struct backend6 {
	__u32 addr[4];
	// The port in the low half; FLK_REMOTE as in struct backend.
	__u32 port;
};

struct addr6 {
	__u32 addr[4];
};

// (protocol, external port) -> IPv6 backend; updated in place by the agent.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct backend6);
} flk_routes6 SEC(".maps");

// this node's own IPv6 addresses.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct addr6);
	__type(value, __u32);
} flk_local6 SEC(".maps");

// socket cookie -> the IPv6 address the application dialled, for getpeername().
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct backend6);
} flk_orig6 SEC(".maps");

// A UDP socket and the IPv6 backend it sent to (no padding left uninitialised in the key).
struct udp_peer6 {
	__u64 cookie;
	__u32 addr[4];
	__u32 port;
	__u32 pad;
};

// (socket, backend) -> the address the application sent to, for recvmsg() on UDP sockets.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct udp_peer6);
	__type(value, struct backend6);
} flk_udp_orig6 SEC(".maps");

static __always_inline void load_user_ip6(const struct bpf_sock_addr *ctx, __u32 *addr)
{
	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
}

static __always_inline void store_user_ip6(struct bpf_sock_addr *ctx, const __u32 *addr)
{
	ctx->user_ip6[0] = addr[0];
	ctx->user_ip6[1] = addr[1];
	ctx->user_ip6[2] = addr[2];
	ctx->user_ip6[3] = addr[3];
}

// The backend of a routed TCP or UDP destination on a node IPv6 address, or NULL.
static __always_inline struct backend6 *routed6(struct bpf_sock_addr *ctx)
{
	__u32 protocol = ctx->protocol;
	if (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
		return NULL;
	struct addr6 daddr = {};
	load_user_ip6(ctx, daddr.addr);
	if (!bpf_map_lookup_elem(&flk_local6, &daddr))
		return NULL;
	__u32 key = route_key(ctx->user_port, protocol);
	return bpf_map_lookup_elem(&flk_routes6, &key);
}

// Rewrites the destination to the backend `b`, remembering for UDP replies what it was.
static __always_inline void redirect6(struct bpf_sock_addr *ctx, const struct backend6 *b,
				      __u64 cookie)
{
	struct backend6 orig = { .port = ctx->user_port };
	load_user_ip6(ctx, orig.addr);
	if (ctx->protocol == IPPROTO_UDP) {
		struct udp_peer6 peer = { .cookie = cookie, .port = b->port & 0xffff };
		peer.addr[0] = b->addr[0];
		peer.addr[1] = b->addr[1];
		peer.addr[2] = b->addr[2];
		peer.addr[3] = b->addr[3];
		bpf_map_update_elem(&flk_udp_orig6, &peer, &orig, BPF_ANY);
	}
	store_user_ip6(ctx, b->addr);
	ctx->user_port = b->port & 0xffff;
}

SEC("cgroup/connect6")
int flk_connect6(struct bpf_sock_addr *ctx)
{
	struct backend6 *b = routed6(ctx);
	if (!b)
		return 1;
	struct backend6 orig = { .port = ctx->user_port };
	load_user_ip6(ctx, orig.addr);
	__u64 cookie = bpf_get_socket_cookie(ctx);
	bpf_map_update_elem(&flk_orig6, &cookie, &orig, BPF_ANY);
	redirect6(ctx, b, cookie);
	return 1;
}

SEC("cgroup/sendmsg6")
int flk_sendmsg6(struct bpf_sock_addr *ctx)
{
	struct backend6 *b = routed6(ctx);
	if (!b)
		return 1;
	redirect6(ctx, b, bpf_get_socket_cookie(ctx));
	return 1;
}

SEC("cgroup/recvmsg6")
int flk_recvmsg6(struct bpf_sock_addr *ctx)
{
	struct udp_peer6 peer = { .cookie = bpf_get_socket_cookie(ctx),
				  .port = ctx->user_port & 0xffff };
	load_user_ip6(ctx, peer.addr);
	struct backend6 *orig = bpf_map_lookup_elem(&flk_udp_orig6, &peer);
	if (!orig)
		return 1;
	store_user_ip6(ctx, orig->addr);
	ctx->user_port = orig->port;
	return 1;
}

SEC("cgroup/getpeername6")
int flk_getpeername6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct backend6 *orig = bpf_map_lookup_elem(&flk_orig6, &cookie);
	if (!orig)
		return 1;
	store_user_ip6(ctx, orig->addr);
	ctx->user_port = orig->port;
	return 1;
}

// Packet level. Flows of both families and both protocols share one pair of maps: an
// address is held as struct ip_addr, an IPv4 one in its first word with the others zero,
// and the tuple names its family and protocol.

struct ip_addr {
	__u32 w[4];
};

// A TCP connection or UDP flow as the packets of one direction carry it (network byte order).
struct tuple {
	struct ip_addr saddr;
	struct ip_addr daddr;
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 protocol;
	__u16 pad;
};

// What a client's packets are rewritten to: the backend, and the source the backend sees
// (the client itself, or the node address the client dialled when the backend is on another
// node or back out of the interface the client came in on).
struct fwd_nat {
	struct ip_addr backend_addr;
	struct ip_addr snat_addr;
	__u16 backend_port;
	__u16 snat_port;
	// CLIENT_FIN | BACKEND_FIN | RESET seen so far (as in the flow's rev_nat); TCP only.
	__u32 state;
};

// What a backend's replies are rewritten to: from the address the client dialled, to the
// client. `seen` (coarse ns of the last packet: the backend's for TCP, either side's for UDP)
// and `state` say when a translated port may be given to another flow, and when a UDP flow
// has gone idle.
struct rev_nat {
	struct ip_addr client_addr;
	struct ip_addr dialled_addr;
	__u16 client_port;
	__u16 dialled_port;
	__u32 state;
	__u64 seen;
};

// How far a flow's connection has closed (`state` bits).
#define CLIENT_FIN 1
#define BACKEND_FIN 2
#define RESET 4
#define BOTH_FINS (CLIENT_FIN | BACKEND_FIN)

// client's tuple -> translation, for the client's packets.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct tuple);
	__type(value, struct fwd_nat);
} flk_fwd SEC(".maps");

// backend's tuple (backend -> source it saw) -> translation, for the backend's replies.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct tuple);
	__type(value, struct rev_nat);
} flk_rev SEC(".maps");

// interface index -> its IPv4 address: the source of translated connections that leave by
// it (as masquerade picks it), so the backend can answer.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} flk_ifaddr SEC(".maps");

// interface index -> its first global IPv6 address, as flk_ifaddr for IPv6 flows.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct ip_addr);
} flk_ifaddr6 SEC(".maps");

// Counters read by the agent: [STAT_SNAT_EXHAUSTED] new flows left to the stack because no
// translated source port was free (SNAT_TRIES picks all taken); [STAT_FLOWS + i] flows
// started, i = 2 * (IPv6) + (UDP).
#define STAT_SNAT_EXHAUSTED 0
#define STAT_FLOWS 1
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 5);
	__type(key, __u32);
	__type(value, __u64);
} flk_stats SEC(".maps");

// Source ports given to translated flows: above Linux's default ephemeral range
// (32768-60999), so the node's own sockets rarely pick one; a port a local socket holds
// towards the same backend is skipped.
#define SNAT_FIRST 61000
#define SNAT_COUNT 4536
#define SNAT_TRIES 16
// A translated port whose TCP connection closed is free again after this long (ns); one whose
// backend has been silent for the idle time too.
#define CLOSED_REUSE_NS (10ULL * 1000000000ULL)
#define IDLE_REUSE_NS (6ULL * 3600ULL * 1000000000ULL)
// A UDP flow with no packet either way for this long (ns) is over: its next datagram starts a
// new flow, and its translated port is free again. 120 s by default (conntrack's timeout for
// UDP streams); the agent sets it when it loads the program (`--udp-idle-timeout`).
volatile const __u64 flk_udp_idle_ns = 120ULL * 1000000000ULL;

#ifndef AF_INET6
#define AF_INET6 10
#endif

#define IP_OFF ETH_HLEN
#define IP_CSUM_OFF (IP_OFF + offsetof(struct iphdr, check))
#define IP_TTL_OFF (IP_OFF + offsetof(struct iphdr, ttl))
#define IP_SADDR_OFF (IP_OFF + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (IP_OFF + offsetof(struct iphdr, daddr))
#define IP6_HOP_OFF (IP_OFF + offsetof(struct ipv6hdr, hop_limit))
#define IP6_SADDR_OFF (IP_OFF + offsetof(struct ipv6hdr, saddr))
#define IP6_DADDR_OFF (IP_OFF + offsetof(struct ipv6hdr, daddr))
#define L4_OFF (IP_OFF + sizeof(struct iphdr))
#define L4_OFF6 (IP_OFF + sizeof(struct ipv6hdr))

// One packet as the TC program reads it.
struct packet {
	struct tuple t;
	// Where its TCP or UDP header starts, and that header's checksum.
	__u32 l4_off;
	__u32 csum_off;
	// BPF_F_MARK_MANGLED_0 for UDP: an IPv4 datagram without a checksum keeps none.
	__u32 csum_flags;
	__u8 tos;
	__u8 ttl;
	__u8 syn;
	__u8 fin;
	__u8 rst;
};

static __always_inline void count(__u32 index)
{
	__u64 *counter = bpf_map_lookup_elem(&flk_stats, &index);
	if (counter)
		*counter += 1;
}

static __always_inline int same_addr(const struct ip_addr *a, const struct ip_addr *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] &&
	       a->w[3] == b->w[3];
}

// The ports and flags of the TCP or UDP header at `l4`; -1 for anything else.
static __always_inline int parse_l4(struct packet *p, void *l4, void *data_end, __u32 l4_off)
{
	p->l4_off = l4_off;
	if (p->t.protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end)
			return -1;
		p->t.sport = tcp->source;
		p->t.dport = tcp->dest;
		p->syn = tcp->syn && !tcp->ack;
		p->fin = tcp->fin;
		p->rst = tcp->rst;
		p->csum_off = l4_off + offsetof(struct tcphdr, check);
		p->csum_flags = 0;
		return 0;
	}
	if (p->t.protocol == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end)
			return -1;
		p->t.sport = udp->source;
		p->t.dport = udp->dest;
		p->csum_off = l4_off + offsetof(struct udphdr, check);
		p->csum_flags = BPF_F_MARK_MANGLED_0;
		return 0;
	}
	return -1;
}

// Reads a TCP or UDP packet over IPv4 (no options, not a fragment) or IPv6 (no extension
// headers) that may be forwarded (TTL or hop limit above 1); -1 for anything else.
static __always_inline int parse(struct __sk_buff *skb, struct packet *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + IP_OFF;
		if ((void *)(ip + 1) > data_end)
			return -1;
		if (ip->ihl != 5 || ip->ttl <= 1 || (ip->frag_off & bpf_htons(0x3fff)))
			return -1;
		p->t.family = AF_INET;
		p->t.protocol = ip->protocol;
		p->t.saddr.w[0] = ip->saddr;
		p->t.daddr.w[0] = ip->daddr;
		p->tos = ip->tos;
		p->ttl = ip->ttl;
		return parse_l4(p, data + L4_OFF, data_end, L4_OFF);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + IP_OFF;
		if ((void *)(ip6 + 1) > data_end)
			return -1;
		if (ip6->hop_limit <= 1)
			return -1;
		p->t.family = AF_INET6;
		p->t.protocol = ip6->nexthdr;
		__builtin_memcpy(p->t.saddr.w, ip6->saddr.in6_u.u6_addr32, 16);
		__builtin_memcpy(p->t.daddr.w, ip6->daddr.in6_u.u6_addr32, 16);
		p->ttl = ip6->hop_limit;
		return parse_l4(p, data + L4_OFF6, data_end, L4_OFF6);
	}
	return -1;
}

// Whether the packet is addressed to one of this node's own addresses.
static __always_inline int to_node(const struct tuple *t)
{
	if (t->family == AF_INET)
		return bpf_map_lookup_elem(&flk_local, &t->daddr.w[0]) != NULL;
	return bpf_map_lookup_elem(&flk_local6, &t->daddr) != NULL;
}

// The backend of the route for the packet's protocol and port, in `nat`; `remote` when it is
// another node. -1 when the port is not routed.
static __always_inline int route_of(const struct tuple *t, struct fwd_nat *nat, int *remote)
{
	__u32 key = route_key(t->dport, t->protocol);
	__u32 port;
	if (t->family == AF_INET) {
		struct backend *b = bpf_map_lookup_elem(&flk_routes, &key);
		if (!b)
			return -1;
		nat->backend_addr.w[0] = b->addr;
		port = b->port;
	} else {
		struct backend6 *b = bpf_map_lookup_elem(&flk_routes6, &key);
		if (!b)
			return -1;
		__builtin_memcpy(nat->backend_addr.w, b->addr, 16);
		port = b->port;
	}
	nat->backend_port = (__u16)port;
	*remote = (port & FLK_REMOTE) != 0;
	return 0;
}

// Looks up the way from `saddr` to `daddr` as if forwarding the packet; returns the egress
// interface, or 0 when the packet is better left to the stack (no route, local delivery,
// forwarding off). `fib` keeps the MAC addresses when resolved.
static __always_inline __u32 egress(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
				    const struct packet *p, const struct ip_addr *saddr,
				    const struct ip_addr *daddr, __u16 sport, __u16 dport, long *rc)
{
	fib->l4_protocol = p->t.protocol;
	// 0 skips the MTU check: GRO hands us merged packets larger than the MTU, which the
	// egress device segments again.
	fib->tot_len = 0;
	fib->ifindex = skb->ingress_ifindex;
	fib->sport = sport;
	fib->dport = dport;
	if (p->t.family == AF_INET) {
		fib->family = AF_INET;
		fib->tos = p->tos;
		fib->ipv4_src = saddr->w[0];
		fib->ipv4_dst = daddr->w[0];
	} else {
		fib->family = AF_INET6;
		fib->flowinfo = 0;
		__builtin_memcpy(fib->ipv6_src, saddr->w, 16);
		__builtin_memcpy(fib->ipv6_dst, daddr->w, 16);
	}
	*rc = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
	if (*rc != BPF_FIB_LKUP_RET_SUCCESS && *rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return 0;
	return fib->ifindex;
}

// Rewrites one address and port pair (the destination when `dst`, else the source) with the
// checksums; unchanged halves are left alone.
static __always_inline int rewrite(struct __sk_buff *skb, const struct packet *p, int dst,
				   const struct ip_addr *old_addr, const struct ip_addr *new_addr,
				   __u16 old_port, __u16 new_port)
{
	if (p->t.family == AF_INET) {
		__u32 from = old_addr->w[0], to = new_addr->w[0];
		if (from != to &&
		    (bpf_l4_csum_replace(skb, p->csum_off, from, to,
					 BPF_F_PSEUDO_HDR | p->csum_flags | 4) ||
		     bpf_l3_csum_replace(skb, IP_CSUM_OFF, from, to, 4) ||
		     bpf_skb_store_bytes(skb, dst ? IP_DADDR_OFF : IP_SADDR_OFF, &to, 4, 0)))
			return -1;
	} else if (!same_addr(old_addr, new_addr)) {
		struct ip_addr from = *old_addr, to = *new_addr;
		__s64 diff = bpf_csum_diff(from.w, 16, to.w, 16, 0);
		if (diff < 0 ||
		    bpf_l4_csum_replace(skb, p->csum_off, 0, diff,
					BPF_F_PSEUDO_HDR | p->csum_flags) ||
		    bpf_skb_store_bytes(skb, dst ? IP6_DADDR_OFF : IP6_SADDR_OFF, to.w, 16, 0))
			return -1;
	}
	// Both headers start with the source port, then the destination port.
	if (old_port != new_port &&
	    (bpf_l4_csum_replace(skb, p->csum_off, old_port, new_port, p->csum_flags | 2) ||
	     bpf_skb_store_bytes(skb, p->l4_off + (dst ? 2 : 0), &new_port, 2, 0)))
		return -1;
	return 0;
}

// Decrements the TTL (hop limit) and sends the (rewritten) packet out of `ifindex`.
static __always_inline int send_out(struct __sk_buff *skb, struct bpf_fib_lookup *fib, long rc,
				    __u32 ifindex, const struct packet *p)
{
	__u8 ttl = p->ttl - 1;
	if (p->t.family == AF_INET) {
		__u16 old_ttl = bpf_htons((__u16)p->ttl << 8), new_ttl = bpf_htons((__u16)ttl << 8);
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ttl, new_ttl, 2) ||
		    bpf_skb_store_bytes(skb, IP_TTL_OFF, &ttl, 1, 0))
			return TC_ACT_SHOT;
	} else if (bpf_skb_store_bytes(skb, IP6_HOP_OFF, &ttl, 1, 0)) {
		return TC_ACT_SHOT;
	}
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), fib->dmac, ETH_ALEN, 0) ||
		    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), fib->smac, ETH_ALEN, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(ifindex, 0);
	}
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

// The backend's side of a translation of the flow `t`: the tuple its replies carry.
static __always_inline struct tuple reply_tuple(const struct fwd_nat *nat, const struct tuple *t)
{
	struct tuple r = { .saddr = nat->backend_addr, .daddr = nat->snat_addr,
			   .sport = nat->backend_port, .dport = nat->snat_port,
			   .family = t->family, .protocol = t->protocol, .pad = 0 };
	return r;
}

// Whether the reply translation `rev` still belongs to the client of `t`.
static __always_inline int owned_by(const struct rev_nat *rev, const struct tuple *t)
{
	return rev && same_addr(&rev->client_addr, &t->saddr) && rev->client_port == t->sport &&
	       same_addr(&rev->dialled_addr, &t->daddr) && rev->dialled_port == t->dport;
}

// Whether the translation `rev` of a `protocol` flow may go to another flow: a closed TCP
// connection's after a while, an idle flow's.
static __always_inline int reusable(const struct rev_nat *rev, __u8 protocol, __u64 now)
{
	// Another CPU may have stamped it after `now` was read.
	if (rev->seen >= now)
		return 0;
	__u64 age = now - rev->seen;
	if (protocol == IPPROTO_UDP)
		return age > flk_udp_idle_ns;
	return (rev->state && age > CLOSED_REUSE_NS) || age > IDLE_REUSE_NS;
}

// Whether a socket of the node's own would receive the replies `r` (then its port is taken).
static __always_inline int socket_holds(struct __sk_buff *skb, const struct tuple *r)
{
	struct bpf_sock_tuple st = {};
	__u32 size;
	if (r->family == AF_INET) {
		st.ipv4.saddr = r->saddr.w[0];
		st.ipv4.daddr = r->daddr.w[0];
		st.ipv4.sport = r->sport;
		st.ipv4.dport = r->dport;
		size = sizeof(st.ipv4);
	} else {
		__builtin_memcpy(st.ipv6.saddr, r->saddr.w, 16);
		__builtin_memcpy(st.ipv6.daddr, r->daddr.w, 16);
		st.ipv6.sport = r->sport;
		st.ipv6.dport = r->dport;
		size = sizeof(st.ipv6);
	}
	if (r->protocol == IPPROTO_TCP) {
		struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &st, size, BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return 0;
		bpf_sk_release(sk);
		return 1;
	}
	struct bpf_sock *sk = bpf_sk_lookup_udp(skb, &st, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

// Records the reply translation of a new flow. With `snat`, picks a free source port on the
// address of the interface `out` the flow leaves by (the dialled address if that is
// unknown); returns -1 when none is free (the packet is then left to the stack).
static __always_inline int start_flow(struct __sk_buff *skb, const struct tuple *t,
				      struct fwd_nat *nat, int snat, __u32 out, __u64 now)
{
	struct rev_nat rev = { .client_addr = t->saddr, .client_port = t->sport,
			       .dialled_addr = t->daddr, .dialled_port = t->dport,
			       .state = 0, .seen = now };
	if (!snat) {
		nat->snat_addr = t->saddr;
		nat->snat_port = t->sport;
		struct tuple r = reply_tuple(nat, t);
		return bpf_map_update_elem(&flk_rev, &r, &rev, BPF_ANY) ? -1 : 0;
	}
	nat->snat_addr = t->daddr;
	if (t->family == AF_INET) {
		__u32 *out_addr = bpf_map_lookup_elem(&flk_ifaddr, &out);
		if (out_addr)
			nat->snat_addr.w[0] = *out_addr;
	} else {
		struct ip_addr *out_addr = bpf_map_lookup_elem(&flk_ifaddr6, &out);
		if (out_addr)
			nat->snat_addr = *out_addr;
	}
	__u32 start = bpf_get_prandom_u32();
	for (int i = 0; i < SNAT_TRIES; i++) {
		nat->snat_port = bpf_htons((__u16)(SNAT_FIRST + (start + i) % SNAT_COUNT));
		struct tuple r = reply_tuple(nat, t);
		struct rev_nat *old = bpf_map_lookup_elem(&flk_rev, &r);
		if (old && !reusable(old, t->protocol, now))
			continue;
		if (socket_holds(skb, &r))
			continue;
		if (!bpf_map_update_elem(&flk_rev, &r, &rev, old ? BPF_EXIST : BPF_NOEXIST))
			return 0;
	}
	count(STAT_SNAT_EXHAUSTED);
	return -1;
}

// The client's tuple of the flow `rev` belongs to (`reply` is the backend's): the key of its
// flk_fwd entry.
static __always_inline struct tuple client_tuple(const struct rev_nat *rev,
						 const struct tuple *reply)
{
	struct tuple t = { .saddr = rev->client_addr, .daddr = rev->dialled_addr,
			   .sport = rev->client_port, .dport = rev->dialled_port,
			   .family = reply->family, .protocol = reply->protocol, .pad = 0 };
	return t;
}

// The `state` bits a packet adds: its FIN (by `fin_bit`'s side) and RST.
static __always_inline __u32 close_bits(int fin, int rst, __u32 fin_bit)
{
	return (fin ? fin_bit : 0) | (rst ? RESET : 0);
}

// Whether a packet with `state` so far, and no FIN or RST of its own, ends the connection: a
// reset, or the last ACK after both FINs. Its flow goes once the packet is on its way.
static __always_inline int ends_flow(__u32 state, int fin, int rst)
{
	return rst || (!fin && (state & BOTH_FINS) == BOTH_FINS);
}

// Forgets a finished connection: its client-side entry, and its backend-side entry unless
// that holds a translated source port, which stays (marked closed) until it may be reused.
static __always_inline void end_flow(const struct tuple *client, const struct tuple *reply,
				     int snat)
{
	bpf_map_delete_elem(&flk_fwd, client);
	if (!snat)
		bpf_map_delete_elem(&flk_rev, reply);
}

// A packet from a client to a node address: a TCP connection's first packet, or any UDP
// datagram, follows the route of its port (so a UDP client that keeps sending moves with the
// route, as the conntrack janitor makes the nftables path do); other TCP packets follow
// their connection's flow, if it has one here.
static __always_inline int from_client(struct __sk_buff *skb, const struct packet *p)
{
	const struct tuple *t = &p->t;
	struct fwd_nat *known = bpf_map_lookup_elem(&flk_fwd, t);
	struct fwd_nat nat = {};
	struct bpf_fib_lookup fib = {};
	long rc = 0;
	__u32 out = 0;
	__u64 now = bpf_ktime_get_coarse_ns();
	int udp = t->protocol == IPPROTO_UDP;

	if (!p->syn && !udp) {
		// Anything but a first packet is a connection the stack already carries.
		if (!known)
			return TC_ACT_OK;
		nat = *known;
	} else {
		int remote = 0;
		if (route_of(t, &nat, &remote))
			return TC_ACT_OK;
		// A retransmitted SYN, the client reusing its port towards the same backend, or the
		// next datagram of a live UDP flow keeps its translation while that is still this
		// client's.
		int keep = 0;
		if (known && same_addr(&known->backend_addr, &nat.backend_addr) &&
		    known->backend_port == nat.backend_port) {
			struct tuple r = reply_tuple(known, t);
			struct rev_nat *rev = bpf_map_lookup_elem(&flk_rev, &r);
			if (owned_by(rev, t) && !(udp && reusable(rev, IPPROTO_UDP, now))) {
				if (!udp) {
					known->state = 0;
					rev->state = 0;
				}
				rev->seen = now;
				nat = *known;
				keep = 1;
			}
		}
		if (!keep) {
			out = egress(skb, &fib, p, &t->saddr, &nat.backend_addr, t->sport,
				     nat.backend_port, &rc);
			if (!out)
				return TC_ACT_OK;
			int snat = remote || out == skb->ingress_ifindex;
			if (start_flow(skb, t, &nat, snat, out, now) ||
			    bpf_map_update_elem(&flk_fwd, t, &nat, BPF_ANY))
				return TC_ACT_OK;
			count(STAT_FLOWS + (t->family == AF_INET6 ? 2 : 0) + (udp ? 1 : 0));
		}
	}
	struct tuple reply = reply_tuple(&nat, t);
	__u32 bits = close_bits(p->fin, p->rst, CLIENT_FIN);
	if (bits) {
		struct rev_nat *rev = bpf_map_lookup_elem(&flk_rev, &reply);
		if (rev)
			rev->state |= bits;
		struct fwd_nat *entry = bpf_map_lookup_elem(&flk_fwd, t);
		if (entry)
			entry->state |= bits;
	}
	// A new flow's first packet goes where the lookup that chose its translation said.
	if (!out)
		out = egress(skb, &fib, p, &nat.snat_addr, &nat.backend_addr, nat.snat_port,
			     nat.backend_port, &rc);
	if (!out)
		return TC_ACT_OK;
	if (rewrite(skb, p, 1, &t->daddr, &nat.backend_addr, t->dport, nat.backend_port) ||
	    rewrite(skb, p, 0, &t->saddr, &nat.snat_addr, t->sport, nat.snat_port))
		return TC_ACT_SHOT;
	if (ends_flow(nat.state | bits, p->fin, p->rst))
		end_flow(t, &reply,
			 !same_addr(&nat.snat_addr, &t->saddr) || nat.snat_port != t->sport);
	return send_out(skb, &fib, rc, out, p);
}

// A backend's reply on a translated flow.
static __always_inline int from_backend(struct __sk_buff *skb, const struct packet *p,
					struct rev_nat *rev)
{
	const struct tuple *t = &p->t;
	struct bpf_fib_lookup fib = {};
	long rc = 0;
	__u32 bits = close_bits(p->fin, p->rst, BACKEND_FIN);
	rev->seen = bpf_ktime_get_coarse_ns();
	struct tuple client = client_tuple(rev, t);
	if (bits) {
		rev->state |= bits;
		struct fwd_nat *entry = bpf_map_lookup_elem(&flk_fwd, &client);
		if (entry)
			entry->state |= bits;
	}
	struct rev_nat to = *rev;
	__u32 out = egress(skb, &fib, p, &to.dialled_addr, &to.client_addr, to.dialled_port,
			   to.client_port, &rc);
	if (!out)
		return TC_ACT_OK;
	if (rewrite(skb, p, 0, &t->saddr, &to.dialled_addr, t->sport, to.dialled_port) ||
	    rewrite(skb, p, 1, &t->daddr, &to.client_addr, t->dport, to.client_port))
		return TC_ACT_SHOT;
	if (ends_flow(to.state, p->fin, p->rst))
		end_flow(&client, t,
			 !same_addr(&t->daddr, &to.client_addr) || t->dport != to.client_port);
	return send_out(skb, &fib, rc, out, p);
}

SEC("classifier")
int flk_tc_ingress(struct __sk_buff *skb)
{
	struct packet p = {};
	if (parse(skb, &p))
		return TC_ACT_OK;
	struct rev_nat *rev = bpf_map_lookup_elem(&flk_rev, &p.t);
	if (rev)
		return from_backend(skb, &p, rev);
	if (to_node(&p.t))
		return from_client(skb, &p);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
