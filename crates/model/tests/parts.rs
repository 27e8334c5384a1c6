//! Each part of a split reads only its own tensors (real SmolLM2-135M-Instruct, Q4_1 GGUF), and
//! split points are validated with exact messages.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::sync::OnceLock;

use candle_core::Device;
use candle_core::quantized::gguf_file::Content;
use lsplit_model::{ModelPart, ModelSource, PartKind, PartSpec, SplitPlan, TensorRecord};

/// The default model, fetched and opened once per test binary.
fn source() -> &'static ModelSource {
    static SOURCE: OnceLock<ModelSource> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let path = lsplit_fetch::ensure_default_model().expect("fetch the default model");
        ModelSource::open(&path).expect("open the default model")
    })
}

/// Every tensor of the GGUF file with the bytes candle's reader gives it once loaded, read
/// straight from the file (independently of `lsplit-model`).
fn gguf_sizes() -> &'static HashMap<String, (Vec<usize>, u64)> {
    static SIZES: OnceLock<HashMap<String, (Vec<usize>, u64)>> = OnceLock::new();
    SIZES.get_or_init(|| {
        let path = source().path();
        let mut reader = BufReader::new(File::open(path).expect("open model"));
        let content = Content::read(&mut reader).expect("read GGUF header");
        content
            .tensor_infos
            .keys()
            .map(|name| {
                let t = content
                    .tensor(&mut reader, name, &Device::Cpu)
                    .expect("read tensor");
                let shape = t.shape().dims().to_vec();
                (name.clone(), (shape, t.storage_size_in_bytes() as u64))
            })
            .collect()
    })
}

fn names(records: &[TensorRecord]) -> BTreeSet<String> {
    records.iter().map(|r| r.name.clone()).collect()
}

fn layer_names(layers: std::ops::Range<usize>) -> BTreeSet<String> {
    let kinds = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    layers
        .flat_map(|i| kinds.map(|k| format!("blk.{i}.{k}.weight")))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Loads `spec` and checks that what it reports holding is what `part_tensors` promised and
/// what the file holds for those names.
fn load_and_check(spec: &PartSpec) -> ModelPart {
    let promised = source().part_tensors(spec).expect("part tensors");
    let part = source().load_part(spec, &Device::Cpu).expect("load part");
    assert_eq!(part.tensors(), promised.as_slice(), "{spec:?}");
    assert_eq!(part.spec(), spec);
    let sizes = gguf_sizes();
    for r in part.tensors() {
        let (shape, bytes) = &sizes[&r.name];
        assert_eq!(&r.shape, shape, "{}", r.name);
        assert_eq!(r.bytes, *bytes, "{}", r.name);
        assert_eq!(r.params(), shape.iter().product::<usize>() as u64);
    }
    assert_eq!(
        names(part.tensors()).len(),
        part.tensors().len(),
        "no tensor is held twice"
    );
    part
}

fn params(records: &[TensorRecord]) -> u64 {
    records.iter().map(TensorRecord::params).sum()
}

fn bytes(records: &[TensorRecord]) -> u64 {
    records.iter().map(|r| r.bytes).sum()
}

#[test]
fn split_3_27_parts_hold_exactly_their_tensors() {
    let plan = SplitPlan::new(3, 27, 30).expect("valid split");
    assert_eq!(plan.to_string(), "3:27");

    let head = load_and_check(&plan.head());
    let mut expected = layer_names(0..3);
    expected.insert("token_embd.weight".into());
    assert_eq!(names(head.tensors()), expected);
    assert_eq!(head.tensors().len(), 28);

    let trunk = load_and_check(&plan.trunk());
    assert_eq!(names(trunk.tensors()), layer_names(3..27));
    assert_eq!(trunk.tensors().len(), 216);
    for name in ["token_embd.weight", "output.weight", "output_norm.weight"] {
        assert!(
            !names(trunk.tensors()).contains(name),
            "the trunk must not hold {name}"
        );
    }

    let tail = load_and_check(&plan.tail());
    let mut expected = layer_names(27..30);
    expected.extend(set(&["output_norm.weight", "token_embd.weight"]));
    assert_eq!(names(tail.tensors()), expected);
    assert_eq!(tail.tensors().len(), 29);

    // The tail cannot embed (the tied matrix is its LM head only), the head and trunk cannot
    // produce logits, and the trunk can do neither.
    assert_eq!(
        tail.embed(&[1]).expect_err("tail embeds").to_string(),
        "the tail part cannot embed tokens: it does not hold those weights"
    );
    assert_eq!(
        trunk.embed(&[1]).expect_err("trunk embeds").to_string(),
        "the trunk part cannot embed tokens: it does not hold those weights"
    );
    let row = head.embed(&[1]).expect("head embeds");
    assert_eq!(row.dims(), &[1, 576]);
    assert_eq!(
        head.logits(&row).expect_err("head logits").to_string(),
        "the head part cannot produce logits: it does not hold those weights"
    );

    // The parts' byte totals are those of the file's tensors, the tied matrix counted once in
    // the head and once in the tail.
    let sizes = gguf_sizes();
    let sum_of = |names: &BTreeSet<String>| names.iter().map(|n| sizes[n].1).sum::<u64>();
    assert_eq!(bytes(head.tensors()), sum_of(&names(head.tensors())));
    assert_eq!(bytes(trunk.tensors()), sum_of(&names(trunk.tensors())));
    assert_eq!(bytes(tail.tensors()), sum_of(&names(tail.tensors())));
    let all: u64 = sizes.values().map(|(_, b)| b).sum();
    let embd = sizes["token_embd.weight"].1;
    assert_eq!(
        bytes(head.tensors()) + bytes(trunk.tensors()) + bytes(tail.tensors()),
        all + embd
    );
}

#[test]
fn whole_model_holds_every_tensor_once() {
    let spec = PartSpec::whole(30);
    assert_eq!(spec.kind, PartKind::Whole);
    let whole = load_and_check(&spec);
    let sizes = gguf_sizes();
    assert_eq!(sizes.len(), 272, "SmolLM2 GGUF: 30 x 9 layer tensors + 2");
    assert_eq!(whole.tensors().len(), 272);
    assert_eq!(
        names(whole.tensors()),
        sizes.keys().cloned().collect::<BTreeSet<_>>()
    );
    assert!(!sizes.contains_key("output.weight"), "tied embeddings");
    assert!(source().config().tied_embeddings);

    // 49152 x 576 embeddings + 30 x 3,540,096 per layer + 576 final norm.
    assert_eq!(params(whole.tensors()), 134_515_008);
    let sum_params: u64 = sizes
        .values()
        .map(|(s, _)| s.iter().product::<usize>() as u64)
        .sum();
    assert_eq!(params(whole.tensors()), sum_params);
    let sum_bytes: u64 = sizes.values().map(|(_, b)| b).sum();
    assert_eq!(bytes(whole.tensors()), sum_bytes);
    let file_len = std::fs::metadata(source().path()).expect("stat").len();
    assert!(
        sum_bytes < file_len && file_len - sum_bytes < 8 << 20,
        "tensor data ({sum_bytes} B) is all of the file ({file_len} B) but the header"
    );
    let dtypes: BTreeSet<&str> = whole.tensors().iter().map(|r| r.dtype.as_str()).collect();
    assert!(dtypes.contains("q4_1"), "{dtypes:?}");
}

#[test]
fn every_split_loads_disjoint_layers() {
    // For several splits, the three parts together hold each layer tensor exactly once.
    for (k1, k2) in [(0, 0), (0, 30), (30, 30), (1, 29), (15, 15), (29, 30)] {
        let plan = SplitPlan::new(k1, k2, 30).expect("valid split");
        let mut seen = BTreeSet::new();
        for spec in [plan.head(), plan.trunk(), plan.tail()] {
            for r in source().part_tensors(&spec).expect("part tensors") {
                if r.name.starts_with("blk.") {
                    assert!(seen.insert(r.name.clone()), "{k1}:{k2}: {} twice", r.name);
                }
            }
        }
        assert_eq!(seen, layer_names(0..30), "{k1}:{k2}");
        let head = source().part_tensors(&plan.head()).expect("head");
        let tail = source().part_tensors(&plan.tail()).expect("tail");
        assert_eq!(head.len(), 1 + 9 * k1, "{k1}:{k2}");
        assert_eq!(tail.len(), 2 + 9 * (30 - k2), "{k1}:{k2}");
    }
}

#[test]
fn invalid_splits_are_refused_with_exact_messages() {
    let layers = source().config().num_layers;
    assert_eq!(layers, 30);
    let cases: [(Result<SplitPlan, _>, &str); 5] = [
        (
            SplitPlan::new(5, 3, layers),
            "invalid split 5:3: need 0 <= K1 <= K2 <= L, and this model has L = 30 layers",
        ),
        (
            SplitPlan::new(0, 31, layers),
            "invalid split 0:31: need 0 <= K1 <= K2 <= L, and this model has L = 30 layers",
        ),
        (
            SplitPlan::new(31, 31, layers),
            "invalid split 31:31: need 0 <= K1 <= K2 <= L, and this model has L = 30 layers",
        ),
        (
            SplitPlan::symmetric(16, layers),
            "invalid split 16:14: need 0 <= K1 <= K2 <= L, and this model has L = 30 layers",
        ),
        (
            SplitPlan::parse("7:3", layers),
            "invalid split 7:3: need 0 <= K1 <= K2 <= L, and this model has L = 30 layers",
        ),
    ];
    for (result, message) in cases {
        assert_eq!(result.expect_err(message).to_string(), message);
    }
    for text in ["abc", "3", "3:x", "-1:4", ""] {
        assert_eq!(
            SplitPlan::parse(text, layers).expect_err(text).to_string(),
            format!(
                "model configuration: split `{text}` is not of the form K1:K2 (this model has L = 30 layers)"
            )
        );
    }
    assert_eq!(
        SplitPlan::parse(" 3 : 27 ", layers).expect("spaces"),
        SplitPlan::new(3, 27, layers).expect("3:27")
    );
    assert_eq!(
        SplitPlan::symmetric(15, layers).expect("15:15"),
        SplitPlan {
            k1: 15,
            k2: 15,
            layers: 30
        }
    );

    // A part spec beyond the model's layers is refused before anything is read.
    let spec = PartSpec {
        kind: PartKind::Trunk,
        layers: 28..31,
    };
    let message = "invalid split 28:31: need 0 <= K1 <= K2 <= L, and this model has L = 30 layers";
    assert_eq!(
        source()
            .part_tensors(&spec)
            .expect_err("too many layers")
            .to_string(),
        message
    );
    assert_eq!(
        source()
            .load_part(&spec, &Device::Cpu)
            .expect_err("too many layers")
            .to_string(),
        message
    );
}
