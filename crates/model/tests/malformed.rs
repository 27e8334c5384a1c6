//! Bad input never panics: broken files and directories, and misuse of a loaded part, all come
//! back as errors whose message says what is wrong.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};
use common::{CONTEXT, GgufModel, HEAD_DIM, HIDDEN, KV_HEADS, LAYERS, VOCAB, qtensor};
use lsplit_model::{ModelError, ModelPart, ModelSource, PartKind, PartSpec, SplitPlan};

const UNSUPPORTED: &str = "lambda-split runs Llama-family decoders (llama, mistral)";

fn hf_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-llama-hf")
}

/// Opens `path`, which must fail; returns the message.
fn open_err(path: &Path) -> String {
    ModelSource::open(path)
        .expect_err("opening must fail")
        .to_string()
}

fn write_bytes(path: &Path, bytes: &[u8]) {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(bytes))
        .expect("write file");
}

/// A valid synthetic model written to `dir/name` after `edit`.
fn synthetic(dir: &Path, name: &str, edit: impl FnOnce(&mut GgufModel)) -> PathBuf {
    let mut model = GgufModel::new(GgmlDType::Q8_0, false, 99);
    edit(&mut model);
    let path = dir.join(name);
    model.write(&path);
    path
}

fn load(source: &ModelSource, spec: &PartSpec) -> Result<ModelPart, ModelError> {
    source.load_part(spec, &Device::Cpu)
}

#[test]
fn missing_empty_and_garbage_files_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");

    let missing = dir.path().join("no-such-model.gguf");
    assert_eq!(
        open_err(&missing),
        format!(
            "{}: No such file or directory (os error 2)",
            missing.display()
        )
    );

    let empty = dir.path().join("empty.gguf");
    write_bytes(&empty, b"");
    let prefix = format!("{}: malformed GGUF file: ", empty.display());
    let err = open_err(&empty);
    assert!(err.starts_with(&prefix), "{err}");

    let garbage = dir.path().join("garbage.gguf");
    write_bytes(&garbage, b"this is not a GGUF file, just some text");
    let err = open_err(&garbage);
    let expected = format!(
        "{}: malformed GGUF file: unknown magic 0x73696874",
        garbage.display()
    );
    assert!(err.starts_with(&expected), "{err}");

    // Random bytes behind a valid magic: counts and lengths that do not fit the file.
    let mut rng = common::Rng::new(7);
    for len in [4usize, 8, 24, 100, 4096] {
        let mut bytes = b"GGUF\x03\x00\x00\x00".to_vec();
        bytes.extend((0..len).map(|_| rng.next_u64() as u8));
        let path = dir.path().join(format!("random-{len}.gguf"));
        write_bytes(&path, &bytes);
        let err = open_err(&path);
        assert!(
            err.starts_with(&format!("{}: malformed GGUF file: ", path.display())),
            "{err}"
        );
    }
}

#[test]
fn truncated_files_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let full = synthetic(dir.path(), "full.gguf", |_| {});
    let bytes = std::fs::read(&full).expect("read");

    // Cut inside the header: opening fails.
    let header_cut = dir.path().join("header-cut.gguf");
    write_bytes(&header_cut, &bytes[..200]);
    let err = open_err(&header_cut);
    assert!(
        err.starts_with(&format!("{}: malformed GGUF file: ", header_cut.display())),
        "{err}"
    );

    // Header intact, tensor data cut in the middle: opening reads only headers and works;
    // a part whose tensors all lie before the cut loads, one that needs missing data fails
    // naming the tensor it could not read.
    let data_cut = dir.path().join("data-cut.gguf");
    write_bytes(&data_cut, &bytes[..bytes.len() / 2]);
    let source = ModelSource::open(&data_cut).expect("the header is intact");
    let head = SplitPlan::new(1, 1, LAYERS).expect("plan").head();
    load(&source, &head).expect("the head's tensors lie before the cut");
    let err = load(&source, &PartSpec::whole(LAYERS))
        .expect_err("the data is cut")
        .to_string();
    let prefix = format!("{}: malformed GGUF file: reading `", data_cut.display());
    assert!(err.starts_with(&prefix), "{err}");
    assert!(err.contains("only"), "says how much is left: {err}");
    let tail = SplitPlan::new(LAYERS, LAYERS, LAYERS).expect("plan").tail();
    let err = load(&source, &tail)
        .expect_err("output.weight is written last")
        .to_string();
    assert!(
        err.starts_with(&format!("{prefix}output_norm.weight`: "))
            || err.starts_with(&format!("{prefix}output.weight`: ")),
        "{err}"
    );
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = synthetic(dir.path(), "qwen2.gguf", |m| {
        m.set_metadata("general.architecture", Value::String("qwen2".into()))
    });
    assert_eq!(
        open_err(&path),
        format!("unsupported architecture `qwen2`: {UNSUPPORTED}")
    );

    let path = synthetic(dir.path(), "number.gguf", |m| {
        m.set_metadata("general.architecture", Value::U32(7))
    });
    assert_eq!(
        open_err(&path),
        "model configuration: `general.architecture` is not a string"
    );

    // `mistral` is a Llama-family name: its keys are read under `mistral.*`.
    let path = synthetic(dir.path(), "mistral.gguf", |m| {
        m.set_metadata("general.architecture", Value::String("mistral".into()))
    });
    assert_eq!(
        open_err(&path),
        "model configuration: GGUF metadata key `mistral.embedding_length` is missing"
    );
}

#[test]
fn bad_metadata_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = synthetic(dir.path(), "no-blocks.gguf", |m| {
        m.metadata.retain(|(k, _)| k != "llama.block_count")
    });
    assert_eq!(
        open_err(&path),
        "model configuration: GGUF metadata key `llama.block_count` is missing"
    );

    let path = synthetic(dir.path(), "string-heads.gguf", |m| {
        m.set_metadata("llama.attention.head_count", Value::String("4".into()))
    });
    assert_eq!(
        open_err(&path),
        "model configuration: GGUF metadata key `llama.attention.head_count` should be an \
         integer, found String"
    );

    let path = synthetic(dir.path(), "bad-gqa.gguf", |m| {
        m.set_metadata("llama.attention.head_count_kv", Value::U32(3))
    });
    assert_eq!(
        open_err(&path),
        "model configuration: 4 attention heads cannot be grouped over 3 key/value heads"
    );

    let path = synthetic(dir.path(), "zero-heads.gguf", |m| {
        m.set_metadata("llama.attention.head_count", Value::U32(0))
    });
    assert_eq!(
        open_err(&path),
        "model configuration: hidden size and head counts must be positive"
    );

    let path = synthetic(dir.path(), "yarn.gguf", |m| {
        m.set_metadata("llama.rope.scaling.type", Value::String("yarn".into()))
    });
    assert_eq!(
        open_err(&path),
        "model configuration: unsupported RoPE scaling type `yarn`"
    );

    let path = synthetic(dir.path(), "linear-no-factor.gguf", |m| {
        m.set_metadata("llama.rope.scaling.type", Value::String("linear".into()))
    });
    assert_eq!(
        open_err(&path),
        "model configuration: GGUF metadata key `llama.rope.scaling.factor` is missing"
    );

    let path = synthetic(dir.path(), "no-vocab.gguf", |m| {
        m.metadata.retain(|(k, _)| k != "llama.vocab_size")
    });
    assert_eq!(
        open_err(&path),
        "model configuration: vocabulary, context length and feed-forward size must be positive"
    );
}

#[test]
fn missing_tensor_is_named_only_by_parts_that_need_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = synthetic(dir.path(), "missing.gguf", |m| {
        m.remove_tensor("blk.2.ffn_up.weight")
    });
    let source = ModelSource::open(&path).expect("headers are fine");
    let message = "tensor `blk.2.ffn_up.weight` is missing from the model files";
    let plan = SplitPlan::new(2, 3, LAYERS).expect("plan");
    for spec in [PartSpec::whole(LAYERS), plan.trunk()] {
        assert_eq!(
            source.part_tensors(&spec).expect_err("missing").to_string(),
            message
        );
        assert_eq!(
            load(&source, &spec).expect_err("missing").to_string(),
            message
        );
    }
    // The head (layers 0-1) and the tail (layer 3) do not need it.
    load(&source, &plan.head()).expect("head loads");
    load(&source, &plan.tail()).expect("tail loads");

    // An untied model without output.weight is simply tied; without embeddings, only the
    // parts that hold them fail.
    let path = synthetic(dir.path(), "no-embd.gguf", |m| {
        m.remove_tensor("token_embd.weight")
    });
    let source = ModelSource::open(&path).expect("headers are fine");
    let message = "tensor `token_embd.weight` is missing from the model files";
    assert_eq!(
        load(&source, &plan.head())
            .expect_err("missing")
            .to_string(),
        message
    );
    load(&source, &plan.trunk()).expect("trunk loads");
    load(&source, &plan.tail()).expect("untied tail loads");
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = synthetic(dir.path(), "shape.gguf", |m| {
        m.set_tensor(
            "blk.1.attn_k.weight",
            qtensor(
                vec![0.0; HIDDEN * HIDDEN],
                &[HIDDEN, HIDDEN],
                GgmlDType::Q8_0,
            ),
        )
    });
    let source = ModelSource::open(&path).expect("headers are fine");
    let message = format!(
        "tensor `blk.1.attn_k.weight` has shape [{HIDDEN}, {HIDDEN}], expected [{}, {HIDDEN}]",
        KV_HEADS * HEAD_DIM
    );
    assert_eq!(
        message,
        "tensor `blk.1.attn_k.weight` has shape [256, 256], expected [128, 256]"
    );
    assert_eq!(
        load(&source, &PartSpec::whole(LAYERS))
            .expect_err("wrong shape")
            .to_string(),
        message
    );
    load(&source, &SplitPlan::new(1, 4, LAYERS).expect("plan").head()).expect("head loads");

    // A norm of the wrong length, and a 1-D tensor where a matrix belongs.
    let path = synthetic(dir.path(), "norm.gguf", |m| {
        m.set_tensor(
            "output_norm.weight",
            qtensor(vec![1.0; 128], &[128], GgmlDType::F32),
        )
    });
    let source = ModelSource::open(&path).expect("headers are fine");
    assert_eq!(
        load(&source, &PartSpec::whole(LAYERS))
            .expect_err("wrong shape")
            .to_string(),
        "tensor `output_norm.weight` has shape [128], expected [256]"
    );
    let path = synthetic(dir.path(), "flat.gguf", |m| {
        m.set_tensor(
            "output.weight",
            qtensor(
                vec![0.0; VOCAB * HIDDEN],
                &[VOCAB * HIDDEN],
                GgmlDType::Q8_0,
            ),
        )
    });
    let source = ModelSource::open(&path).expect("headers are fine");
    assert_eq!(
        load(&source, &PartSpec::whole(LAYERS))
            .expect_err("wrong shape")
            .to_string(),
        "tensor `output.weight` has shape [131072], expected [512, 256]"
    );
}

/// Patches the raw bytes of a written GGUF file: the `u64` (or `u32`) right after the first
/// occurrence of `marker`.
fn patch_after(bytes: &mut [u8], marker: &[u8], value: &[u8]) {
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("marker")
        + marker.len();
    bytes[at..at + value.len()].copy_from_slice(value);
}

#[test]
fn crafted_headers_are_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");

    // A zero alignment (the data offset is rounded up to a multiple of it).
    let path = synthetic(dir.path(), "align0.gguf", |m| {
        m.set_metadata("general.alignment", Value::U32(0))
    });
    assert_eq!(
        open_err(&path),
        format!(
            "{}: malformed GGUF file: general.alignment is 0",
            path.display()
        )
    );
    let path = synthetic(dir.path(), "align0-u8.gguf", |m| {
        m.set_metadata("general.alignment", Value::U8(0))
    });
    assert_eq!(
        open_err(&path),
        format!(
            "{}: malformed GGUF file: general.alignment is 0",
            path.display()
        )
    );

    // Dimensions whose product overflows: the first dimension of token_embd.weight (written
    // innermost first) is patched to 2^62.
    let path = synthetic(dir.path(), "huge.gguf", |_| {});
    let mut bytes = std::fs::read(&path).expect("read");
    let mut marker = b"token_embd.weight".to_vec();
    marker.extend_from_slice(&2u32.to_le_bytes());
    patch_after(&mut bytes, &marker, &(1u64 << 62).to_le_bytes());
    write_bytes(&path, &bytes);
    // Only headers are read when opening; the parts that hold the embeddings refuse them.
    let source = ModelSource::open(&path).expect("headers are readable");
    let message = "tensor `token_embd.weight` has shape [512, 4611686018427387904], expected \
                   [512, 256]";
    let head = SplitPlan::new(0, 0, LAYERS).expect("plan").head();
    for spec in [PartSpec::whole(LAYERS), head] {
        assert_eq!(
            load(&source, &spec).expect_err("huge tensor").to_string(),
            message
        );
    }
    load(
        &source,
        &SplitPlan::new(0, 1, LAYERS).expect("plan").trunk(),
    )
    .expect("the trunk does not read the embeddings");

    // An unknown tensor type id.
    let path = synthetic(dir.path(), "dtype.gguf", |_| {});
    let mut bytes = std::fs::read(&path).expect("read");
    let mut marker = b"output_norm.weight".to_vec();
    marker.extend_from_slice(&1u32.to_le_bytes());
    marker.extend_from_slice(&(HIDDEN as u64).to_le_bytes());
    patch_after(&mut bytes, &marker, &77u32.to_le_bytes());
    write_bytes(&path, &bytes);
    let err = open_err(&path);
    assert!(
        err.starts_with(&format!(
            "{}: malformed GGUF file: unknown dtype for tensor 77",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn hugging_face_directories_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");

    // A directory that is not a model.
    assert_eq!(
        open_err(dir.path()),
        format!(
            "{}: not a model: expected a GGUF file or a Hugging Face directory with config.json",
            dir.path().display()
        )
    );

    // A real GPT-2 config.json: named as unsupported, not as a missing Llama field.
    let gpt2 = dir.path().join("gpt2");
    std::fs::create_dir(&gpt2).expect("mkdir");
    write_bytes(
        &gpt2.join("config.json"),
        br#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257,
            "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
            "layer_norm_epsilon": 1e-05}"#,
    );
    assert_eq!(
        open_err(&gpt2),
        format!("unsupported architecture `GPT2LMHeadModel`: {UNSUPPORTED}")
    );

    // A Llama config.json that is not JSON, or lacks a field.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).expect("mkdir");
    write_bytes(&broken.join("config.json"), b"{not json");
    let err = open_err(&broken);
    assert!(
        err.starts_with("model configuration: config.json: "),
        "{err}"
    );
    write_bytes(
        &broken.join("config.json"),
        br#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 320}"#,
    );
    assert_eq!(
        open_err(&broken),
        "model configuration: config.json: missing field `hidden_size` at line 1 column 58"
    );

    // A config but no weights.
    let no_weights = dir.path().join("no-weights");
    std::fs::create_dir(&no_weights).expect("mkdir");
    std::fs::copy(
        hf_fixture().join("config.json"),
        no_weights.join("config.json"),
    )
    .expect("copy");
    assert_eq!(
        open_err(&no_weights),
        format!(
            "model configuration: {}: no *.safetensors weights found",
            no_weights.display()
        )
    );

    // A sharded model whose index names a shard that is not there.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).expect("mkdir");
    for entry in std::fs::read_dir(hf_fixture()).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), sharded.join(entry.file_name())).expect("copy");
    }
    ModelSource::open(&sharded).expect("the copy opens");
    std::fs::remove_file(sharded.join("model-00003-of-00005.safetensors")).expect("rm");
    assert_eq!(
        open_err(&sharded),
        format!(
            "model configuration: {} names shard {} which does not exist",
            sharded.join("model.safetensors.index.json").display(),
            sharded.join("model-00003-of-00005.safetensors").display()
        )
    );

    // A shard that is not safetensors.
    write_bytes(
        &sharded.join("model-00003-of-00005.safetensors"),
        b"garbage",
    );
    let err = open_err(&sharded);
    assert!(
        err.starts_with(&format!(
            "model configuration: {}: unreadable safetensors: ",
            sharded.display()
        )),
        "{err}"
    );

    // A weight missing from the shards (the index still names it).
    let single = dir.path().join("single");
    std::fs::create_dir(&single).expect("mkdir");
    std::fs::copy(hf_fixture().join("config.json"), single.join("config.json")).expect("copy");
    std::fs::copy(
        hf_fixture().join("model-00001-of-00005.safetensors"),
        single.join("model-00001-of-00005.safetensors"),
    )
    .expect("copy");
    let source = ModelSource::open(&single).expect("one shard opens");
    assert!(source.config().tied_embeddings, "no lm_head: tied");
    let err = load(&source, &PartSpec::whole(4)).expect_err("layers missing");
    assert!(matches!(err, ModelError::MissingTensor(_)), "{err}");
    assert!(
        err.to_string().ends_with("is missing from the model files"),
        "{err}"
    );
}

/// A small valid model and its whole part, for the misuse tests.
fn small_model(dir: &Path) -> ModelSource {
    let path = synthetic(dir, "ok.gguf", |_| {});
    ModelSource::open(&path).expect("open")
}

#[test]
fn part_misuse_is_refused_and_leaves_the_cache_usable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = small_model(dir.path());
    let whole = load(&source, &PartSpec::whole(LAYERS)).expect("whole");
    let mut cache = whole.new_cache();
    let rows = whole.embed(&[1, 2, 3]).expect("embed");

    // Rows that do not start where the cache ends.
    assert_eq!(
        whole
            .forward(&rows, 5, &mut cache)
            .expect_err("wrong start")
            .to_string(),
        "rows start at position 5 but this part's KV cache holds 0 positions"
    );
    whole.forward(&rows, 0, &mut cache).expect("prefill");
    assert_eq!(cache.len(), 3);
    for start in [0, 2, 4] {
        assert_eq!(
            whole
                .forward(&rows, start, &mut cache)
                .expect_err("wrong start")
                .to_string(),
            format!("rows start at position {start} but this part's KV cache holds 3 positions")
        );
    }

    // Hidden rows of the wrong shape.
    let bad_shapes: [&[usize]; 5] = [
        &[2, 100],
        &[2, 257],
        &[0, HIDDEN],
        &[HIDDEN],
        &[1, 2, HIDDEN],
    ];
    for shape in bad_shapes {
        let t = Tensor::zeros(shape, DType::F32, &Device::Cpu).expect("zeros");
        assert_eq!(
            whole
                .forward(&t, 3, &mut cache)
                .expect_err("wrong shape")
                .to_string(),
            format!("hidden rows have shape {shape:?}, expected [rows, {HIDDEN}]")
        );
    }

    // Token ids outside the vocabulary.
    assert_eq!(
        whole
            .embed(&[1, VOCAB as u32, 2])
            .expect_err("bad id")
            .to_string(),
        "token id 512 is outside the vocabulary of 512 tokens"
    );
    assert_eq!(
        whole.embed(&[u32::MAX]).expect_err("bad id").to_string(),
        format!(
            "token id {} is outside the vocabulary of 512 tokens",
            u32::MAX
        )
    );

    // A cache of another part.
    let plan = SplitPlan::new(1, 3, LAYERS).expect("plan");
    let trunk = load(&source, &plan.trunk()).expect("trunk");
    let mut other = whole.new_cache();
    assert_eq!(
        trunk
            .forward(&rows, 0, &mut other)
            .expect_err("wrong cache")
            .to_string(),
        "model configuration: KV cache has 4 layers but the trunk part runs 2"
    );

    // Parts asked for what they do not hold.
    assert_eq!(trunk.spec().kind, PartKind::Trunk);
    assert_eq!(
        trunk.logits(&rows).expect_err("trunk logits").to_string(),
        "the trunk part cannot produce logits: it does not hold those weights"
    );
    assert_eq!(
        trunk.embed(&[1]).expect_err("trunk embed").to_string(),
        "the trunk part cannot embed tokens: it does not hold those weights"
    );

    // Logits of rows of the wrong shape.
    for shape in [&[0, HIDDEN][..], &[2, 100], &[1, 1, HIDDEN]] {
        let t = Tensor::zeros(shape, DType::F32, &Device::Cpu).expect("zeros");
        assert_eq!(
            whole.logits(&t).expect_err("wrong shape").to_string(),
            format!("hidden rows have shape {shape:?}, expected [rows, {HIDDEN}]")
        );
    }

    // After all these refusals the cache still holds 3 positions and the part continues.
    assert_eq!(cache.len(), 3);
    let next = whole.embed(&[4]).expect("embed");
    let hidden = whole.forward(&next, 3, &mut cache).expect("continue");
    assert_eq!(hidden.dims(), &[1, HIDDEN]);
    assert_eq!(whole.logits(&hidden).expect("logits").dims(), &[VOCAB]);
    assert_eq!(cache.len(), 4);
}

#[test]
fn context_overflow_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = small_model(dir.path());
    assert_eq!(source.config().context_length, CONTEXT);
    // The trunk of a 0:1 split runs one layer: cheap to fill to the context length.
    let trunk = load(
        &source,
        &PartSpec {
            kind: PartKind::Trunk,
            layers: 0..1,
        },
    )
    .expect("trunk");
    let mut cache = trunk.new_cache();
    let too_long = Tensor::zeros((CONTEXT + 1, HIDDEN), DType::F32, &Device::Cpu).expect("rows");
    assert_eq!(
        trunk
            .forward(&too_long, 0, &mut cache)
            .expect_err("overflow")
            .to_string(),
        "sequence of 513 positions exceeds the context length of 512"
    );
    assert_eq!(cache.len(), 0);
    let rows = Tensor::ones((CONTEXT - 2, HIDDEN), DType::F32, &Device::Cpu).expect("rows");
    trunk.forward(&rows, 0, &mut cache).expect("fits");
    let three = Tensor::ones((3, HIDDEN), DType::F32, &Device::Cpu).expect("rows");
    assert_eq!(
        trunk
            .forward(&three, CONTEXT - 2, &mut cache)
            .expect_err("overflow")
            .to_string(),
        "sequence of 513 positions exceeds the context length of 512"
    );
    let two = three.narrow(0, 0, 2).expect("narrow");
    trunk
        .forward(&two, CONTEXT - 2, &mut cache)
        .expect("exactly the context length fits");
    assert_eq!(cache.len(), CONTEXT);
    let one = three.narrow(0, 0, 1).expect("narrow");
    assert_eq!(
        trunk
            .forward(&one, CONTEXT, &mut cache)
            .expect_err("full")
            .to_string(),
        "sequence of 513 positions exceeds the context length of 512"
    );
}
