//! Steering a relay's QUIC packets to the thread that owns their connection (the classic BPF
//! program is made here; `crate::platform` attaches it).
//!
//! The relay serves its QUIC port from several sockets bound with `SO_REUSEPORT`, one per
//! thread (a *shard*). The kernel would spread packets by a hash of their addresses, so a
//! client whose address changes (a laptop on a new network, a NAT rebinding) would land on
//! another shard, which does not know its connection. Instead, a classic BPF program picks the
//! socket from the packet's destination connection ID, whose first byte every shard chooses
//! to be its own index modulo the number of shards ([`ShardedConnectionIds`]): the connection
//! follows its client across addresses, as QUIC migration intends.
//!
//! The program sees the UDP payload. For a long-header packet (first bit set) the destination
//! connection ID starts at byte 6 (flags, 4 bytes of version, its length), for a short-header
//! packet at byte 1. A client's first Initial carries a connection ID of its own choosing, so
//! its shard is random; that shard then issues connection IDs that lead back to it.
use std::os::fd::AsFd;
use std::time::Duration;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, HashedConnectionIdGenerator, InvalidCid};

/// The shards a listening port is split into: at most this many.
pub(crate) const MAX_SHARDS: u8 = 64;

/// The shard a datagram addressed to the relay's QUIC port belongs to, as the kernel program
/// computes it (its reference, for tests).
#[cfg(test)]
pub(crate) fn shard_of(datagram: &[u8], shards: u8) -> u8 {
    let at = match datagram.first() {
        Some(first) if first & 0x80 != 0 => 6,
        _ => 1,
    };
    // The kernel ends the program with 0 when a load runs past the packet.
    datagram.get(at).map_or(0, |b| b % shards.max(1))
}

/// Tells the kernel to deliver each datagram arriving on `socket`'s `SO_REUSEPORT` group to
/// the group's socket number [`shard_of`] (sockets are numbered in the order they were bound).
pub(crate) fn steer_by_connection_id<S: AsFd>(socket: &S, shards: u8) -> std::io::Result<()> {
    const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
    const MOD_K: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;
    const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let program = [
        op(LD_B_ABS, 0, 0, 0),                     // A = first byte
        op(JSET_K, 0, 2, 0x80),                    // long header? next : skip two
        op(LD_B_ABS, 0, 0, 6),                     // A = long header's first DCID byte
        op(JA, 0, 0, 1),                           // skip one
        op(LD_B_ABS, 0, 0, 1),                     // A = short header's first DCID byte
        op(MOD_K, 0, 0, u32::from(shards.max(1))), // A %= shards
        op(RET_A, 0, 0, 0),                        // the socket index
    ];
    crate::platform::attach_reuseport_cbpf(socket, &program)
}

/// quinn's hashed connection IDs, drawn until the first byte names this shard (about `shards`
/// draws each; IDs are issued a few per connection). The byte reveals the shard, at most six
/// bits that the relay's QUIC port already narrows down; everything else stays random.
pub(crate) struct ShardedConnectionIds {
    inner: HashedConnectionIdGenerator,
    shard: u8,
    shards: u8,
}

impl ShardedConnectionIds {
    /// IDs for shard `shard` of `shards`, validated with `key` (the same in every shard, and
    /// across restarts).
    pub(crate) fn new(key: u64, shard: u8, shards: u8) -> Self {
        Self {
            inner: HashedConnectionIdGenerator::from_key(key),
            shard,
            shards: shards.max(1),
        }
    }
}

impl ConnectionIdGenerator for ShardedConnectionIds {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut cid = self.inner.generate_cid();
        // Bounded: after 4,096 misses (chance below 1e-27 for 64 shards) the last ID is used;
        // its packets would reach another shard and be answered with a stateless reset.
        for _ in 0..4096 {
            if cid.first().map(|b| b % self.shards) == Some(self.shard) {
                break;
            }
            cid = self.inner.generate_cid();
        }
        cid
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        self.inner.validate(cid)
    }

    fn cid_len(&self) -> usize {
        self.inner.cid_len()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        self.inner.cid_lifetime()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_issued_id_leads_back_to_its_shard() {
        for shards in [1u8, 2, 3, 8, MAX_SHARDS] {
            for shard in 0..shards {
                let mut ids = ShardedConnectionIds::new(7, shard, shards);
                for _ in 0..50 {
                    let cid = ids.generate_cid();
                    assert!(ids.validate(&cid).is_ok());
                    // A short-header packet to it: flags, then the ID.
                    let mut short = vec![0x40];
                    short.extend_from_slice(&cid);
                    assert_eq!(shard_of(&short, shards), shard);
                    // A long-header packet to it: flags, version, ID length, ID.
                    let mut long = vec![0xc0, 0, 0, 0, 1, cid.len() as u8];
                    long.extend_from_slice(&cid);
                    assert_eq!(shard_of(&long, shards), shard);
                }
            }
        }
    }

    #[test]
    fn ids_stay_random_apart_from_the_shard() {
        let mut ids = ShardedConnectionIds::new(7, 1, 4);
        let drawn: std::collections::HashSet<Vec<u8>> =
            (0..200).map(|_| ids.generate_cid().to_vec()).collect();
        assert_eq!(drawn.len(), 200);
        let first: std::collections::HashSet<u8> = drawn.iter().map(|c| c[0]).collect();
        assert!(
            first.len() > 20,
            "first bytes vary within the shard's residue"
        );
    }

    #[test]
    fn the_kernel_accepts_the_program() {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            .expect("socket");
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReusePort, &true)
            .expect("reuseport");
        socket
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        steer_by_connection_id(&socket, 4).expect("attach");
    }
}
