// Outbound redirect for enrolled pods: connect4 rewrites TCP connects to the
// in-pod ztunnel listener and remembers the original destination; sockops moves
// that memory from the app socket's cookie to the client (ip, port) that the
// proxy sees on its accepted socket; getsockopt(SO_ORIGINAL_DST) answers from it.
// connect6/getpeername6 do the same for IPv4 destinations reached through an AF_INET6
// socket as v4-mapped addresses (::ffff:a.b.c.d: what dual-stack clients such as gRPC and
// Java do for every IPv4 address); without them those connects bypassed the mesh.
// Only UAPI structs (struct bpf_sock_addr, bpf_sock_ops, bpf_sockopt) are used.
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#define PROXY_IP 0x0100007fU /* 127.0.0.1, network order as read on little endian */
#define SOL_IP_ 0
#define SO_ORIGINAL_DST_ 80

struct orig_dst { u32 ip; u32 port; };
struct client_key { u64 netns; u32 ip; u32 port; };

BPF_TABLE_PINNED("lru_hash", u64, struct orig_dst, orig_by_cookie, 65536, "PIN_ROOT/orig_by_cookie");
BPF_TABLE_PINNED("lru_hash", struct client_key, struct orig_dst, orig_by_client, 65536, "PIN_ROOT/orig_by_client");
BPF_TABLE_PINNED("hash", u32, u32, excluded_ports, 64, "PIN_ROOT/excluded_ports");

int connect4(struct bpf_sock_addr *ctx) {
    if (ctx->type != 1 /* SOCK_STREAM */) return 1;
    u32 ip = ctx->user_ip4;
    if ((ip & 0xff) == 127) return 1;               /* loopback-to-self */
    u32 port = bpf_ntohs((u16)ctx->user_port);
    if (excluded_ports.lookup(&port)) return 1;
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
