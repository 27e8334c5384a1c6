//! The known-plaintext attack's map: the chat template's opening tokens (system prompt
//! included) sit at known positions, so the attacker holds pairs of observed uplink rows and
//! the public head's rows for the same tokens. Ridge regression learns a linear map from the
//! one to the other; vocabulary matching then compares the mapped observed row with each
//! candidate's row projected onto what the map can produce (the span of the public rows), and
//! each recovered position adds a pair. A fixed linear distortion of the rows, such as an
//! orthogonal rotation that plain matching cannot see through, is undone this way.

use candle_core::{Device, Tensor};

use crate::AttackError;

/// The ridge penalty, relative to the mean squared norm of the observed rows: small enough
/// to fit the pairs almost exactly, large enough to keep the solve well conditioned when
/// rows are nearly collinear.
const RIDGE: f64 = 1e-4;

/// Pairs of observed rows and public rows, and the maps fitted to them.
#[derive(Clone, Default)]
pub(crate) struct Ridge {
    observed: Vec<Vec<f32>>,
    public: Vec<Vec<f32>>,
    /// `(d, d)`: observed row to public row, `W = Yᵀ (X Xᵀ + λI)⁻¹ X`.
    map: Option<Tensor>,
    /// `(d, d)`: a public row projected the same way, `P = Yᵀ (Y Yᵀ + λI)⁻¹ Y`.
    projection: Option<Tensor>,
}

impl Ridge {
    /// Adds a pair; the maps are refitted on the next [`Ridge::fit`].
    pub(crate) fn add(&mut self, observed: Vec<f32>, public: Vec<f32>) {
        self.observed.push(observed);
        self.public.push(public);
        self.map = None;
        self.projection = None;
    }

    /// Fits the map and the projection to the pairs held (none: the identity).
    pub(crate) fn fit(&mut self, device: &Device) -> Result<(), AttackError> {
        if self.observed.is_empty() || self.map.is_some() {
            return Ok(());
        }
        let (n, d) = (self.public.len(), self.public[0].len());
        let y = Tensor::from_vec(self.public.concat(), (n, d), device)?;
        let fitted = |from: &[Vec<f32>]| -> Result<Tensor, AttackError> {
            let z = solve_ridge(from)?;
            Ok(y.t()?.matmul(&Tensor::from_vec(z, (n, d), device)?)?)
        };
        self.map = Some(fitted(&self.observed)?);
        self.projection = Some(fitted(&self.public)?);
        Ok(())
    }

    /// The observed row through the map.
    pub(crate) fn map(&self, observed: &Tensor) -> Result<Tensor, AttackError> {
        apply(self.map.as_ref(), observed)
    }

    /// Candidate rows `(m, d)` projected as the map's outputs are.
    pub(crate) fn project(&self, rows: &Tensor) -> Result<Tensor, AttackError> {
        match &self.projection {
            Some(p) => Ok(rows.matmul(&p.t()?)?),
            None => Ok(rows.clone()),
        }
    }
}

/// `row` `(d,)` times `matrix` (`None`: the identity).
fn apply(matrix: Option<&Tensor>, row: &Tensor) -> Result<Tensor, AttackError> {
    match matrix {
        Some(m) => Ok(m.matmul(&row.unsqueeze(1)?)?.squeeze(1)?),
        None => Ok(row.clone()),
    }
}

/// `(A Aᵀ + λI)⁻¹ A` for the rows `A` `(n, d)`, flattened row-major, with λ [`RIDGE`] times
/// the mean squared row norm. Written here because the workspace holds no linear-algebra
/// crate and the system is tiny (`n`, the positions seen, is tens to hundreds): a Cholesky
/// factorisation in f64.
fn solve_ridge(rows: &[Vec<f32>]) -> Result<Vec<f32>, AttackError> {
    let n = rows.len();
    let d = rows[0].len();
    let dot = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    };
    let mut gram = vec![0f64; n * n];
    for (i, a) in rows.iter().enumerate() {
        for (j, b) in rows.iter().enumerate().take(i + 1) {
            let v = dot(a, b);
            gram[i * n + j] = v;
            gram[j * n + i] = v;
        }
    }
    let lambda = RIDGE * (0..n).map(|i| gram[i * n + i]).sum::<f64>() / n as f64;
    for i in 0..n {
        gram[i * n + i] += lambda.max(f64::MIN_POSITIVE);
    }
    // Cholesky: gram = L Lᵀ, L lower triangular, stored in place.
    for j in 0..n {
        let mut diag = gram[j * n + j];
        for k in 0..j {
            diag -= gram[j * n + k] * gram[j * n + k];
        }
        if diag <= 0.0 || !diag.is_finite() {
            return Err(AttackError::Capture(
                "the known-plaintext rows are degenerate (not finite or all zero)".to_string(),
            ));
        }
        let diag = diag.sqrt();
        gram[j * n + j] = diag;
        for i in j + 1..n {
            let mut v = gram[i * n + j];
            for k in 0..j {
                v -= gram[i * n + k] * gram[j * n + k];
            }
            gram[i * n + j] = v / diag;
        }
    }
    let mut out = vec![0f32; n * d];
    let mut column = vec![0f64; n];
    for c in 0..d {
        // L y = a, then Lᵀ z = y.
        for (i, row) in rows.iter().enumerate() {
            let mut v = f64::from(row[c]);
            for (k, z) in column.iter().enumerate().take(i) {
                v -= gram[i * n + k] * z;
            }
            column[i] = v / gram[i * n + i];
        }
        for i in (0..n).rev() {
            let mut v = column[i];
            for (k, z) in column.iter().enumerate().skip(i + 1) {
                v -= gram[k * n + i] * z;
            }
            column[i] = v / gram[i * n + i];
        }
        for (i, z) in column.iter().enumerate() {
            out[i * d + c] = *z as f32;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pairs related by a fixed rotation: the map sends each observed row back to its public
    /// row, and the projection leaves the public rows as they are.
    #[test]
    fn a_rotation_is_learned_from_pairs() -> Result<(), AttackError> {
        let public = vec![vec![1.0f32, 2.0, 0.0], vec![0.0, 1.0, -1.0]];
        // A rotation by 90 degrees in the first two coordinates.
        let rotate = |r: &Vec<f32>| vec![-r[1], r[0], r[2]];
        let mut ridge = Ridge::default();
        for row in &public {
            ridge.add(rotate(row), row.clone());
        }
        ridge.fit(&Device::Cpu)?;
        for row in &public {
            let observed = Tensor::new(rotate(row).as_slice(), &Device::Cpu)?;
            let mapped = ridge.map(&observed)?.to_vec1::<f32>()?;
            let projected = ridge
                .project(&Tensor::new(row.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?
                .squeeze(0)?
                .to_vec1::<f32>()?;
            for ((m, p), r) in mapped.iter().zip(&projected).zip(row) {
                assert!((m - r).abs() < 1e-3, "{mapped:?} against {row:?}");
                assert!((m - p).abs() < 1e-5, "{mapped:?} against {projected:?}");
            }
        }
        Ok(())
    }
}
