//! The relay's quotas per user (binds held, packets and bytes per second) and in all (binds),
//! sans IO but for the locks that let the relay's shards charge in parallel.

use super::config::Quotas;
use crate::rate::TokenBucket;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What one user uses right now. Each of the user's binds holds it, so a packet is charged
/// under the user's own lock, not the map's.
#[derive(Debug)]
pub(super) struct UserUse {
    /// Binds held; changed only under the map's lock.
    binds: AtomicU32,
    /// Packets and bytes (in 1500-byte units) per second.
    rates: Mutex<(TokenBucket, TokenBucket)>,
}

impl UserUse {
    fn new(q: &Quotas, now: Instant) -> Self {
        Self {
            binds: AtomicU32::new(0),
            rates: Mutex::new((
                TokenBucket::new(q.packets_per_second_per_user, now),
                TokenBucket::new(q.bytes_per_second_per_user.div_ceil(1500), now),
            )),
        }
    }

    /// Charges one datagram of `len` bytes at `now`; false if over quota.
    pub(super) fn charge(&self, len: usize, now: Instant) -> bool {
        let Ok(mut rates) = self.rates.lock() else {
            return false;
        };
        let (packets, bytes) = &mut *rates;
        if !packets.take(now) {
            return false;
        }
        // Bytes are charged in 1500-byte units so that one token bucket serves both limits.
        let units = len.div_ceil(1500).max(1);
        (0..units).all(|_| bytes.take(now))
    }
}

/// Every user's use, and the binds held in all.
#[derive(Debug)]
pub(super) struct Usage {
    quotas: Quotas,
    users: Mutex<HashMap<String, Arc<UserUse>>>,
    binds_total: AtomicU32,
}

impl Usage {
    pub(super) fn new(quotas: Quotas) -> Arc<Self> {
        Arc::new(Self {
            quotas,
            users: Mutex::new(HashMap::new()),
            binds_total: AtomicU32::new(0),
        })
    }

    /// A bind slot for `user` at `now`, or None if the user or the relay holds as many binds
    /// as the quotas allow.
    pub(super) fn take(self: &Arc<Self>, user: &str, now: Instant) -> Option<BindSlot> {
        let q = self.quotas;
        let mut users = self.users.lock().ok()?;
        let u = users
            .entry(user.to_owned())
            .or_insert_with(|| Arc::new(UserUse::new(&q, now)));
        if u.binds.load(Ordering::Relaxed) >= q.binds_per_user {
            return None;
        }
        if self.binds_total.fetch_add(1, Ordering::Relaxed) >= q.binds_total {
            self.binds_total.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        u.binds.fetch_add(1, Ordering::Relaxed);
        Some(BindSlot {
            usage: self.clone(),
            user: user.to_owned(),
            user_use: u.clone(),
        })
    }
}

/// A running request's slot in its user's and the relay's bind count; released on drop.
#[derive(Debug)]
pub(super) struct BindSlot {
    usage: Arc<Usage>,
    user: String,
    user_use: Arc<UserUse>,
}

impl BindSlot {
    /// The user's packet and byte allowance, which every datagram of the bind is charged to.
    pub(super) fn user_use(&self) -> Arc<UserUse> {
        self.user_use.clone()
    }
}

impl Drop for BindSlot {
    fn drop(&mut self) {
        self.usage.binds_total.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut users) = self.usage.users.lock()
            && self.user_use.binds.fetch_sub(1, Ordering::Relaxed) <= 1
        {
            users.remove(&self.user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn quotas() -> Quotas {
        Quotas {
            binds_per_user: 2,
            binds_total: 3,
            packets_per_second_per_user: 10,
            bytes_per_second_per_user: 15_000,
            ..Quotas::default()
        }
    }

    #[test]
    fn binds_are_capped_per_user_and_in_all_and_given_back_on_drop() {
        let now = Instant::now();
        let usage = Usage::new(quotas());
        let a1 = usage.take("alice", now).expect("first");
        let a2 = usage.take("alice", now).expect("second");
        assert!(usage.take("alice", now).is_none(), "alice holds her 2");
        let b1 = usage.take("bob", now).expect("bob's first");
        assert!(usage.take("carol", now).is_none(), "the relay holds its 3");
        drop(a1);
        let c1 = usage.take("carol", now).expect("one given back");
        drop((a2, b1, c1));
        assert_eq!(usage.binds_total.load(Ordering::Relaxed), 0);
        assert!(usage.users.lock().expect("lock").is_empty(), "no user kept");
    }

    #[test]
    fn a_users_binds_share_one_packet_and_byte_allowance() {
        let now = Instant::now();
        let usage = Usage::new(quotas());
        let (one, two) = (
            usage.take("alice", now).expect("bind"),
            usage.take("alice", now).expect("bind"),
        );
        let (u1, u2) = (one.user_use(), two.user_use());
        // 10 packets a second between both binds.
        let sent = (0..20)
            .filter(|i| if i % 2 == 0 { &u1 } else { &u2 }.charge(100, now))
            .count();
        assert_eq!(sent, 10);
        // Bytes: 15,000 a second is 10 units of 1500; a 9,000-byte datagram takes 6 of them.
        let later = now + Duration::from_secs(5);
        assert!(u1.charge(9_000, later));
        assert!(!u2.charge(9_000, later), "4 units left, 6 asked");
        assert!(u2.charge(1_500, later + Duration::from_millis(200)));
    }
}
