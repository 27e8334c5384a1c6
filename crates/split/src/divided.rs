//! A trunk divided over several servers ("hops"), each running a contiguous range of its
//! layers: the device relays each step's rows through the hops in order, so a model too large
//! for one server runs on several, at one extra round trip per hop.
//!
//! Each hop is a trunk session of its own, opened with [`SessionKeys::for_hop`]: the session's
//! secret and obfuscation with the hop's share of the policy. The first hop draws the session's
//! K1, the last its K2, and the boundaries between hops are fixed, so every hop's draw agrees
//! with the session's (both pick from the same keyed bytes). Rows pass between hops as the
//! previous hop encoded them (lossless with the f32 codec, so the output equals a single
//! trunk's bit for bit); the device checks every hop's downlink tag and tags the next hop's
//! uplink itself.

use std::ops::Range;

use crate::{SessionKeys, StepRows, Trunk, TrunkError};

/// One hop: its trunk session and the keys it was opened with.
pub struct Hop {
    /// The hop's trunk session (a remote trunk for a server).
    pub trunk: Box<dyn Trunk>,
    /// The keys of its session ([`SessionKeys::for_hop`]).
    pub keys: SessionKeys,
}

/// The session's trunk as a chain of hops; see the module documentation.
pub struct DividedTrunk {
    keys: SessionKeys,
    hops: Vec<Hop>,
}

impl std::fmt::Debug for DividedTrunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layers: Vec<_> = self.hops.iter().map(|hop| hop.trunk.layers()).collect();
        f.debug_struct("DividedTrunk")
            .field("hops", &layers)
            .finish()
    }
}

impl DividedTrunk {
    /// The session of `keys` over `hops`, in layer order; their layers must follow each other
    /// without a gap.
    pub fn new(keys: SessionKeys, hops: Vec<Hop>) -> Result<Self, TrunkError> {
        if hops.is_empty() {
            return Err(TrunkError::Policy(
                "a divided trunk needs at least one hop".into(),
            ));
        }
        for pair in hops.windows(2) {
            let (before, after) = (pair[0].trunk.layers(), pair[1].trunk.layers());
            if before.end != after.start {
                return Err(TrunkError::Policy(format!(
                    "the trunk's hops must follow each other: layers {before:?} then {after:?}"
                )));
            }
        }
        Ok(Self { keys, hops })
    }
}

impl Trunk for DividedTrunk {
    fn layers(&self) -> Range<usize> {
        let first = self.hops.first().map_or(0, |hop| hop.trunk.layers().start);
        let last = self.hops.last().map_or(0, |hop| hop.trunk.layers().end);
        first..last
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        let (step, rewind) = (message.step, message.rewind);
        let mut rows = message.rows.clone();
        for (index, hop) in self.hops.iter_mut().enumerate() {
            let uplink = hop.keys.uplink_rewinding(step, rewind, rows);
            let reply = hop.trunk.step(&uplink)?;
            if reply.step != step || !hop.keys.verifies_downlink(&reply) {
                return Err(TrunkError::Desync(format!(
                    "hop {} (layers {:?}) answered step {step} with a message that does not \
                     carry its session's tag",
                    index + 1,
                    hop.trunk.layers()
                )));
            }
            rows = reply.rows;
        }
        Ok(self.keys.downlink(step, rows))
    }
}

impl SessionKeys {
    /// The keys of the hop running `layers` of a divided trunk (`first` and `last` say whether
    /// it starts or ends the trunk): this session's secret and obfuscation, drawing K1 like
    /// this session on the first hop and K2 on the last, fixed at the hop's ends elsewhere.
    pub fn for_hop(
        &self,
        layers: Range<usize>,
        first: bool,
        last: bool,
    ) -> Result<SessionKeys, TrunkError> {
        let policy = &self.policy;
        let k1s = if first {
            policy.k1s().to_vec()
        } else {
            vec![layers.start]
        };
        let k2s = if last {
            policy.k2s().to_vec()
        } else {
            vec![layers.end]
        };
        let outside = k1s
            .iter()
            .chain(&k2s)
            .find(|&&k| k < layers.start || k > layers.end);
        if let Some(k) = outside {
            return Err(TrunkError::Policy(format!(
                "the hop running layers {layers:?} cannot serve a split point at layer {k} of \
                 the policy {policy}"
            )));
        }
        let hop = crate::SplitPolicy::random(&k1s, &k2s, policy.layers())
            .map_err(|e| TrunkError::Policy(format!("the hop running layers {layers:?}: {e}")))?;
        Ok(SessionKeys {
            policy: hop,
            obfuscation: self.obfuscation,
            secret: self.secret.clone(),
        })
    }
}
