//! The step-tensor codecs: exact byte counts and bit layouts, error bounds on random tensors,
//! fp8 bit patterns, and clear errors for every kind of hostile message.

use candle_core::{DType, Device, Tensor};
use lsplit_wire::{Grouping, IntBits, StepCodec, StepTensor, WireError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Every name, in `StepCodec::all()` order.
const NAMES: [&str; 19] = [
    "f32", "f16", "bf16", "fp8-e4m3", "fp8-e5m2", "int8", "int7", "int6", "int5", "int4", "int3",
    "int2", "int8-ch", "int7-ch", "int6-ch", "int5-ch", "int4-ch", "int3-ch", "int2-ch",
];

fn codec(name: &str) -> StepCodec {
    name.parse().expect("known codec")
}

fn tensor(values: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor")
}

/// Seeded uniform values in `-spread..spread`, as many as `shape` holds.
fn random(shape: &[usize], seed: u64, spread: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let count = shape.iter().product();
    (0..count)
        .map(|_| rng.random_range(-spread..spread))
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .expect("flatten")
        .to_vec1::<f32>()
        .expect("f32 values")
}

fn round_trip(codec: StepCodec, input: &[f32], shape: &[usize]) -> (StepTensor, Vec<f32>) {
    let encoded = codec
        .encode(&tensor(input.to_vec(), shape))
        .expect("encode");
    let decoded = encoded.decode(&Device::Cpu).expect("decode");
    assert_eq!(decoded.dims(), shape, "{codec}");
    assert_eq!(decoded.dtype(), DType::F32, "{codec}");
    (encoded, values(&decoded))
}

/// The (minimum, scale) pairs at the start of an affine payload.
fn affine_params(encoded: &StepTensor, groups: usize) -> Vec<(f32, f32)> {
    encoded.payload[..groups * 8]
        .chunks_exact(8)
        .map(|p| {
            (
                f32::from_le_bytes(p[..4].try_into().expect("4 bytes")),
                f32::from_le_bytes(p[4..].try_into().expect("4 bytes")),
            )
        })
        .collect()
}

fn decode_err(codec: StepCodec, shape: &[usize], payload: Vec<u8>) -> String {
    StepTensor {
        codec,
        shape: shape.to_vec(),
        payload,
    }
    .decode(&Device::Cpu)
    .expect_err("hostile payload")
    .to_string()
}

#[test]
fn names_ids_and_the_codec_list_agree() {
    let all = StepCodec::all();
    assert_eq!(all.map(|c| c.to_string()), NAMES.map(String::from));
    for c in all {
        assert_eq!(codec(&c.to_string()), c);
        assert_eq!(codec(&c.name().to_uppercase()), c);
        assert_eq!(StepCodec::from_id(c.id()).expect("known id"), c);
    }
    let ids: std::collections::HashSet<u8> = all.iter().map(|c| c.id()).collect();
    assert_eq!(ids.len(), all.len(), "ids are distinct");
    assert_eq!(
        codec("int5-ch"),
        StepCodec::Int {
            bits: IntBits::new(5).expect("5 bits"),
            grouping: Grouping::PerChannel
        }
    );
    assert_eq!(codec("int4").id(), 0x14);
    assert_eq!(codec("int4-ch").id(), 0x24);
    assert_eq!(StepCodec::default(), StepCodec::F32);
    assert_eq!(IntBits::new(1), None);
    assert_eq!(IntBits::new(9), None);
    // Every representable codec has a name: no affine width or grouping is missing.
    for bits in 2..=8 {
        for grouping in [Grouping::PerTensor, Grouping::PerChannel] {
            let c = StepCodec::Int {
                bits: IntBits::new(bits).expect("2..=8"),
                grouping,
            };
            assert!(all.contains(&c), "{c:?}");
        }
    }
}

#[test]
fn unknown_names_and_ids_are_rejected_with_every_valid_name() {
    let err = "int9".parse::<StepCodec>().expect_err("int9");
    assert_eq!(
        err.to_string(),
        "unknown step codec `int9`: expected one of f32, f16, bf16, fp8-e4m3, fp8-e5m2, \
         int8, int7, int6, int5, int4, int3, int2, \
         int8-ch, int7-ch, int6-ch, int5-ch, int4-ch, int3-ch, int2-ch"
    );
    assert_eq!(
        StepCodec::from_id(0x19).expect_err("id 0x19").to_string(),
        "unknown step codec id 25"
    );
}

#[test]
fn byte_len_on_a_2x3x5x7_tensor() {
    // 210 values in 3 channels.
    let shape = [2, 3, 5, 7];
    let input = random(&shape, 1, 2.0);
    let expected = [
        ("f32", 840),
        ("f16", 420),
        ("bf16", 420),
        ("fp8-e4m3", 210),
        ("fp8-e5m2", 210),
        // One group: 8 bytes of minimum and scale, then ceil(210 * N / 8).
        ("int8", 8 + 210),
        ("int7", 8 + 184),
        ("int6", 8 + 158),
        ("int5", 8 + 132),
        ("int4", 8 + 105),
        ("int3", 8 + 79),
        ("int2", 8 + 53),
        // Three groups: 24 bytes of minimums and scales.
        ("int8-ch", 24 + 210),
        ("int7-ch", 24 + 184),
        ("int6-ch", 24 + 158),
        ("int5-ch", 24 + 132),
        ("int4-ch", 24 + 105),
        ("int3-ch", 24 + 79),
        ("int2-ch", 24 + 53),
    ];
    for (name, bytes) in expected {
        let c = codec(name);
        let encoded = c.encode(&tensor(input.clone(), &shape)).expect("encode");
        assert_eq!(encoded.byte_len(), bytes, "{name}");
        assert_eq!(c.payload_len(&shape).expect("payload_len"), bytes, "{name}");
    }
}

#[test]
fn f32_round_trip_is_bit_exact() {
    let shape = [2, 3, 5, 7];
    let mut input = random(&shape, 2, 1e3);
    input[..6].copy_from_slice(&[-0.0, f32::MAX, f32::MIN, 1e-45, -1e-40, f32::EPSILON]);
    let (_, output) = round_trip(StepCodec::F32, &input, &shape);
    assert_eq!(
        output.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        input.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn float_codecs_stay_within_their_relative_precision() {
    // (codec, relative bound 2^-(mantissa bits + 1), absolute bound half the smallest subnormal,
    // spread of the random values inside the format's range)
    let cases = [
        ("f16", 2f32.powi(-11), 2f32.powi(-25), 6e4),
        ("bf16", 2f32.powi(-8), 0.0, 1e30),
        ("fp8-e4m3", 2f32.powi(-4), 2f32.powi(-10), 440.0),
        ("fp8-e5m2", 2f32.powi(-3), 2f32.powi(-17), 5e4),
    ];
    let shape = [2, 16, 8, 8];
    for (name, relative, absolute, spread) in cases {
        for (seed, spread) in [(3, spread), (4, 1.0), (5, 1e-3)] {
            let input = random(&shape, seed, spread);
            let (_, output) = round_trip(codec(name), &input, &shape);
            for (x, y) in input.iter().zip(&output) {
                let bound = x.abs() * relative + absolute;
                assert!((x - y).abs() <= bound, "{name}: {x} -> {y} (bound {bound})");
            }
        }
    }
}

#[test]
fn fp8_bit_patterns() {
    let input = [
        1.0,
        -2.0,
        448.0,
        0.001953125,
        -0.001953125,
        0.013671875,
        1000.0,
        -1e6,
    ];
    let e4m3 = codec("fp8-e4m3")
        .encode(&tensor(input.to_vec(), &[8]))
        .expect("encode");
    // 448 is the largest finite E4M3 (S.1111.110); 2^-9 the smallest subnormal; 7 * 2^-9 the
    // largest; beyond 448 saturates.
    assert_eq!(
        e4m3.payload,
        [0x38, 0xc0, 0x7e, 0x01, 0x81, 0x07, 0x7e, 0xfe]
    );
    let input = [
        1.0,
        -2.0,
        57344.0,
        2f32.powi(-16),
        448.0,
        1e6,
        -61440.0,
        2f32.powi(-14),
    ];
    let e5m2 = codec("fp8-e5m2")
        .encode(&tensor(input.to_vec(), &[8]))
        .expect("encode");
    assert_eq!(
        e5m2.payload,
        [0x3c, 0xc0, 0x7b, 0x01, 0x5f, 0x7b, 0xfb, 0x04]
    );
    let decoded = values(&e5m2.decode(&Device::Cpu).expect("decode"));
    assert_eq!(
        decoded,
        [
            1.0,
            -2.0,
            57344.0,
            2f32.powi(-16),
            448.0,
            57344.0,
            -57344.0,
            2f32.powi(-14)
        ]
    );
}

#[test]
fn every_finite_fp8_byte_round_trips() {
    for (name, non_finite) in [
        ("fp8-e4m3", vec![0x7f, 0xff]),
        ("fp8-e5m2", (0x7c..=0x7f).chain(0xfc..=0xff).collect()),
    ] {
        let finite: Vec<u8> = (0..=255u8).filter(|b| !non_finite.contains(b)).collect();
        let message = StepTensor {
            codec: codec(name),
            shape: vec![finite.len()],
            payload: finite.clone(),
        };
        let decoded = message.decode(&Device::Cpu).expect("decode");
        let reencoded = codec(name).encode(&decoded).expect("encode");
        assert_eq!(reencoded.payload, finite, "{name}");
        let again = reencoded.decode(&Device::Cpu).expect("decode again");
        assert_eq!(
            values(&again)
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            values(&decoded)
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            "{name}"
        );
    }
}

#[test]
fn narrow_floats_saturate_instead_of_overflowing() {
    let input = vec![1e6, -1e6, f32::MAX, f32::MIN];
    let (_, f16) = round_trip(codec("f16"), &input, &[4]);
    assert_eq!(f16, [65504.0, -65504.0, 65504.0, -65504.0]);
    let (_, bf16) = round_trip(codec("bf16"), &input, &[4]);
    let bf16_max = half::bf16::MAX.to_f32();
    assert_eq!(bf16, [999424.0, -999424.0, bf16_max, -bf16_max]);
}

/// Checks every value against its group's scale: `|x - y| <= scale / 2` plus f32 rounding.
fn assert_affine_bound(name: &str, input: &[f32], shape: &[usize]) -> Vec<f32> {
    let c = codec(name);
    let (encoded, output) = round_trip(c, input, shape);
    let per_channel = name.ends_with("-ch");
    let groups = if per_channel { shape[1] } else { 1 };
    let block: usize = if per_channel {
        shape[2..].iter().product()
    } else {
        input.len()
    };
    let params = affine_params(&encoded, groups);
    for (k, (xs, ys)) in input.chunks(block).zip(output.chunks(block)).enumerate() {
        let (min, scale) = params[k % groups];
        for (x, y) in xs.iter().zip(ys) {
            let bound = scale / 2.0 + 4.0 * f32::EPSILON * (x.abs() + min.abs());
            assert!((x - y).abs() <= bound, "{name}: {x} -> {y} (bound {bound})");
        }
    }
    output
}

#[test]
fn affine_codecs_stay_within_half_a_step() {
    let shape = [2, 6, 5, 7];
    let mut rng = StdRng::seed_from_u64(6);
    // Each channel has its own offset and spread.
    let input: Vec<f32> = (0..shape.iter().product())
        .map(|i| {
            let channel = (i / 35) % 6;
            channel as f32 * 3.0 - 7.0 + rng.random_range(-1.0..1.0) * (channel + 1) as f32
        })
        .collect();
    for name in &NAMES[5..] {
        assert_affine_bound(name, &input, &shape);
    }
    // The steps really are (max - min) / (2^N - 1).
    let encoded = codec("int4")
        .encode(&tensor(input.clone(), &shape))
        .expect("encode");
    let (min, scale) = affine_params(&encoded, 1)[0];
    let max = input.iter().copied().fold(f32::MIN, f32::max);
    assert_eq!(min, input.iter().copied().fold(f32::MAX, f32::min));
    assert_eq!(scale, ((f64::from(max) - f64::from(min)) / 15.0) as f32);
}

#[test]
fn per_channel_beats_per_tensor_when_channel_ranges_differ() {
    let shape = [2, 4, 8, 8];
    let noise = random(&shape, 7, 1.0);
    // Channel c spans about ±10^c.
    let input: Vec<f32> = noise
        .iter()
        .enumerate()
        .map(|(i, v)| v * 10f32.powi(((i / 64) % 4) as i32))
        .collect();
    let channel_max_error = |output: &[f32], channel: usize| {
        input
            .iter()
            .zip(output)
            .enumerate()
            .filter(|(i, _)| (i / 64) % 4 == channel)
            .map(|(_, (x, y))| (x - y).abs())
            .fold(0.0, f32::max)
    };
    let per_tensor = assert_affine_bound("int4", &input, &shape);
    let per_channel = assert_affine_bound("int4-ch", &input, &shape);
    // The ±1 channel: per tensor it shares a step of ~2000 / 15; per channel its own ~2 / 15.
    assert!(channel_max_error(&per_channel, 0) < channel_max_error(&per_tensor, 0) / 100.0);
    let squared =
        |output: &[f32]| -> f32 { input.iter().zip(output).map(|(x, y)| (x - y).powi(2)).sum() };
    assert!(squared(&per_channel) < squared(&per_tensor) / 2.0);
}

#[test]
fn constant_groups_decode_exactly() {
    // Channel 0 is constant, channel 1 is not.
    let input = vec![0.3, 0.3, 0.3, -1.0, 2.0, 0.5];
    let (encoded, output) = round_trip(codec("int3-ch"), &input, &[1, 2, 3]);
    assert_eq!(affine_params(&encoded, 2)[0], (0.3, 0.0));
    assert_eq!(output[..3], [0.3, 0.3, 0.3]);
    let (_, output) = round_trip(codec("int2"), &[-5.5; 7], &[7]);
    assert_eq!(output, [-5.5; 7]);
}

#[test]
fn int3_and_int5_pack_bits_least_significant_first() {
    // min 0, max 7: scale 1, so q is the value. 5, 3, 7, 0, 1, 6 in 3 bits each:
    // 5 + 3 << 3 + 7 << 6 + 0 << 9 + 1 << 12 + 6 << 15 = 0x311dd, 18 bits in 3 bytes.
    let input = vec![5.0, 3.0, 7.0, 0.0, 1.0, 6.0];
    let (encoded, output) = round_trip(codec("int3"), &input, &[6]);
    assert_eq!(
        encoded.payload,
        [0, 0, 0, 0, 0, 0, 0x80, 0x3f, 0xdd, 0x11, 0x03]
    );
    assert_eq!(output, input);
    // min 0, max 31: 31 + 0 << 5 + 17 << 10 + 9 << 15 = 0x4c41f, 20 bits in 3 bytes.
    let input = vec![31.0, 0.0, 17.0, 9.0];
    let (encoded, output) = round_trip(codec("int5"), &input, &[2, 2]);
    assert_eq!(
        encoded.payload,
        [0, 0, 0, 0, 0, 0, 0x80, 0x3f, 0x1f, 0xc4, 0x04]
    );
    assert_eq!(output, input);
    // Per channel over [2, 2] (channels are columns): column 0 holds 31 and 17 (min 17, step
    // 14 / 31), column 1 holds 0 and 9 (min 0, step 9 / 31), so q = 31, 0, 0, 31:
    // 31 + 0 << 5 + 0 << 10 + 31 << 15 = 0xf801f.
    let (encoded, output) = round_trip(codec("int5-ch"), &input, &[2, 2]);
    assert_eq!(encoded.payload[16..], [0x1f, 0x80, 0x0f]);
    assert_eq!(
        affine_params(&encoded, 2),
        [(17.0, 14.0 / 31.0), (0.0, 9.0 / 31.0)]
    );
    assert_eq!(output, input);
}

#[test]
fn rank_0_and_1_tensors_use_one_group_per_channel() {
    let scalar = Tensor::new(2.5f32, &Device::Cpu).expect("scalar");
    let encoded = codec("int8-ch").encode(&scalar).expect("encode");
    assert_eq!(encoded.byte_len(), 8 + 1);
    let back = encoded.decode(&Device::Cpu).expect("decode");
    assert_eq!(back.dims(), [0usize; 0]);
    assert_eq!(back.to_scalar::<f32>().expect("scalar"), 2.5);
    let encoded = codec("int4-ch")
        .encode(&tensor(vec![1.0, 2.0, 3.0], &[3]))
        .expect("encode");
    assert_eq!(encoded.byte_len(), 8 + 2);
}

#[test]
fn any_float_dtype_is_encoded_as_its_f32_values() {
    let input = tensor(vec![0.5, -1.25, 3.0, 1024.0], &[2, 2]);
    let f16 = input.to_dtype(DType::F16).expect("f16");
    let encoded = StepCodec::F32.encode(&f16).expect("encode");
    assert_eq!(encoded.byte_len(), 16);
    assert_eq!(
        values(&encoded.decode(&Device::Cpu).expect("decode")),
        [0.5, -1.25, 3.0, 1024.0]
    );
}

#[test]
fn unet_sized_tensors_round_trip_in_every_codec() {
    // The boundary of an SDXL-like UNet at 512x512 with guidance: [2, 1280, 32, 32].
    let shape = [2, 1280, 32, 32];
    let input = random(&shape, 8, 4.0);
    for name in ["f16", "fp8-e4m3", "int8", "int4-ch", "int3-ch"] {
        let encoded = codec(name)
            .encode(&tensor(input.clone(), &shape))
            .expect("encode");
        let expected = codec(name).payload_len(&shape).expect("payload_len");
        assert_eq!(encoded.byte_len(), expected, "{name}");
        let output = values(&encoded.decode(&Device::Cpu).expect("decode"));
        let worst = input
            .iter()
            .zip(&output)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        // Half a step of 8 / 7 for int3, the loosest here.
        assert!(worst <= 0.58, "{name}: {worst}");
    }
}

#[test]
fn non_finite_inputs_are_rejected_at_encode() {
    let mut input = random(&[2, 3, 4], 9, 1.0);
    input[17] = f32::NAN;
    let err = codec("int8")
        .encode(&tensor(input.clone(), &[2, 3, 4]))
        .expect_err("NaN");
    assert_eq!(
        err.to_string(),
        "cannot encode step tensor: non-finite value NaN at index [1, 1, 1]"
    );
    input[17] = 0.0;
    input[3] = f32::NEG_INFINITY;
    for c in StepCodec::all() {
        let err = c
            .encode(&tensor(input.clone(), &[2, 3, 4]))
            .expect_err("inf");
        assert_eq!(
            err.to_string(),
            "cannot encode step tensor: non-finite value -inf at index [0, 0, 3]",
            "{c}"
        );
    }
}

#[test]
fn empty_and_overflowing_shapes_are_rejected() {
    let empty = Tensor::zeros((2, 0, 3), DType::F32, &Device::Cpu).expect("empty");
    assert_eq!(
        codec("f16").encode(&empty).expect_err("empty").to_string(),
        "step tensor of shape [2, 0, 3] has no elements"
    );
    assert_eq!(
        decode_err(codec("int4"), &[2, 0, 3], vec![]),
        "step tensor of shape [2, 0, 3] has no elements"
    );
    assert_eq!(
        decode_err(codec("f32"), &[usize::MAX, 2], vec![0; 8]),
        format!("step tensor of shape [{}, 2] is too large", usize::MAX)
    );
    // The element count fits but the byte count does not.
    let half = usize::MAX / 2;
    assert_eq!(
        decode_err(codec("f32"), &[half], vec![0; 8]),
        format!("step tensor of shape [{half}] is too large")
    );
    assert_eq!(
        decode_err(codec("int8-ch"), &[1, half], vec![0; 8]),
        format!("step tensor of shape [1, {half}] is too large")
    );
    // A huge but addressable shape is refused on its length before anything is allocated.
    let huge = usize::MAX / 16;
    assert_eq!(
        decode_err(codec("int2"), &[huge], vec![0; 12]),
        format!(
            "int2 payload of 12 bytes does not match shape [{huge}] ({} bytes expected)",
            8 + (huge * 2).div_ceil(8)
        )
    );
}

#[test]
fn payloads_of_the_wrong_length_are_rejected_for_every_codec() {
    let shape = [2, 3, 5, 7];
    let input = tensor(random(&shape, 10, 1.0), &shape);
    for c in StepCodec::all() {
        let encoded = c.encode(&input).expect("encode");
        let expected = encoded.byte_len();
        for len in [expected - 1, expected + 1, 0] {
            let mut payload = encoded.payload.clone();
            payload.resize(len, 0);
            assert_eq!(
                decode_err(c, &shape, payload),
                format!(
                    "{c} payload of {len} bytes does not match shape [2, 3, 5, 7] \
                     ({expected} bytes expected)"
                )
            );
        }
    }
}

#[test]
fn non_finite_decoded_values_are_rejected() {
    let shape = [2, 3];
    let cases: [(&str, Vec<u8>, &str); 7] = [
        (
            "f32",
            [0u8; 16]
                .into_iter()
                .chain(f32::NAN.to_le_bytes())
                .chain([0; 4])
                .collect(),
            "f32 payload decodes to non-finite value NaN at index [1, 1]",
        ),
        (
            "f32",
            [0u8; 20]
                .into_iter()
                .chain(f32::INFINITY.to_le_bytes())
                .collect(),
            "f32 payload decodes to non-finite value inf at index [1, 2]",
        ),
        (
            "f16",
            vec![0, 0, 0x00, 0xfc, 0, 0, 0, 0, 0, 0, 0, 0],
            "f16 payload decodes to non-finite value -inf at index [0, 1]",
        ),
        (
            "bf16",
            vec![0, 0, 0, 0, 0, 0, 0xc0, 0x7f, 0, 0, 0, 0],
            "bf16 payload decodes to non-finite value NaN at index [1, 0]",
        ),
        (
            "fp8-e4m3",
            vec![0x38, 0x38, 0x38, 0x38, 0x38, 0xff],
            "fp8-e4m3 payload decodes to non-finite value NaN at index [1, 2]",
        ),
        (
            "fp8-e5m2",
            vec![0x7c, 0, 0, 0, 0, 0],
            "fp8-e5m2 payload decodes to non-finite value inf at index [0, 0]",
        ),
        (
            // Finite minimum and scale whose largest level overflows f32.
            "int2",
            (-3e38f32)
                .to_le_bytes()
                .into_iter()
                .chain(3e38f32.to_le_bytes())
                .chain([0b0011_0000, 0])
                .collect(),
            "int2 payload decodes to non-finite value inf at index [0, 2]",
        ),
    ];
    for (name, payload, message) in cases {
        assert_eq!(decode_err(codec(name), &shape, payload), message);
    }
}

#[test]
fn bad_affine_groups_and_padding_are_rejected() {
    let shape = [1, 2, 3];
    let group = |min: f32, scale: f32| min.to_le_bytes().into_iter().chain(scale.to_le_bytes());
    let good = || group(0.0, 1.0);
    let cases = [
        (
            good()
                .chain(group(f32::NAN, 1.0))
                .chain([0; 3])
                .collect::<Vec<u8>>(),
            "int4-ch group 1 has minimum NaN and scale 1: both must be finite and the scale >= 0",
        ),
        (
            group(0.0, f32::INFINITY)
                .chain(good())
                .chain([0; 3])
                .collect(),
            "int4-ch group 0 has minimum 0 and scale inf: both must be finite and the scale >= 0",
        ),
        (
            good().chain(group(1.0, -0.5)).chain([0; 3]).collect(),
            "int4-ch group 1 has minimum 1 and scale -0.5: both must be finite and the scale >= 0",
        ),
    ];
    for (payload, message) in cases {
        assert_eq!(decode_err(codec("int4-ch"), &shape, payload), message);
    }
    // 6 values of 3 bits use 18 bits: the top 6 bits of the third byte must be zero.
    let payload: Vec<u8> = good().chain([0, 0, 0b0000_0100]).collect();
    assert_eq!(
        decode_err(codec("int3"), &shape, payload),
        "int3 payload has non-zero padding bits in its last byte"
    );
    let payload: Vec<u8> = good().chain([0, 0, 0b0000_0011]).collect();
    let message = StepTensor {
        codec: codec("int3"),
        shape: shape.to_vec(),
        payload,
    };
    let decoded = values(&message.decode(&Device::Cpu).expect("decode"));
    assert_eq!(decoded, [0.0, 0.0, 0.0, 0.0, 0.0, 6.0]);
}

#[test]
fn wire_errors_are_typed() {
    let err = "bogus".parse::<StepCodec>().expect_err("bogus");
    assert!(matches!(err, WireError::UnknownStepCodec(ref name) if name == "bogus"));
}
