// Outbound redirect for enrolled pods: connect4 rewrites TCP connects to the
// in-pod ztunnel listener and remembers the original destination; sockops moves
// that memory from the app socket's cookie to the client (ip, port) that the
// proxy sees on its accepted socket; getsockopt(SO_ORIGINAL_DST) answers from it.
// connect4 also enforces egress NetworkPolicy/CNP from maps ztunnel fills, and refuses (EPERM)
// a connect whose pod has no ztunnel listening, recording both kinds of drop.
// connect6/getpeername6 do the same for IPv4 destinations reached through an AF_INET6
// socket as v4-mapped addresses (::ffff:a.b.c.d: what dual-stack clients such as gRPC and
// Java do for every IPv4 address); without them those connects bypassed the mesh.
// Only UAPI structs (struct bpf_sock_addr, bpf_sock_ops, bpf_sockopt) are used.
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#define PROXY_IP 0x0100007fU /* 127.0.0.1, network order as read on little endian */
#define SOL_IP_ 0
#define SO_ORIGINAL_DST_ 80
#ifndef ENFORCE
#define ENFORCE 1
#endif

struct orig_dst { u32 ip; u32 port; };
struct client_key { u64 netns; u32 ip; u32 port; };

BPF_TABLE_PINNED("lru_hash", u64, struct orig_dst, orig_by_cookie, 65536, "PIN_ROOT/orig_by_cookie");
BPF_TABLE_PINNED("lru_hash", struct client_key, struct orig_dst, orig_by_client, 65536, "PIN_ROOT/orig_by_client");
BPF_TABLE_PINNED("hash", u32, u32, excluded_ports, 64, "PIN_ROOT/excluded_ports");

/* Egress policy (NetworkPolicy / CiliumNetworkPolicy), compiled by ztunnel from the snapshot
 * (bpf/policy.py). Every key carries a generation: ztunnel writes generation G+1 beside G, then
 * switches pol_gen[0] in one map write, so a connect sees all of one policy or all of the next;
 * G is deleted only when G+2 is written. A pod is keyed by its netns cookie (all its containers
 * share it, whatever sub-cgroup they run in). */
struct pol_pod_key { u32 gen; u32 pad; u64 netns; };
struct pol_pod_val { u32 deny_id; u32 flags; };            /* present: the pod is isolated */
struct pol_cidr_key { u32 prefixlen; u32 gen; u64 netns; u32 port; u32 ip; };
struct pol_vip_key { u32 gen; u32 ip; u64 netns; u32 port; u32 pad; };
struct vip_key { u32 gen; u32 ip; };
BPF_TABLE_PINNED("array", u32, u32, pol_gen, 1, "PIN_ROOT/pol_gen");
BPF_TABLE_PINNED("hash", struct pol_pod_key, struct pol_pod_val, pol_pod, 8192, "PIN_ROOT/pol_pod");
/* value: id of the allowing policy, 0 = denied (a more specific prefix carved out) */
BPF_TABLE_PINNED("lpm_trie", struct pol_cidr_key, u32, pol_cidr, 262144, "PIN_ROOT/pol_cidr",
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct vip_key, u32, pol_vips, 32768, "PIN_ROOT/pol_vips");
BPF_TABLE_PINNED("hash", struct pol_vip_key, u32, pol_vip, 131072, "PIN_ROOT/pol_vip");

/* Kernel-side drops: counters per (reason, policy id), and one event per drop. Both pinned,
 * so drops while ztunnel is down are kept for it to read when it is back. */
#define REASON_POLICY 1
#define REASON_NO_ZTUNNEL 2
struct drop_key { u32 reason; u32 policy; };
struct drop_event { u64 boot_ns; u64 netns; u64 cgroup; u32 dst_ip; u16 dst_port; u16 reason;
                    u32 policy; u32 pad; };
BPF_TABLE_PINNED("hash", struct drop_key, u64, drop_counts, 4096, "PIN_ROOT/drop_counts");
/* BCC's BPF_RINGBUF_OUTPUT cannot be pinned; the same table, with a pin path in its section */
struct drop_events_table_t {
    int key; u32 leaf;
    int (*ringbuf_output) (void *, u64, u64);
    void* (*ringbuf_reserve) (u64);
    void (*ringbuf_discard) (void *, u64);
    void (*ringbuf_submit) (void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/ringbuf:PIN_ROOT/drop_events")))
struct drop_events_table_t drop_events = { .max_entries = 64 * 4096 };

static __always_inline int drop(u64 netns, u32 ip, u32 port, u32 reason, u32 policy) {
    struct drop_key k = {.reason = reason, .policy = policy};
    u64 zero = 0, *n = drop_counts.lookup(&k);
    if (!n) {                                         /* first of its kind: insert, never */
        drop_counts.insert(&k, &zero);                /* overwrite another CPU's first count */
        n = drop_counts.lookup(&k);
    }
    if (n) __sync_fetch_and_add(n, 1);
    struct drop_event ev = {.boot_ns = bpf_ktime_get_boot_ns(), .netns = netns,
                            .cgroup = bpf_get_current_cgroup_id(), .dst_ip = ip,
                            .dst_port = port, .reason = reason,
                            .policy = policy};
    drop_events.ringbuf_output(&ev, sizeof(ev), 0);
    return 0;                                         /* connect() fails with EPERM */
}

/* 0: allowed; else the id of the policy that denies */
static __always_inline u32 egress_denied(u64 netns, u32 ip, u32 port) {
    u32 zero = 0, *g = pol_gen.lookup(&zero);
    if (!g) return 0;
    u32 gen = *g;
    struct pol_pod_key pk = {.gen = gen, .netns = netns};
    struct pol_pod_val *pod = pol_pod.lookup(&pk);
    if (!pod) return 0;                               /* no policy isolates this pod */
    struct vip_key vk = {.gen = gen, .ip = ip};
    if (pol_vips.lookup(&vk)) {                       /* a Service VIP: decided per service port */
        struct pol_vip_key k = {.gen = gen, .ip = ip, .netns = netns, .port = port};
        u32 *v = pol_vip.lookup(&k);
        return (v && *v) ? 0 : pod->deny_id;
    }
    /* the port's own table when the pod's rules name the port, else the any-port one */
    struct pol_cidr_key ck = {.prefixlen = 160, .gen = gen, .netns = netns, .port = port, .ip = ip};
    u32 *v = pol_cidr.lookup(&ck);
    if (!v) {
        ck.port = 0;
        v = pol_cidr.lookup(&ck);
    }
    return (v && *v) ? 0 : pod->deny_id;
}

/* Is ztunnel's listener there, in the pod's netns? Without it the redirected connect would
 * only be refused (ECONNREFUSED, no hint why): refuse it here instead, and say so. */
static __always_inline int ztunnel_listening(struct bpf_sock_addr *ctx) {
    struct bpf_sock_tuple t = {};
    t.ipv4.daddr = PROXY_IP;
    t.ipv4.dport = bpf_htons(PROXY_PORT);
    struct bpf_sock *sk = bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk) return 0;
    bpf_sk_release(sk);
    return 1;
}

/* Egress policy, then ztunnel's presence: 0 (after recording the drop) refuses the connect.
 * connect4 and connect6 (v4-mapped) share it, so no socket family skips the policy. */
static __always_inline int admit(struct bpf_sock_addr *ctx, u32 ip, u32 port) {
    u64 netns = bpf_get_netns_cookie(ctx);
    u32 denied = egress_denied(netns, ip, port);
    if (denied) return drop(netns, ip, port, REASON_POLICY, denied);
    if (!ztunnel_listening(ctx)) return drop(netns, ip, port, REASON_NO_ZTUNNEL, 0);
    return 1;
}

int connect4(struct bpf_sock_addr *ctx) {
    if (ctx->type != 1 /* SOCK_STREAM */) return 1;
    u32 ip = ctx->user_ip4;
    if ((ip & 0xff) == 127) return 1;               /* loopback-to-self */
    u32 port = bpf_ntohs((u16)ctx->user_port);
    if (excluded_ports.lookup(&port)) return 1;
    if (ENFORCE && !admit(ctx, ip, port)) return 0;  /* EPERM; 0 only for the cost benchmark */
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst od = {.ip = ip, .port = ctx->user_port};
    orig_by_cookie.update(&cookie, &od);
    ctx->user_ip4 = PROXY_IP;
    ctx->user_port = bpf_htons(PROXY_PORT);
    return 1;
}

/* ::ffff:a.b.c.d, as user_ip6[] holds it (network order words) */
static __always_inline int v4mapped(struct bpf_sock_addr *ctx) {
    return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
           ctx->user_ip6[2] == bpf_htonl(0x0000ffff);
}

int connect6(struct bpf_sock_addr *ctx) {
    if (ctx->type != 1 /* SOCK_STREAM */) return 1;
    if (!v4mapped(ctx)) return 1;                   /* IPv6 proper: not the mesh's (IPv4) */
    u32 ip = ctx->user_ip6[3];
    if ((ip & 0xff) == 127) return 1;               /* loopback-to-self */
    u32 port = bpf_ntohs((u16)ctx->user_port);
    if (excluded_ports.lookup(&port)) return 1;
    if (ENFORCE && !admit(ctx, ip, port)) return 0;  /* the same policy as connect4's */
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst od = {.ip = ip, .port = ctx->user_port};
    orig_by_cookie.update(&cookie, &od);
    ctx->user_ip6[3] = PROXY_IP;                    /* ::ffff:127.0.0.1 */
    ctx->user_port = bpf_htons(PROXY_PORT);
    return 1;
}

int getpeername6(struct bpf_sock_addr *ctx) {
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst *od = orig_by_cookie.lookup(&cookie);
    if (od) { ctx->user_ip6[3] = od->ip; ctx->user_port = od->port; }
    return 1;
}

int getpeername4(struct bpf_sock_addr *ctx) {
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst *od = orig_by_cookie.lookup(&cookie);
    if (od) { ctx->user_ip4 = od->ip; ctx->user_port = od->port; }
    return 1;
}

struct tuple4 { u64 netns; u32 sip; u32 dip; u32 sport; u32 dport; };
BPF_SOCKHASH(fastpath, struct tuple4, 65536);

static __always_inline void fastpath_add(struct bpf_sock_ops *skops) {
    /* key: this socket's (local, remote); host-order local port, network-order remote */
    struct tuple4 k = {.netns = bpf_get_netns_cookie(skops),
                       .sip = skops->local_ip4, .dip = skops->remote_ip4,
                       .sport = skops->local_port, .dport = bpf_ntohl(skops->remote_port)};
    fastpath.sock_hash_update(skops, &k, BPF_ANY);
}

int sk_msg_fast(struct sk_msg_md *msg) {
    /* peer socket's key is ours reversed */
    struct tuple4 k = {.netns = bpf_get_netns_cookie(msg),
                       .sip = msg->remote_ip4, .dip = msg->local_ip4,
                       .sport = bpf_ntohl(msg->remote_port), .dport = msg->local_port};
    fastpath.msg_redirect_hash(msg, &k, BPF_F_INGRESS);
    return SK_PASS;
}

int sockops(struct bpf_sock_ops *skops) {
    if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        if (skops->local_port == PROXY_PORT && skops->local_ip4 == PROXY_IP) fastpath_add(skops);
        return 1;
    }
    if (skops->op == BPF_SOCK_OPS_STATE_CB) {
        /* args[1] is the new state: forget a redirected socket when it closes */
        if (skops->args[1] != BPF_TCP_CLOSE) return 1;
        u64 cookie = bpf_get_socket_cookie(skops);
        if (!orig_by_cookie.lookup(&cookie)) return 1;
        struct client_key k = {.netns = bpf_get_netns_cookie(skops),
                               .ip = skops->local_ip4, .port = skops->local_port};
        orig_by_client.delete(&k);
        orig_by_cookie.delete(&cookie);
        return 1;
    }
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) return 1;
    u64 cookie = bpf_get_socket_cookie(skops);
    struct orig_dst *od = orig_by_cookie.lookup(&cookie);
    if (!od) return 1;
    struct client_key k = {.netns = bpf_get_netns_cookie(skops),
                           .ip = skops->local_ip4, .port = skops->local_port};
    struct orig_dst v = *od;
    orig_by_client.update(&k, &v);
    bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
    if (FASTPATH) fastpath_add(skops);
    return 1;
}

int getsockopt(struct bpf_sockopt *ctx) {
    if (ctx->level != SOL_IP_ || ctx->optname != SO_ORIGINAL_DST_) return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk) return 1;
    struct client_key k = {.netns = bpf_get_netns_cookie(ctx),
                           .ip = sk->dst_ip4, .port = bpf_ntohs((u16)sk->dst_port)};
    struct orig_dst *od = orig_by_client.lookup(&k);
    if (!od) return 1;                                /* keep the kernel's (conntrack) answer */
    struct sockaddr_in *sa = ctx->optval;
    if ((void *)(sa + 1) > ctx->optval_end) return 1;
    sa->sin_family = AF_INET;
    sa->sin_port = (u16)od->port;
    sa->sin_addr.s_addr = od->ip;
    ctx->retval = 0;
    /* keep two 32-bit context stores: the verifier rejects a merged 64-bit one */
    asm volatile("" ::: "memory");
    ctx->optlen = sizeof(*sa);
    return 1;
}
