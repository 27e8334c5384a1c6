//! A profile reads by name: a forward pass enters the spans `embed`, then `layer` (with its
//! index), `attention` and `mlp` for each layer, then `lm_head`, in that order.

use std::fmt::{Debug, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::Device;
use lsplit_model::{ModelSource, PartSpec};
use tracing::field::Field;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// A subscriber that records the name (and fields) of every span of `lsplit_model` entered.
#[derive(Clone, Default)]
struct Recorder {
    /// The names of the spans made so far; span `i`'s id is `i + 1`.
    names: Arc<Mutex<Vec<String>>>,
    entered: Arc<Mutex<Vec<String>>>,
}

impl Subscriber for Recorder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("lsplit_model")
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut name = span.metadata().name().to_string();
        span.record(&mut |_: &Field, value: &dyn Debug| {
            write!(name, " {value:?}").expect("write to a string");
        });
        let mut names = self.names.lock().expect("names");
        names.push(name);
        Id::from_u64(names.len() as u64)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, span: &Id) {
        let name = self.names.lock().expect("names")[span.into_u64() as usize - 1].clone();
        self.entered.lock().expect("entered").push(name);
    }

    fn exit(&self, _: &Id) {}
}

#[test]
fn a_forward_pass_enters_a_span_per_op_by_name() {
    let recorder = Recorder::default();
    tracing::subscriber::with_default(recorder.clone(), || {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-llama-hf");
        let source = ModelSource::open(&path).expect("open the tiny model");
        let layers = source.config().num_layers;
        let part = source
            .load_part(&PartSpec::whole(layers), &Device::Cpu)
            .expect("load the whole model");
        let mut cache = part.new_cache();
        let hidden = part.embed(&[1, 17, 42]).expect("embed");
        let hidden = part.forward(&hidden, 0, &mut cache).expect("forward");
        part.logits(&hidden).expect("logits");
    });
    let mut expected = vec!["embed".to_string()];
    for index in 0..4 {
        expected.extend([format!("layer {index}"), "attention".into(), "mlp".into()]);
    }
    expected.push("lm_head".into());
    assert_eq!(*recorder.entered.lock().expect("entered"), expected);
}
