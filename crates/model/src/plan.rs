use std::fmt;
use std::ops::Range;

use crate::{ModelError, Result};

/// Where a model is cut: head = layers `[0, k1)`, trunk = `[k1, k2)`, tail = `[k2, L)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPlan {
    /// First layer of the trunk.
    pub k1: usize,
    /// First layer of the tail.
    pub k2: usize,
    /// Number of layers of the model, L.
    pub layers: usize,
}

impl SplitPlan {
    /// A three-way split at `k1:k2`, checked against the model's `layers`.
    pub fn new(k1: usize, k2: usize, layers: usize) -> Result<Self> {
        if k1 > k2 || k2 > layers {
            return Err(ModelError::InvalidSplit { k1, k2, layers });
        }
        Ok(Self { k1, k2, layers })
    }

    /// `n` local layers at each end, as in the original Λ-Split work: `k1 = n`, `k2 = L - n`.
    pub fn symmetric(n: usize, layers: usize) -> Result<Self> {
        match layers.checked_sub(n) {
            Some(k2) => Self::new(n, k2, layers),
            None => Err(ModelError::InvalidSplit {
                k1: n,
                k2: 0,
                layers,
            }),
        }
    }

    /// Parses `K1:K2` and checks it against the model's `layers`.
    pub fn parse(text: &str, layers: usize) -> Result<Self> {
        let invalid = || {
            ModelError::Config(format!(
                "split `{text}` is not of the form K1:K2 (this model has L = {layers} layers)"
            ))
        };
        let (a, b) = text.split_once(':').ok_or_else(invalid)?;
        let k1 = a.trim().parse().map_err(|_| invalid())?;
        let k2 = b.trim().parse().map_err(|_| invalid())?;
        Self::new(k1, k2, layers)
    }

    /// The part that runs on the device before the trunk.
    pub fn head(&self) -> PartSpec {
        PartSpec {
            kind: PartKind::Head,
            layers: 0..self.k1,
        }
    }

    /// The part that runs in the cloud.
    pub fn trunk(&self) -> PartSpec {
        PartSpec {
            kind: PartKind::Trunk,
            layers: self.k1..self.k2,
        }
    }

    /// The part that runs on the device after the trunk.
    pub fn tail(&self) -> PartSpec {
        PartSpec {
            kind: PartKind::Tail,
            layers: self.k2..self.layers,
        }
    }
}

impl fmt::Display for SplitPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.k1, self.k2)
    }
}

/// Which role a part plays; it decides whether it holds the embeddings and the LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PartKind {
    /// Token embeddings and the first layers.
    Head,
    /// Middle layers only.
    Trunk,
    /// Last layers, final norm and LM head.
    Tail,
    /// The unsplit model: embeddings, every layer, final norm and LM head.
    Whole,
}

impl PartKind {
    /// Lower-case name used in messages and output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Head => "head",
            Self::Trunk => "trunk",
            Self::Tail => "tail",
            Self::Whole => "whole",
        }
    }

    /// True when the part turns token ids into hidden rows.
    pub fn has_embeddings(self) -> bool {
        matches!(self, Self::Head | Self::Whole)
    }

    /// True when the part turns hidden rows into logits.
    pub fn has_output(self) -> bool {
        matches!(self, Self::Tail | Self::Whole)
    }
}

/// One part to load: its role and the decoder layers it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSpec {
    /// The part's role.
    pub kind: PartKind,
    /// The decoder layers it runs.
    pub layers: Range<usize>,
}

impl PartSpec {
    /// The whole, unsplit model of `layers` layers.
    pub fn whole(layers: usize) -> Self {
        Self {
            kind: PartKind::Whole,
            layers: 0..layers,
        }
    }
}
