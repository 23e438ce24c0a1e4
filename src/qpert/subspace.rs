//! Key subspaces (method.md section 4): the eigendecomposition of one box's Gram matrix in one
//! cross-attention layer and head, the number of components to keep, and the projector onto them
//! in both variants (`principal`, the method as described; `official`, what the released code
//! computes).
//!
//! Gram matrices are small (d x d, d = 64 for the real model) and many (boxes x layers x heads), so
//! each is decomposed on one CPU core with faer in f64 and the batch is spread over cores by the
//! caller; a batched GPU `eigh` measured slower than one CPU core for this size.

use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::{Mat, Par};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How many principal components span a box's key subspace (`[qpert] npc`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Components {
    /// Keep the components whose cumulative explained ratio stays strictly below tau (at least one).
    Ratio(f64),
    /// Keep exactly this many components.
    Count(usize),
}

// `npc` in the config: a float is a ratio, an integer a count (range-checked by `Config::validate`).
impl<'de> Deserialize<'de> for Components {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(ComponentsVisitor)
    }
}

struct ComponentsVisitor;

impl serde::de::Visitor<'_> for ComponentsVisitor {
    type Value = Components;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a ratio in (0, 1) such as 0.99, or an integer count of components such as 16")
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Components, E> {
        Ok(Components::Ratio(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Components, E> {
        usize::try_from(v).map(Components::Count).map_err(|_| E::custom(format!("npc count {v} is out of range")))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Components, E> {
        usize::try_from(v).map(Components::Count).map_err(|_| E::custom(format!("npc count {v} is out of range")))
    }
}

impl Serialize for Components {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match *self {
            Components::Ratio(r) => serializer.serialize_f64(r),
            Components::Count(n) => serializer.serialize_u64(n as u64),
        }
    }
}

impl fmt::Display for Components {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Components::Ratio(r) => write!(f, "ratio {r}"),
            Components::Count(n) => write!(f, "count {n}"),
        }
    }
}

/// Which projector a box's subspace becomes (`[qpert] projector`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectorKind {
    /// V^T D_m V: the released code zeroes rows of V where it meant columns. It produced the
    /// published numbers; it depends on the eigenvector signs, fixed by [`KeySubspace::of_gram`].
    Official,
    /// V_m V_m^T: the orthogonal projector onto the top-m eigenvectors, as the paper describes.
    Principal,
}

/// The eigendecomposition of a d x d Gram matrix C = V diag(lambda) V^T.
#[derive(Debug, Clone)]
pub struct KeySubspace {
    /// Eigenvalues, descending.
    pub eigenvalues: Vec<f64>,
    /// Eigenvectors as the columns of V, column-major (`eigenvectors[j * d + i]` = V[i, j]); each
    /// normalised so that its entry of largest magnitude is positive (the first one on ties).
    pub eigenvectors: Vec<f64>,
    /// Matrix side d.
    pub dim: usize,
}

impl KeySubspace {
    /// Decomposes a symmetric `gram` (row-major d x d) in f64.
    ///
    /// A zero matrix (a box whose mask covers no patch: a zero-area box, one outside the image, or
    /// one too thin to survive the resize) has every basis as eigenvectors, and m = 1 keeps one of
    /// them, so its projector is arbitrary. qpert takes the standard basis in index order, as
    /// LAPACK (`numpy`/`torch.linalg.eigh`) returns for a zero matrix and a stable descending sort
    /// keeps it: V = I, so P = e1 e1^T for either projector.
    pub fn of_gram(gram: &[f64], dim: usize) -> Self {
        assert_eq!(gram.len(), dim * dim, "gram matrix must be d x d");
        if gram.iter().all(|&g| g == 0.0) {
            let identity = (0..dim * dim).map(|i| if i % (dim + 1) == 0 { 1.0 } else { 0.0 }).collect();
            return KeySubspace { eigenvalues: vec![0.0; dim], eigenvectors: identity, dim };
        }
        let a = Mat::<f64>::from_fn(dim, dim, |i, j| gram[i * dim + j]);
        let mut values = faer::diag::Diag::<f64>::zeros(dim);
        let mut vectors = Mat::<f64>::zeros(dim, dim);
        let params = Default::default();
        let scratch = evd::self_adjoint_evd_scratch::<f64>(dim, ComputeEigenvectors::Yes, Par::Seq, params);
        let mut mem = faer::dyn_stack::MemBuffer::new(scratch);
        evd::self_adjoint_evd(
            a.as_ref(),
            values.as_mut(),
            Some(vectors.as_mut()),
            Par::Seq,
            faer::dyn_stack::MemStack::new(&mut mem),
            params,
        )
        // A symmetric eigensolver only fails on non-finite input; keep going with a zero subspace
        // rather than abort a whole shard (NaN keys make every score NaN anyway).
        .unwrap_or_else(|_| vectors.fill(0.0));

        // faer sorts ascending; we want descending.
        let eigenvalues: Vec<f64> = (0..dim).rev().map(|j| values[j]).collect();
        let mut eigenvectors = Vec::with_capacity(dim * dim);
        for j in (0..dim).rev() {
            let column: Vec<f64> = (0..dim).map(|i| vectors[(i, j)]).collect();
            let sign = largest_entry_sign(&column);
            eigenvectors.extend(column.iter().map(|v| v * sign));
        }
        KeySubspace { eigenvalues, eigenvectors, dim }
    }

    /// m, the number of components kept: for a ratio tau, the count of leading eigenvalues whose
    /// cumulative share stays strictly below tau, at least one (a zero matrix gives NaN ratios and
    /// so m = 1, as released); for a count n, n (at most d).
    pub fn num_components(&self, components: Components) -> usize {
        match components {
            Components::Count(n) => n.min(self.dim),
            Components::Ratio(tau) => {
                let total: f64 = self.eigenvalues.iter().sum();
                let mut cumulative = 0.0;
                let below = self
                    .eigenvalues
                    .iter()
                    .take_while(|&&lambda| {
                        cumulative += lambda;
                        cumulative / total < tau
                    })
                    .count();
                below.max(1)
            }
        }
    }

    /// The d x d projector (row-major, f32) onto the first `m` components, in the given variant:
    /// one small matrix product (`principal` V_m V_m^T of V's first m columns, `official` A^T A of
    /// its first m rows), mirrored from the upper triangle so that it is exactly symmetric.
    pub fn projector(&self, kind: ProjectorKind, m: usize) -> Vec<f32> {
        let d = self.dim;
        let v = faer::MatRef::from_column_major_slice(&self.eigenvectors, d, d);
        let product = match kind {
            ProjectorKind::Principal => v.get(.., ..m) * v.get(.., ..m).transpose(),
            ProjectorKind::Official => v.get(..m, ..).transpose() * v.get(..m, ..),
        };
        let mut p = vec![0f32; d * d];
        for a in 0..d {
            for b in a..d {
                p[a * d + b] = product[(a, b)] as f32;
                p[b * d + a] = product[(a, b)] as f32;
            }
        }
        p
    }
}

/// +1 or -1: the sign of the entry of largest magnitude (the first such entry on ties).
fn largest_entry_sign(vector: &[f64]) -> f64 {
    let mut best = 0.0f64;
    for &x in vector {
        if x.abs() > best.abs() {
            best = x;
        }
    }
    if best < 0.0 { -1.0 } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gram_of(rows: &[Vec<f64>]) -> (Vec<f64>, usize) {
        let d = rows[0].len();
        let mut g = vec![0f64; d * d];
        for r in rows {
            for a in 0..d {
                for b in 0..d {
                    g[a * d + b] += r[a] * r[b];
                }
            }
        }
        (g, d)
    }

    fn matmul(a: &[f32], b: &[f32], d: usize) -> Vec<f32> {
        (0..d * d).map(|ij| (0..d).map(|k| a[(ij / d) * d + k] * b[k * d + ij % d]).sum()).collect()
    }

    #[test]
    fn diagonal_gram_has_sorted_eigenvalues_and_count() {
        let g = vec![1.0, 0.0, 0.0, 0.0, 6.0, 0.0, 0.0, 0.0, 3.0];
        let s = KeySubspace::of_gram(&g, 3);
        assert!((s.eigenvalues[0] - 6.0).abs() < 1e-12);
        assert!((s.eigenvalues[1] - 3.0).abs() < 1e-12);
        assert!((s.eigenvalues[2] - 1.0).abs() < 1e-12);
        // Cumulative shares 0.6, 0.9, 1.0: tau 0.9 keeps only the first (strict "<").
        assert_eq!(s.num_components(Components::Ratio(0.9)), 1);
        assert_eq!(s.num_components(Components::Ratio(0.95)), 2);
        assert_eq!(s.num_components(Components::Ratio(0.5)), 1);
        assert_eq!(s.num_components(Components::Count(2)), 2);
        // The top eigenvector is e_1 with a positive largest entry.
        assert_eq!(&s.eigenvectors[0..3], &[0.0, 1.0, 0.0]);
        // Principal projector onto the top two: diag(0, 1, 1).
        assert_eq!(s.projector(ProjectorKind::Principal, 2), vec![0., 0., 0., 0., 1., 0., 0., 0., 1.]);
    }

    #[test]
    fn zero_gram_keeps_one_component_the_first_basis_vector() {
        let s = KeySubspace::of_gram(&[0.0; 9], 3);
        assert_eq!(s.num_components(Components::Ratio(0.99)), 1);
        let e1 = vec![1., 0., 0., 0., 0., 0., 0., 0., 0.];
        assert_eq!(s.projector(ProjectorKind::Principal, 1), e1);
        assert_eq!(s.projector(ProjectorKind::Official, 1), e1);
    }

    #[test]
    fn both_projectors_are_symmetric_idempotent_of_rank_m() {
        let rows: Vec<Vec<f64>> = (0..9)
            .map(|t| (0..5).map(|i| ((t * 7 + i * 3) % 11) as f64 / 5.0 - 1.0 + (i == t % 5) as u8 as f64).collect())
            .collect();
        let (g, d) = gram_of(&rows);
        let s = KeySubspace::of_gram(&g, d);
        for kind in [ProjectorKind::Principal, ProjectorKind::Official] {
            let p = s.projector(kind, 3);
            let pp = matmul(&p, &p, d);
            let trace: f32 = (0..d).map(|i| p[i * d + i]).sum();
            assert!((trace - 3.0).abs() < 1e-5, "{kind:?} rank");
            for i in 0..d * d {
                assert!((pp[i] - p[i]).abs() < 1e-5, "{kind:?} idempotent");
                assert_eq!(p[i], p[(i % d) * d + i / d], "{kind:?} symmetric");
            }
        }
    }

    #[test]
    fn principal_projector_ignores_eigenvector_signs_official_does_not() {
        let rows = vec![vec![2.0, 1.0, 0.0], vec![0.0, 1.0, 3.0], vec![1.0, 0.0, 1.0], vec![0.5, 2.0, 0.0]];
        let (g, d) = gram_of(&rows);
        let s = KeySubspace::of_gram(&g, d);
        let mut flipped = s.clone();
        for v in &mut flipped.eigenvectors[0..d] {
            *v = -*v;
        }
        let principal = s.projector(ProjectorKind::Principal, 2);
        let principal_flipped = flipped.projector(ProjectorKind::Principal, 2);
        for (a, b) in principal.iter().zip(&principal_flipped) {
            assert!((a - b).abs() < 1e-6);
        }
        let official = s.projector(ProjectorKind::Official, 2);
        let official_flipped = flipped.projector(ProjectorKind::Official, 2);
        assert!(official.iter().zip(&official_flipped).any(|(a, b)| (a - b).abs() > 1e-3));
    }
}
