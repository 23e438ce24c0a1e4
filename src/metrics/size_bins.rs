//! Object-size bins (method.md section 6.4): ten half-open bins [lo, hi) with thresholds
//! 0, 0.1, ..., 1.0; "small" is [0, 0.1). Images of size -1 (no annotation) fall in no bin.

/// Number of bins.
pub const NUM_BINS: usize = 10;

/// Lower and upper threshold of bin `k`, computed like `numpy.arange(0, 1.1, 0.1)` (start + k * step
/// in f64), so boundary cases match the released evaluation.
pub fn bin_bounds(k: usize) -> (f64, f64) {
    (k as f64 * 0.1, (k + 1) as f64 * 0.1)
}

/// The bin of an object size, if any: none for -1 (no annotation) and for sizes of 1 or more.
pub fn bin_of(object_size: f64) -> Option<usize> {
    (0..NUM_BINS).find(|&k| {
        let (lo, hi) = bin_bounds(k);
        lo <= object_size && object_size < hi
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_half_open_and_skip_missing_annotations() {
        assert_eq!(bin_of(0.0), Some(0));
        assert_eq!(bin_of(0.0999), Some(0));
        assert_eq!(bin_of(0.1), Some(1));
        assert_eq!(bin_of(0.95), Some(9));
        assert_eq!(bin_of(1.0), None);
        // numpy's thresholds are k * 0.1 in f64: 3 * 0.1 = 0.30000000000000004 > 0.3, so an area of
        // exactly 0.3 (in f64) is still in [0.2, 0.3); 0.6 and 0.7 likewise.
        assert_eq!(bin_of(0.3), Some(2));
        assert_eq!(bin_of(0.6), Some(5));
        assert_eq!(bin_of(0.7), Some(6));
        assert_eq!(bin_of(0.5), Some(5));
        assert_eq!(bin_of(-1.0), None);
    }
}
