// Same-node fast path: ztunnel puts both legs of an authorized plaintext splice (the socket it
// accepted from pod A, the socket it dialled to pod B) into fp_socks, keyed by socket cookie,
// and records each leg's partner in fp_peer. The stream verdict then sends every byte a leg
// receives straight out of its partner, so the bytes never climb into ztunnel's Python.
// A leg without a partner (not yet paired, or already forgotten) passes: userspace reads it.
#include <uapi/linux/bpf.h>

BPF_SOCKHASH(fp_socks, u64, 65536);
/* per leg: its partner's cookie, and the bytes redirected so far (the flow's byte counts) */
struct fp_leg { u64 peer; u64 bytes; };
BPF_HASH(fp_peer, u64, struct fp_leg, 65536);

int fastpath_verdict(struct __sk_buff *skb) {
    u64 cookie = bpf_get_socket_cookie(skb);
    struct fp_leg *leg = fp_peer.lookup(&cookie);
    if (!leg) return SK_PASS;
    u64 k = leg->peer;
    u32 len = skb->len;
    /* flags 0: out of the partner's egress (its send queue), not into its receive queue */
    if (fp_socks.sk_redirect_hash(skb, &k, 0) != SK_PASS)
        return SK_PASS;  /* partner not (or no longer) in the map: userspace gets the bytes */
    __sync_fetch_and_add(&leg->bytes, len);
    return SK_PASS;
}
