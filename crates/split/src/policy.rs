//! Split policies: which split points a step may draw, how rows are disguised on the wire, and
//! the schedule both ends derive from the session secret.

use std::fmt;
use std::ops::Range;

use candle_core::{Device, Tensor};
use hmac::{Hmac, Mac};
use lsplit_model::SplitPlan;
use lsplit_wire::HiddenRows;
use sha2::Sha256;

use crate::StepRows;
use crate::secret::{SessionSecret, hmac_sha256, keyed_mac};

/// Errors in a split policy's description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A set of split points is empty.
    #[error("--{0} needs at least one layer")]
    Empty(&'static str),
    /// A split point past the model's last layer.
    #[error("--{name} {value} is past this model's L = {layers} layers")]
    PastEnd {
        /// `k1` or `k2`.
        name: &'static str,
        /// The value.
        value: usize,
        /// Layers of the model.
        layers: usize,
    },
    /// Some K1 is not below every K2: a step could leave the trunk no layer.
    #[error("every K1 must be below every K2, but K1 = {k1} and K2 = {k2}")]
    Overlap {
        /// The largest K1.
        k1: usize,
        /// The smallest K2.
        k2: usize,
    },
    /// A list that does not parse.
    #[error("--{name} `{text}` is not a comma-separated list of layers")]
    Parse {
        /// `k1` or `k2`.
        name: &'static str,
        /// The text given.
        text: String,
    },
    /// An obfuscation name that is not known.
    #[error("unknown obfuscation `{0}`: expected none or permute")]
    UnknownObfuscation(String),
}

/// The split points each step of a keyed session may use: one of `k1s` and one of `k2s`,
/// drawn afresh for every step (a fixed split is one value of each).
///
/// Every K1 is below every K2, so each layer is shared by at most two parts and the trunk always
/// runs at least one layer (except in a fixed split that gives it none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPolicy {
    k1s: Vec<usize>,
    k2s: Vec<usize>,
    layers: usize,
}

impl SplitPolicy {
    /// Draws among `k1s` and `k2s` for a model of `layers` layers (duplicates are merged).
    pub fn random(k1s: &[usize], k2s: &[usize], layers: usize) -> Result<Self, PolicyError> {
        let set = |values: &[usize], name| -> Result<Vec<usize>, PolicyError> {
            let mut values = values.to_vec();
            values.sort_unstable();
            values.dedup();
            match values.last() {
                None => Err(PolicyError::Empty(name)),
                Some(&value) if value > layers => Err(PolicyError::PastEnd {
                    name,
                    value,
                    layers,
                }),
                Some(_) => Ok(values),
            }
        };
        let (k1s, k2s) = (set(k1s, "k1")?, set(k2s, "k2")?);
        let (k1, k2) = (k1s[k1s.len() - 1], k2s[0]);
        // A fixed split may leave the trunk no layer (`--split 15:15`): nothing is ever shared.
        let fixed = k1s.len() == 1 && k2s.len() == 1;
        if k1 > k2 || (k1 == k2 && !fixed) {
            return Err(PolicyError::Overlap { k1, k2 });
        }
        Ok(Self { k1s, k2s, layers })
    }

    /// Always the split points of `plan` (which may give the trunk no layer).
    pub fn fixed(plan: SplitPlan) -> Self {
        Self {
            k1s: vec![plan.k1],
            k2s: vec![plan.k2],
            layers: plan.layers,
        }
    }

    /// Parses `--k1` and `--k2` lists such as `1,2,3,4`.
    pub fn parse(k1s: &str, k2s: &str, layers: usize) -> Result<Self, PolicyError> {
        let list = |text: &str, name| {
            text.split(',')
                .map(|v| v.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| PolicyError::Parse {
                    name,
                    text: text.to_string(),
                })
        };
        Self::random(&list(k1s, "k1")?, &list(k2s, "k2")?, layers)
    }

    /// The values K1 may take, ascending.
    pub fn k1s(&self) -> &[usize] {
        &self.k1s
    }

    /// The values K2 may take, ascending.
    pub fn k2s(&self) -> &[usize] {
        &self.k2s
    }

    /// Layers of the model.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// True when every step uses the same split points.
    pub fn is_fixed(&self) -> bool {
        self.k1s.len() == 1 && self.k2s.len() == 1
    }

    /// Layers the head must hold: those of the deepest K1.
    pub fn head_layers(&self) -> Range<usize> {
        0..self.k1s[self.k1s.len() - 1]
    }

    /// Layers the trunk must hold: the union of every draw's.
    pub fn trunk_layers(&self) -> Range<usize> {
        self.k1s[0]..self.k2s[self.k2s.len() - 1]
    }

    /// Layers the tail must hold: those of the shallowest K2.
    pub fn tail_layers(&self) -> Range<usize> {
        self.k2s[0]..self.layers
    }
}

impl fmt::Display for SplitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[usize]| {
            v.iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        if self.is_fixed() {
            write!(f, "fixed {}:{}", self.k1s[0], self.k2s[0])
        } else {
            write!(
                f,
                "random K1 {{{}}} K2 {{{}}}",
                list(&self.k1s),
                list(&self.k2s)
            )
        }
    }
}

/// How hidden rows are disguised on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Obfuscation {
    /// Rows travel as computed.
    #[default]
    None,
    /// A secret per-session permutation of the hidden dimension, undone on the other side.
    Permute,
}

impl Obfuscation {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Permute => "permute",
        }
    }
}

impl fmt::Display for Obfuscation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Obfuscation {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::None, Self::Permute]
            .into_iter()
            .find(|o| o.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| PolicyError::UnknownObfuscation(s.to_string()))
    }
}

/// What both ends of a split session agree on when it opens, inside the encrypted channel.
///
/// Every split session has keys, a fixed split's as much as a random one's: a fixed policy
/// draws the same split points at every step, but its messages are tagged under a fresh
/// secret like any other, so the device, the trunk and the protocol have one kind of session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// The split points steps draw from.
    pub policy: SplitPolicy,
    /// How rows are disguised on the wire.
    pub obfuscation: Obfuscation,
    /// The secret every draw, tag and permutation derives from.
    pub secret: SessionSecret,
}

impl SessionKeys {
    /// Keys for a new session of `policy`, with a fresh secret: no two sessions share draws,
    /// tags or permutation.
    pub fn fresh(policy: SplitPolicy, obfuscation: Obfuscation) -> Self {
        Self {
            policy,
            obfuscation,
            secret: SessionSecret::generate(),
        }
    }

    /// The uplink message of step `step` carrying `rows` as they are (not disguised), tagged
    /// as a device's head tags it: for tools and tests that drive a trunk without a head.
    pub fn uplink(&self, step: u64, rows: HiddenRows) -> StepRows {
        self.uplink_rewinding(step, 0, rows)
    }

    /// [`SessionKeys::uplink`] for a step that first forgets the last `rewind` positions.
    pub fn uplink_rewinding(&self, step: u64, rewind: usize, rows: HiddenRows) -> StepRows {
        let tag = Schedule::tags_only(self).tag(Direction::Up, step, rewind, &rows);
        StepRows {
            step,
            rows,
            rewind,
            tag,
        }
    }

    /// Whether `message` carries the tag a trunk of this session gives its downlink.
    pub fn verifies_downlink(&self, message: &StepRows) -> bool {
        let rows = &message.rows;
        Schedule::tags_only(self).verify(Direction::Down, message.step, 0, rows, &message.tag)
    }

    /// The downlink message of step `step` carrying `rows`, tagged as a trunk tags it: what a
    /// server holding the keys can send, for tests of a device facing a hostile server.
    pub fn downlink(&self, step: u64, rows: HiddenRows) -> StepRows {
        let tag = Schedule::tags_only(self).tag(Direction::Down, step, 0, &rows);
        StepRows {
            step,
            rows,
            rewind: 0,
            tag,
        }
    }
}

/// The split points of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Draw {
    pub(crate) k1: usize,
    pub(crate) k2: usize,
}

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Device to trunk.
    Up,
    /// Trunk to device.
    Down,
}

/// Everything a side derives from [`SessionKeys`]: each step's draw, the tags of messages and
/// the permutation of the hidden dimension.
pub(crate) struct Schedule {
    policy: SplitPolicy,
    draw_key: [u8; 32],
    tag_key: [u8; 32],
    /// The permutation (`wire[:, i] = hidden[:, forward[i]]`) and its inverse.
    permutation: Option<(Tensor, Tensor)>,
}

impl Schedule {
    /// The schedule of `keys` for rows `width` values wide, on `device`.
    pub(crate) fn new(
        keys: &SessionKeys,
        width: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let permutation = match keys.obfuscation {
            Obfuscation::None => None,
            Obfuscation::Permute => {
                let forward = permutation(&keys.secret.key("permute"), width);
                let mut inverse = vec![0u32; width];
                for (i, &p) in forward.iter().enumerate() {
                    inverse[p as usize] = i as u32;
                }
                Some((Tensor::new(forward, device)?, Tensor::new(inverse, device)?))
            }
        };
        Ok(Self {
            permutation,
            ..Self::tags_only(keys)
        })
    }

    /// The draws and tags of `keys`, without the permutation.
    fn tags_only(keys: &SessionKeys) -> Self {
        Self {
            policy: keys.policy.clone(),
            draw_key: keys.secret.key("draw"),
            tag_key: keys.secret.key("tag"),
            permutation: None,
        }
    }

    /// The policy drawn from.
    pub(crate) fn policy(&self) -> &SplitPolicy {
        &self.policy
    }

    /// The split points of step `step`.
    pub(crate) fn draw(&self, step: u64) -> Draw {
        let bytes = hmac_sha256(&self.draw_key, &[&step.to_le_bytes()]);
        let pick = |values: &[usize], at: usize| {
            let word = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
            values[(word % values.len() as u64) as usize]
        };
        Draw {
            k1: pick(&self.policy.k1s, 0),
            k2: pick(&self.policy.k2s, 8),
        }
    }

    /// The tag of a message: HMAC of its direction, step, the step's split points, its rewind
    /// and the rows' position, count, width and codec, truncated to 16 bytes.
    pub(crate) fn tag(
        &self,
        direction: Direction,
        step: u64,
        rewind: usize,
        rows: &HiddenRows,
    ) -> [u8; 16] {
        let mac = self
            .tag_mac(direction, step, rewind, rows)
            .finalize()
            .into_bytes();
        mac[..16].try_into().expect("16 bytes")
    }

    /// Whether `tag` is the tag of a message (see [`Schedule::tag`]), compared in constant
    /// time so that its timing tells a forger nothing about how many bytes matched.
    pub(crate) fn verify(
        &self,
        direction: Direction,
        step: u64,
        rewind: usize,
        rows: &HiddenRows,
        tag: &[u8; 16],
    ) -> bool {
        self.tag_mac(direction, step, rewind, rows)
            .verify_truncated_left(tag)
            .is_ok()
    }

    /// The HMAC of a message's tag, before truncation.
    fn tag_mac(
        &self,
        direction: Direction,
        step: u64,
        rewind: usize,
        rows: &HiddenRows,
    ) -> Hmac<Sha256> {
        let draw = self.draw(step);
        let direction: &[u8] = match direction {
            Direction::Up => b"up",
            Direction::Down => b"down",
        };
        keyed_mac(
            &self.tag_key,
            &[
                direction,
                &step.to_le_bytes(),
                &(draw.k1 as u64).to_le_bytes(),
                &(draw.k2 as u64).to_le_bytes(),
                &(rewind as u64).to_le_bytes(),
                &(rows.start as u64).to_le_bytes(),
                &(rows.rows as u64).to_le_bytes(),
                &(rows.width as u64).to_le_bytes(),
                rows.codec.name().as_bytes(),
            ],
        )
    }

    /// Rows as they go on the wire: permuted when the session permutes.
    pub(crate) fn disguise(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        match &self.permutation {
            Some((forward, _)) => hidden.index_select(forward, 1),
            None => Ok(hidden.clone()),
        }
    }

    /// Rows as computed, from rows off the wire.
    pub(crate) fn reveal(&self, wire: &Tensor) -> candle_core::Result<Tensor> {
        match &self.permutation {
            Some((_, inverse)) => wire.index_select(inverse, 1),
            None => Ok(wire.clone()),
        }
    }
}

/// A permutation of `0..width` from a keyed stream (Fisher-Yates over HMAC counter blocks).
fn permutation(key: &[u8; 32], width: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..width as u32).collect();
    for i in (1..width).rev() {
        let block = hmac_sha256(key, &[&(i as u64).to_le_bytes()]);
        let word = u64::from_le_bytes(block[..8].try_into().expect("8 bytes"));
        order.swap(i, (word % (i as u64 + 1)) as usize);
    }
    order
}

#[cfg(test)]
mod tests {
    use candle_core::DType;
    use lsplit_wire::Codec;

    use super::*;

    fn keys(obfuscation: Obfuscation) -> SessionKeys {
        SessionKeys {
            policy: SplitPolicy::random(&[1, 2, 3, 4], &[26, 27, 28, 29], 30).expect("policy"),
            obfuscation,
            secret: SessionSecret::from_bytes([7; 32]),
        }
    }

    #[test]
    fn policies_are_checked() {
        let p = SplitPolicy::parse("4, 2,1,3,2", "29,26,27,28", 30).expect("parse");
        assert_eq!(p.k1s(), &[1, 2, 3, 4]);
        assert_eq!(p.k2s(), &[26, 27, 28, 29]);
        assert_eq!(
            (p.head_layers(), p.trunk_layers(), p.tail_layers()),
            (0..4, 1..29, 26..30)
        );
        assert_eq!(p.to_string(), "random K1 {1,2,3,4} K2 {26,27,28,29}");
        let fixed = SplitPolicy::fixed(SplitPlan::new(2, 28, 30).expect("plan"));
        assert!(fixed.is_fixed());
        assert_eq!(fixed.to_string(), "fixed 2:28");
        for (k1, k2, message) in [
            (
                "1,5",
                "5,6",
                "every K1 must be below every K2, but K1 = 5 and K2 = 5",
            ),
            ("1", "31", "--k2 31 is past this model's L = 30 layers"),
            (
                "1,x",
                "3",
                "--k1 `1,x` is not a comma-separated list of layers",
            ),
            ("", "3", "--k1 `` is not a comma-separated list of layers"),
        ] {
            assert_eq!(
                SplitPolicy::parse(k1, k2, 30).expect_err(k1).to_string(),
                message
            );
        }
        assert_eq!(
            SplitPolicy::random(&[], &[3], 30)
                .expect_err("empty")
                .to_string(),
            "--k1 needs at least one layer"
        );
    }

    #[test]
    fn draws_cover_the_policy_and_depend_on_the_secret() -> candle_core::Result<()> {
        let a = Schedule::new(&keys(Obfuscation::None), 8, &Device::Cpu)?;
        let mut other = keys(Obfuscation::None);
        other.secret = SessionSecret::from_bytes([8; 32]);
        let b = Schedule::new(&other, 8, &Device::Cpu)?;
        let draws: Vec<Draw> = (0..400).map(|s| a.draw(s)).collect();
        for k in 1..=4 {
            let count = draws.iter().filter(|d| d.k1 == k).count();
            assert!((60..140).contains(&count), "k1 = {k} drawn {count} times");
            let count = draws.iter().filter(|d| d.k2 == 25 + k).count();
            assert!(
                (60..140).contains(&count),
                "k2 = {} drawn {count} times",
                25 + k
            );
        }
        let other_draws: Vec<Draw> = (0..400).map(|s| b.draw(s)).collect();
        assert_ne!(draws, other_draws);
        Ok(())
    }

    #[test]
    fn tags_bind_direction_step_rewind_and_rows() -> candle_core::Result<()> {
        let s = Schedule::new(&keys(Obfuscation::None), 4, &Device::Cpu)?;
        let rows = Codec::F32
            .encode(&Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?, 3)
            .expect("encode");
        let tag = s.tag(Direction::Up, 5, 0, &rows);
        assert_eq!(tag, s.tag(Direction::Up, 5, 0, &rows));
        assert_ne!(tag, s.tag(Direction::Down, 5, 0, &rows));
        assert_ne!(tag, s.tag(Direction::Up, 6, 0, &rows));
        assert_ne!(tag, s.tag(Direction::Up, 5, 1, &rows));
        let mut moved = rows.clone();
        moved.start = 4;
        assert_ne!(tag, s.tag(Direction::Up, 5, 0, &moved));
        assert!(s.verify(Direction::Up, 5, 0, &rows, &tag));
        assert!(!s.verify(Direction::Down, 5, 0, &rows, &tag));
        assert!(!s.verify(Direction::Up, 5, 1, &rows, &tag));
        assert!(!s.verify(Direction::Up, 5, 0, &moved, &tag));
        let mut forged = tag;
        forged[15] ^= 1;
        assert!(!s.verify(Direction::Up, 5, 0, &rows, &forged));
        Ok(())
    }

    #[test]
    fn permutation_round_trips_and_moves_values() -> candle_core::Result<()> {
        let s = Schedule::new(&keys(Obfuscation::Permute), 576, &Device::Cpu)?;
        let values: Vec<f32> = (0..2 * 576).map(|v| v as f32).collect();
        let hidden = Tensor::from_vec(values.clone(), (2, 576), &Device::Cpu)?;
        let wire = s.disguise(&hidden)?;
        let wire_values: Vec<f32> = wire.flatten_all()?.to_vec1()?;
        let moved = wire_values
            .iter()
            .zip(&values)
            .filter(|(a, b)| a != b)
            .count();
        assert!(moved > 1100, "only {moved} values moved");
        let mut sorted = wire_values[..576].to_vec();
        sorted.sort_by(f32::total_cmp);
        assert_eq!(
            sorted,
            values[..576],
            "a permutation keeps every value of a row"
        );
        let back: Vec<f32> = s.reveal(&wire)?.flatten_all()?.to_vec1()?;
        assert_eq!(back, values);
        assert_eq!(permutation(&[1; 32], 576), permutation(&[1; 32], 576));
        assert_ne!(permutation(&[1; 32], 576), permutation(&[2; 32], 576));
        let plain = Schedule::new(&keys(Obfuscation::None), 576, &Device::Cpu)?;
        assert_eq!(
            plain.disguise(&hidden)?.to_vec2::<f32>()?,
            hidden.to_vec2::<f32>()?
        );
        Ok(())
    }
}
