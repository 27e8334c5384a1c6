//! The trunk as a training step sees it: a forward pass of rows, then the gradient of those
//! rows from the gradient of the trunk's output.

use lsplit_model::{DenseTrunk, TrunkActivations};

use candle_core::Tensor;

use crate::{Result, TrainError};

/// The trunk's side of a training step. Each [`TrainTrunk::backward`] answers the latest
/// [`TrainTrunk::forward`]; a trunk holds that pass's activations (within its budget) and no
/// more.
pub trait TrainTrunk {
    /// The trunk's output rows `(rows, hidden)` for input rows `(rows, hidden)`.
    fn forward(&mut self, rows: &Tensor) -> Result<Tensor>;
    /// The gradient of the loss with respect to the latest forward pass's input rows, from its
    /// gradient with respect to that pass's output rows.
    fn backward(&mut self, grad: &Tensor) -> Result<Tensor>;
}

/// The trunk in-process: [`DenseTrunk`] over the model's trunk layers.
#[derive(Debug)]
pub struct LocalTrainTrunk {
    trunk: DenseTrunk,
    saved: Option<TrunkActivations>,
}

impl LocalTrainTrunk {
    /// The trunk `trunk`, holding no activations yet.
    pub fn new(trunk: DenseTrunk) -> Self {
        Self { trunk, saved: None }
    }
}

impl TrainTrunk for LocalTrainTrunk {
    fn forward(&mut self, rows: &Tensor) -> Result<Tensor> {
        self.saved = None;
        let (out, saved) = self.trunk.forward(rows)?;
        self.saved = Some(saved);
        Ok(out)
    }

    fn backward(&mut self, grad: &Tensor) -> Result<Tensor> {
        let saved = self
            .saved
            .take()
            .ok_or_else(|| TrainError::Trunk("a backward pass without a forward pass".into()))?;
        Ok(self.trunk.backward(&saved, grad)?)
    }
}
