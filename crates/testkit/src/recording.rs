//! Real generations recorded row for row, then replayed against a trunk server: the devices
//! do no model work while replaying, so a benchmark's cores go to the servers, and every
//! downlink must be bit for bit the recorded one.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use lsplit_model::ModelPart;
use lsplit_split::{
    DeviceModel, GreedyRun, LocalTrunk, Obfuscation, SessionKeys, StepRows, Trunk, TrunkError,
};

/// One step of a recorded generation: what the device sent and what the trunk answered.
#[derive(Clone)]
struct Exchange {
    up: StepRows,
    down: StepRows,
}

/// A recorded generation: its session's keys, its prompt's prefill exchange and its decode
/// exchanges.
pub struct Recording {
    /// The keys the session ran under (a replay opens its session with them).
    pub keys: SessionKeys,
    exchanges: Vec<Exchange>,
}

/// An in-process trunk that records every exchange.
struct RecordingTrunk {
    inner: LocalTrunk,
    log: Arc<Mutex<Vec<Exchange>>>,
}

impl Trunk for RecordingTrunk {
    fn layers(&self) -> Range<usize> {
        self.inner.layers()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        let down = self.inner.step(message)?;
        self.log.lock().expect("log").push(Exchange {
            up: message.clone(),
            down: down.clone(),
        });
        Ok(down)
    }
}

impl Recording {
    /// The prefill exchange and then `decode_steps` decode exchanges of a real greedy
    /// generation from `prompt` (chat template applied), on the trunk `part` in-process.
    pub fn record(
        model: &DeviceModel,
        part: &Arc<ModelPart>,
        prompt: &str,
        decode_steps: usize,
    ) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        let keys = model.new_keys(Obfuscation::None).expect("keys");
        let trunk = RecordingTrunk {
            inner: LocalTrunk::new(part.clone(), &keys).expect("trunk"),
            log: log.clone(),
        };
        let prompt = model.prompt_tokens(prompt, false).expect("prompt");
        let session = model.session(Box::new(trunk), &keys).expect("session");
        // The last of decode_steps + 1 tokens is chosen from the last decode exchange.
        GreedyRun::generate(session, &prompt, decode_steps + 1).expect("generate");
        let exchanges = log.lock().expect("log").clone();
        assert_eq!(exchanges.len(), decode_steps + 1);
        Self { keys, exchanges }
    }

    /// Decode steps recorded.
    pub fn decode_steps(&self) -> usize {
        self.exchanges.len() - 1
    }

    /// Sends the prefill rows to `trunk`; fails unless the answer is the recorded one.
    pub fn prefill(&self, trunk: &mut dyn Trunk) -> Result<(), TrunkError> {
        self.exchange(trunk, 0)
    }

    /// Sends every decode step's rows to `trunk` after [`Recording::prefill`], calling
    /// `after_step` after each; fails unless every answer is the recorded one.
    pub fn decode(
        &self,
        trunk: &mut dyn Trunk,
        after_step: &mut dyn FnMut(),
    ) -> Result<(), TrunkError> {
        for step in 1..self.exchanges.len() {
            self.exchange(trunk, step)?;
            after_step();
        }
        Ok(())
    }

    fn exchange(&self, trunk: &mut dyn Trunk, step: usize) -> Result<(), TrunkError> {
        let exchange = &self.exchanges[step];
        let got = trunk.step(&exchange.up)?;
        assert!(
            got == exchange.down,
            "step {step} differs from the recorded generation's"
        );
        Ok(())
    }
}
