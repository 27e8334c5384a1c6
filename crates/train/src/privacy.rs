//! The privacy term of `lsplit finetune --privacy-weight`: the distance correlation (Székely et
//! al. 2007) between the head's output rows with the adapter and the public head's rows for the
//! same tokens, as NoPeek (Vepakomma et al. 2020) uses it.
//!
//! Why this term and not a distance: the attacks recover a token by finding the public row
//! nearest to the observed one, after the known-plaintext attacker has fitted a linear (ridge)
//! map from observed rows to public rows. Pushing rows away from the public ones (a plain
//! distance) is undone by such a map whenever the push is linear: a shift, a scale, a rotation.
//! Distance correlation depends only on the distances between the rows of each set, so it is
//! unchanged by any shift, scale and rotation of the rows, and is 0 only when the two sets are
//! independent: the adapter can lower it only by changing which tokens' rows are near which
//! (the geometry nearest-row matching reads through any such map), not by a disguise a ridge
//! map removes. It needs only distances, so it is differentiable with candle's operations.

use candle_core::{DType, Tensor};

use crate::{Result, TrainError};

/// Added to squared distances before their square root, so that its gradient stays finite.
const EPSILON: f64 = 1e-9;

/// The distance correlation of the rows of `x` `(n, d)` with the rows of `y` `(n, e)`, row `i`
/// of one paired with row `i` of the other: a scalar tensor in `[0, 1]`, differentiable in both
/// (the V-statistic estimate: double-centred distance matrices).
pub fn distance_correlation(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    let (m, _) = y.dims2()?;
    if n != m || n < 2 {
        return Err(TrainError::Options(format!(
            "distance correlation needs two sets of the same rows, at least two: got {n} and {m}"
        )));
    }
    let a = centred_distances(x)?;
    let b = centred_distances(y)?;
    let covariance = (&a * &b)?.mean_all()?.relu()?;
    let variances = ((&a * &a)?.mean_all()? * (&b * &b)?.mean_all()?)?.sqrt()?;
    if variances.to_scalar::<f32>()? <= 0.0 {
        return Err(TrainError::Options(
            "distance correlation of rows that are all equal".into(),
        ));
    }
    Ok((covariance / variances)?.sqrt()?)
}

/// The Euclidean distances between the rows of `x` `(n, d)`, double-centred (each row's and
/// column's mean subtracted, the grand mean added back).
fn centred_distances(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let n = x.dim(0)?;
    let squares = x.sqr()?.sum_keepdim(1)?;
    let gram = x.matmul(&x.t()?)?;
    let squared = squares
        .broadcast_add(&squares.t()?)?
        .sub(&(gram * 2.0)?)?
        .relu()?;
    // The diagonal is zero by definition; masking it keeps rounding out of it and its gradient.
    let off_diagonal = (1.0 - Tensor::eye(n, DType::F32, x.device())?)?;
    // Less the root of ε, so that equal rows are at distance 0 exactly.
    let distances = (((squared + EPSILON)?.sqrt()? - EPSILON.sqrt())? * off_diagonal)?;
    let rows = distances.mean_keepdim(1)?;
    let columns = distances.mean_keepdim(0)?;
    let grand = distances.mean_all()?;
    Ok(distances
        .broadcast_sub(&rows)?
        .broadcast_sub(&columns)?
        .broadcast_add(&grand)?)
}
