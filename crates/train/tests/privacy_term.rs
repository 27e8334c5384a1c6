//! The privacy term of split fine-tuning: distance correlation's value where it is known
//! exactly and its gradient against finite differences (`train.rs` trains with it).

use candle_core::{Device, Tensor, Var};
use lsplit_train::distance_correlation;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `rows` × `width` values drawn uniformly from [-1, 1) with `seed`.
fn random(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..rows * width)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect()
}

fn tensor(values: Vec<f32>, rows: usize, width: usize) -> Tensor {
    Tensor::from_vec(values, (rows, width), &Device::Cpu).expect("tensor")
}

fn value(x: &Tensor, y: &Tensor) -> f32 {
    distance_correlation(x, y)
        .expect("distance correlation")
        .to_scalar::<f32>()
        .expect("scalar")
}

#[test]
fn distance_correlation_is_blind_to_shifts_scales_and_rotations_only() {
    let (n, d) = (12, 4);
    let x = random(n, d, 1);
    // Each row rotated by 90 degrees in its first two coordinates, scaled by 3 and shifted.
    let moved: Vec<f32> = x
        .chunks(d)
        .flat_map(|r| {
            [
                -3.0 * r[1] + 5.0,
                3.0 * r[0] - 2.0,
                3.0 * r[2],
                3.0 * r[3] + 1.0,
            ]
        })
        .collect();
    let x = tensor(x, n, d);
    assert!((value(&x, &x) - 1.0).abs() < 1e-5, "{}", value(&x, &x));
    let moved = tensor(moved, n, d);
    assert!(
        (value(&x, &moved) - 1.0).abs() < 1e-5,
        "a linear disguise keeps it at 1: {}",
        value(&x, &moved)
    );
    let other = tensor(random(n, d, 2), n, d);
    assert!(
        value(&x, &other) < 0.9,
        "independent rows: {}",
        value(&x, &other)
    );

    let err = distance_correlation(&x, &tensor(random(3, d, 3), 3, d)).expect_err("rows differ");
    assert_eq!(
        err.to_string(),
        "distance correlation needs two sets of the same rows, at least two: got 12 and 3"
    );
    let same = tensor(vec![0.5; 2 * d], 2, d);
    let err = distance_correlation(&same, &same).expect_err("no spread");
    assert_eq!(
        err.to_string(),
        "distance correlation of rows that are all equal"
    );
}

#[test]
fn distance_correlation_gradient_matches_finite_differences() {
    let (n, d) = (7, 5);
    let values = random(n, d, 11);
    let y = tensor(random(n, 3, 12), n, 3);
    let x = Var::from_tensor(&tensor(values.clone(), n, d)).expect("var");
    let grads = distance_correlation(x.as_tensor(), &y)
        .expect("distance correlation")
        .backward()
        .expect("backward");
    let grad: Vec<f32> = grads
        .get(x.as_tensor())
        .expect("a gradient")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("values");
    let h = 1e-2;
    for index in [0, 4, d + 2, 3 * d + 1, n * d - 1] {
        let at = |delta: f32| {
            let mut v = values.clone();
            v[index] += delta;
            value(&tensor(v, n, d), &y)
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (grad[index] - numeric).abs() <= 1e-3 + 0.02 * grad[index].abs(),
            "x[{index}]: analytic {}, finite difference {numeric}",
            grad[index]
        );
        assert!(grad[index].abs() > 1e-4, "x[{index}] moves the term");
    }
}
