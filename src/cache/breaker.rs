//! A circuit breaker in front of Redis, per hash slot (one slot when Redis is a single node or
//! a Sentinel-managed primary). While a slot is known to be down, calls for it fail at once
//! without touching the network, except one probe at a time every `PROBE_EVERY_MS`; the first
//! success closes it. The token path then answers from memory at memory speed instead of
//! waiting out a timeout per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::time::now_ms;

/// How long after a failure (or a failed probe) the next probe may go out.
pub const PROBE_EVERY_MS: i64 = 250;
/// Consecutive failures (timeouts) that open a slot; a refused or dropped connection opens it
/// at once. One slow answer on a busy machine is not an outage.
pub const OPEN_AFTER: u32 = 3;
/// A slot opened by timeouts alone counts as a confirmed outage (one worth minting without the
/// cross-replica lock for) only after it has stayed down this long: a starved process sees
/// timeouts too, and a duplicate mint costs the partner a call.
pub const CONFIRM_MS: i64 = 500;

/// What a call may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// The slot is healthy: go ahead.
    Go,
    /// The slot is down and this call is its one probe: report the outcome.
    Probe,
    /// The slot is down and a probe is out or not yet due: fail without calling.
    Refuse,
}

#[derive(Clone, Debug)]
struct Down {
    since_ms: i64,
    /// Opened by a refused or dropped connection (no doubt it is down).
    definitive: bool,
    next_probe_ms: i64,
    probing: bool,
    reason: String,
}

/// A slot that is down, for readiness reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownSlot {
    pub slot: u16,
    pub since_ms: i64,
    pub reason: String,
}

#[derive(Default)]
pub struct Breaker {
    down: Mutex<HashMap<u16, Down>>,
    /// Consecutive failures of slots not (yet) open.
    suspect: Mutex<HashMap<u16, u32>>,
    /// Number of suspect slots: a success reads only this when there are none.
    n_suspect: AtomicUsize,
    /// Number of slots down: the healthy path reads only this.
    n_down: AtomicUsize,
}

impl Breaker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a call for `slot` may go out now.
    pub fn admit(&self, slot: u16) -> Admit {
        if self.n_down.load(Ordering::Acquire) == 0 {
            return Admit::Go;
        }
        let now = now_ms();
        let mut down = self.down.lock().expect("breaker");
        match down.get_mut(&slot) {
            None => Admit::Go,
            Some(d) if !d.probing && now >= d.next_probe_ms => {
                d.probing = true;
                Admit::Probe
            }
            Some(_) => Admit::Refuse,
        }
    }

    /// A call for `slot` succeeded; returns true if this closed a slot that was down.
    pub fn success(&self, slot: u16) -> bool {
        if self.n_suspect.load(Ordering::Acquire) > 0 {
            let mut suspect = self.suspect.lock().expect("breaker");
            suspect.remove(&slot);
            self.n_suspect.store(suspect.len(), Ordering::Release);
        }
        if self.n_down.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut down = self.down.lock().expect("breaker");
        let closed = down.remove(&slot).is_some();
        self.n_down.store(down.len(), Ordering::Release);
        closed
    }

    /// A call for `slot` failed; `definitive` when the failure leaves no doubt (connection
    /// refused or lost). Returns true if this opened the slot.
    pub fn failure(&self, slot: u16, reason: &str, definitive: bool) -> bool {
        let now = now_ms();
        let mut down = self.down.lock().expect("breaker");
        if !down.contains_key(&slot) {
            let mut suspect = self.suspect.lock().expect("breaker");
            let n = suspect.entry(slot).or_insert(0);
            *n += 1;
            let opens = *n >= OPEN_AFTER || definitive;
            if opens {
                suspect.remove(&slot);
            }
            self.n_suspect.store(suspect.len(), Ordering::Release);
            if !opens {
                return false;
            }
        }
        let opened = match down.get_mut(&slot) {
            Some(d) => {
                d.probing = false;
                d.next_probe_ms = now + PROBE_EVERY_MS;
                reason.clone_into(&mut d.reason);
                false
            }
            None => {
                down.insert(
                    slot,
                    Down {
                        since_ms: now,
                        definitive,
                        next_probe_ms: now + PROBE_EVERY_MS,
                        probing: false,
                        reason: reason.to_owned(),
                    },
                );
                true
            }
        };
        self.n_down.store(down.len(), Ordering::Release);
        opened
    }

    /// A probe ended without an answer either way (its future was dropped): let another go.
    pub fn probe_abandoned(&self, slot: u16) {
        if let Some(d) = self.down.lock().expect("breaker").get_mut(&slot) {
            d.probing = false;
        }
    }

    /// Whether `slot` is open (known to be down).
    pub fn is_down(&self, slot: u16) -> bool {
        self.n_down.load(Ordering::Acquire) > 0
            && self.down.lock().expect("breaker").contains_key(&slot)
    }

    /// Whether `slot` is down beyond doubt: opened by a refused or dropped connection, or
    /// down for `CONFIRM_MS`.
    pub fn outage_confirmed(&self, slot: u16) -> bool {
        self.n_down.load(Ordering::Acquire) > 0
            && self
                .down
                .lock()
                .expect("breaker")
                .get(&slot)
                .is_some_and(|d| d.definitive || now_ms() - d.since_ms >= CONFIRM_MS)
    }

    pub fn is_healthy(&self) -> bool {
        self.n_down.load(Ordering::Acquire) == 0
    }

    /// The slots down now, lowest first.
    pub fn down_slots(&self) -> Vec<DownSlot> {
        let mut v: Vec<DownSlot> = self
            .down
            .lock()
            .expect("breaker")
            .iter()
            .map(|(slot, d)| DownSlot {
                slot: *slot,
                since_ms: d.since_ms,
                reason: d.reason.clone(),
            })
            .collect();
        v.sort_by_key(|d| d.slot);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_slots_go_and_a_down_slot_lets_one_probe_through() {
        let b = Breaker::new();
        assert_eq!(b.admit(7), Admit::Go);
        assert!(!b.failure(7, "timed out", false));
        assert!(!b.failure(7, "timed out", false));
        assert!(
            b.failure(7, "timed out", false),
            "opens on the third timeout"
        );
        assert!(!b.failure(7, "timed out", false), "already open");
        assert!(b.is_down(7) && !b.is_down(8));
        assert!(!b.outage_confirmed(7), "timeouts alone: not yet confirmed");
        b.down.lock().unwrap().get_mut(&7).unwrap().since_ms -= CONFIRM_MS;
        assert!(b.outage_confirmed(7), "confirmed once it stays down");
        assert_eq!(b.admit(8), Admit::Go, "other slots are not affected");
        assert_eq!(b.admit(7), Admit::Refuse, "no probe before the interval");
        b.down.lock().unwrap().get_mut(&7).unwrap().next_probe_ms = 0;
        assert_eq!(b.admit(7), Admit::Probe);
        assert_eq!(b.admit(7), Admit::Refuse, "one probe at a time");
        assert!(!b.is_healthy());
        assert_eq!(b.down_slots()[0].slot, 7);
        assert!(b.success(7));
        assert!(b.is_healthy());
        assert_eq!(b.admit(7), Admit::Go);
        assert!(!b.success(7));
    }

    #[test]
    fn a_success_between_timeouts_resets_the_count() {
        let b = Breaker::new();
        b.failure(3, "timed out", false);
        b.failure(3, "timed out", false);
        b.success(3);
        assert!(!b.failure(3, "timed out", false));
        assert!(b.is_healthy());
    }

    #[test]
    fn an_abandoned_probe_frees_the_probe_slot() {
        let b = Breaker::new();
        assert!(
            b.failure(1, "refused", true),
            "a refused connection opens at once"
        );
        b.down.lock().unwrap().get_mut(&1).unwrap().next_probe_ms = 0;
        assert_eq!(b.admit(1), Admit::Probe);
        b.probe_abandoned(1);
        assert_eq!(b.admit(1), Admit::Probe);
    }
}
