//! Counts of what peers hold (connections, sessions), capped in total and per peer address, so
//! that one client cannot take every place the server has.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Places of one kind, at most `max_total` held at once and `max_per_peer` by one address.
#[derive(Debug)]
pub(crate) struct PeerCounts {
    max_total: usize,
    max_per_peer: usize,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    /// Places held by each address; `None` stands for connections without a peer address.
    by_peer: HashMap<Option<IpAddr>, usize>,
}

/// Why a place was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// Every place is held.
    Total(usize),
    /// This peer holds its share.
    Peer(usize),
}

/// One held place, given back on drop.
#[derive(Debug)]
pub(crate) struct PeerHold {
    counts: Arc<PeerCounts>,
    peer: Option<IpAddr>,
}

impl PeerCounts {
    pub(crate) fn new(max_total: usize, max_per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_peer: max_per_peer.min(max_total),
            held: Mutex::default(),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // The counts stay consistent even if a holder panicked: every change is one statement.
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `peer` could take a place now.
    pub(crate) fn room(&self, peer: Option<IpAddr>) -> Result<(), Full> {
        let held = self.held();
        if held.total >= self.max_total {
            return Err(Full::Total(self.max_total));
        }
        if held.by_peer.get(&peer).copied().unwrap_or(0) >= self.max_per_peer {
            return Err(Full::Peer(self.max_per_peer));
        }
        Ok(())
    }

    /// Takes a place for `peer`, or says why there is none.
    pub(crate) fn take(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<PeerHold, Full> {
        let mut held = self.held();
        if held.total >= self.max_total {
            return Err(Full::Total(self.max_total));
        }
        let mine = held.by_peer.entry(peer).or_insert(0);
        if *mine >= self.max_per_peer {
            return Err(Full::Peer(self.max_per_peer));
        }
        *mine += 1;
        held.total += 1;
        Ok(PeerHold {
            counts: self.clone(),
            peer,
        })
    }

    /// Places held now.
    pub(crate) fn total(&self) -> usize {
        self.held().total
    }
}

impl Drop for PeerHold {
    fn drop(&mut self) {
        let mut held = self.counts.held();
        held.total -= 1;
        if let Some(mine) = held.by_peer.get_mut(&self.peer) {
            *mine -= 1;
            if *mine == 0 {
                held.by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_capped_in_total_and_per_peer_and_given_back() {
        let counts = PeerCounts::new(3, 2);
        let a: Option<IpAddr> = Some([10, 0, 0, 1].into());
        let b: Option<IpAddr> = Some([10, 0, 0, 2].into());
        let a1 = counts.take(a).expect("first of a");
        let _a2 = counts.take(a).expect("second of a");
        assert_eq!(counts.take(a).unwrap_err(), Full::Peer(2));
        let _b1 = counts.take(b).expect("first of b");
        assert_eq!(counts.room(b), Err(Full::Total(3)));
        assert_eq!(counts.take(None).unwrap_err(), Full::Total(3));
        drop(a1);
        assert_eq!(counts.total(), 2);
        assert!(counts.take(a).is_ok());
    }
}
