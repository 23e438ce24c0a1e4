//! Box to token weights (method.md section 3): how much of each vision token an object box covers,
//! computed exactly as the released Q-Pert code does it (mask at the annotation's size, bilinear
//! resize to S x S without antialiasing, binarise, per-patch coverage).
//!
//! The released pipeline builds an H x W mask and resizes it with PyTorch's `upsample_bilinear2d`.
//! The mask is the outer product of a row indicator and a column indicator, and bilinear
//! interpolation of an outer product is the outer product of the 1-D interpolations, so after the
//! `> 0` binarisation a resized pixel is set exactly when both its row and its column are. We
//! therefore work on two 1-D axes (O(H + W + S) instead of O(H W + S^2)) with the same f32
//! source-index arithmetic as PyTorch, which gives bit-identical weights.

/// An object box in image pixel coordinates, after the dataset's origin shift
/// (`xmin, ymin` inclusive, `xmax, ymax` exclusive after truncation, as the released code slices).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectBox {
    pub xmin: f32,
    pub ymin: f32,
    pub xmax: f32,
    pub ymax: f32,
}

/// Geometry of the vision tower input: side `image_size` (S) split into `patch_size` (p) patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchGrid {
    pub image_size: usize,
    pub patch_size: usize,
}

impl PatchGrid {
    /// Patches per side, G = S / p.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Vision tokens T = G^2 + 1 (CLS first).
    pub fn num_tokens(&self) -> usize {
        self.patches_per_side().pow(2) + 1
    }
}

/// Per-token weights of one box: T entries in [0, 1], CLS (index 0) always 0, then the G x G
/// patches row-major, each the fraction of its p x p pixels covered by the resized, binarised mask.
///
/// `width`/`height` are the annotation's image size (the mask's size).
pub fn patch_weights(object: &ObjectBox, width: u32, height: u32, grid: PatchGrid) -> Vec<f32> {
    let rows = resized_axis_mask(object.ymin, object.ymax, height as usize, grid.image_size);
    let cols = resized_axis_mask(object.xmin, object.xmax, width as usize, grid.image_size);
    let g = grid.patches_per_side();
    let p = grid.patch_size;
    let count_per_patch = |mask: &[bool]| -> Vec<usize> {
        (0..g).map(|i| mask[i * p..(i + 1) * p].iter().filter(|&&on| on).count()).collect()
    };
    let row_counts = count_per_patch(&rows);
    let col_counts = count_per_patch(&cols);
    let pixels_per_patch = (p * p) as f32;
    let mut weights = Vec::with_capacity(grid.num_tokens());
    weights.push(0.0);
    for &r in &row_counts {
        for &c in &col_counts {
            weights.push((r * c) as f32 / pixels_per_patch);
        }
    }
    weights
}

/// One axis of the released mask after `m[int(lo):int(hi)] = 1` (Python slice semantics, so a
/// negative start counts from the end, as it does in the released code) and a bilinear resize from
/// `n` to `s` samples followed by `> 0`.
fn resized_axis_mask(lo: f32, hi: f32, n: usize, s: usize) -> Vec<bool> {
    let (start, end) = python_slice(lo.trunc() as i64, hi.trunc() as i64, n);
    let inside = |i: usize| start <= i && i < end;
    let scale = n as f32 / s as f32;
    (0..s)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = src as usize;
            let i1 = (i0 + 1).min(n - 1);
            let t = src - i0 as f32;
            // (1 - t) > 0 always, so the interpolated value is positive iff a sampled pixel with a
            // positive weight is inside the mask.
            inside(i0) || (t > 0.0 && inside(i1))
        })
        .collect()
}

/// The index range `[start, end)` that Python's `a[start:end]` selects from a sequence of length `n`.
fn python_slice(start: i64, end: i64, n: usize) -> (usize, usize) {
    let n = n as i64;
    let clamp = |i: i64| if i < 0 { (i + n).max(0) } else { i.min(n) };
    (clamp(start) as usize, clamp(end) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRID: PatchGrid = PatchGrid { image_size: 4, patch_size: 2 };

    #[test]
    fn whole_image_covers_every_patch() {
        let b = ObjectBox { xmin: 0.0, ymin: 0.0, xmax: 8.0, ymax: 8.0 };
        assert_eq!(patch_weights(&b, 8, 8, GRID), vec![0.0, 1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn hand_checked_quarter_box() {
        // 8 x 8 image resized to 4: samples at src = 0.5, 2.5, 4.5, 6.5. Box rows/cols [0, 3):
        // samples 0 and 1 (left pixels 0 and 2) are on, 2 and 3 are off: one full patch.
        let b = ObjectBox { xmin: 0.0, ymin: 0.0, xmax: 3.0, ymax: 3.0 };
        assert_eq!(patch_weights(&b, 8, 8, GRID), vec![0.0, 1.0, 0.0, 0.0, 0.0]);
        // Cols [3, 4): only sample 1 (pixels 2 and 3, t = 0.5) is on: half of each left patch.
        let b = ObjectBox { xmin: 3.0, ymin: 0.0, xmax: 4.0, ymax: 8.0 };
        assert_eq!(patch_weights(&b, 8, 8, GRID), vec![0.0, 0.5, 0.0, 0.5, 0.0]);
    }

    #[test]
    fn truncation_and_exclusive_end() {
        // xmax 3.0 covers pixel 2, which sample 1 (src 2.5) reads; 2.9 truncates to 2 and does not.
        let b = ObjectBox { xmin: 0.7, ymin: 0.0, xmax: 3.0, ymax: 8.0 };
        assert_eq!(patch_weights(&b, 8, 8, GRID), vec![0.0, 1.0, 0.0, 1.0, 0.0]);
        let b = ObjectBox { xmax: 2.9, ..b };
        assert_eq!(patch_weights(&b, 8, 8, GRID), vec![0.0, 0.5, 0.0, 0.5, 0.0]);
    }

    #[test]
    fn negative_start_wraps_like_python_slicing() {
        // The released COCO path shifts a 0-based box at x = 0 to -1: m[:, -1:5] is empty.
        let b = ObjectBox { xmin: -1.0, ymin: 0.0, xmax: 5.0, ymax: 8.0 };
        assert_eq!(patch_weights(&b, 8, 8, GRID), vec![0.0; 5]);
        // A box past the right/bottom edge is clamped by the slice.
        let b = ObjectBox { xmin: 4.0, ymin: 4.0, xmax: 12.0, ymax: 12.0 };
        assert_eq!(patch_weights(&b, 8, 8, GRID), vec![0.0, 0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn upsampling_spreads_a_single_pixel() {
        // A 2 x 2 image resized to 4: src = max(0, -0.25), 0.25, 0.75, 1.25 (i1 clamped to 1).
        // Pixel 1 only: sample 0 (t = 0, pixel 0 alone) is off, samples 1-3 are on.
        let b = ObjectBox { xmin: 1.0, ymin: 1.0, xmax: 2.0, ymax: 2.0 };
        assert_eq!(patch_weights(&b, 2, 2, GRID), vec![0.0, 0.25, 0.5, 0.5, 1.0]);
    }
}
