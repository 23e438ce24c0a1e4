//! `--shard I/N`: which contiguous slice of a stage's items one worker processes, and the name of the
//! part file it writes (`part-IIIII-of-NNNNN.parquet`). I is 1-based, so `2/8` is the second of eight.
//! Slices are deterministic and balanced: their lengths differ by at most one, and concatenating the
//! parts 1..=N in order gives the unsharded table back.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::error::{Error, Result};

/// One worker's share of a sharded stage: part `index` (1-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shard {
    index: u32,
    count: u32,
}

/// Largest N accepted by `--shard I/N` (part names have five digits).
pub const MAX_SHARDS: u32 = 99_999;

impl Shard {
    /// The whole stage as one part: `1/1`.
    pub const ALL: Shard = Shard { index: 1, count: 1 };

    /// Part `index` of `count`; fails unless `1 <= index <= count <= MAX_SHARDS`.
    pub fn new(index: u32, count: u32) -> Result<Self> {
        if count == 0 || count > MAX_SHARDS {
            return Err(Error::Usage(format!("shard count {count} must be between 1 and {MAX_SHARDS}")));
        }
        if index == 0 || index > count {
            return Err(Error::Usage(format!(
                "shard index {index} is out of range: it is 1-based and must be between 1 and {count}"
            )));
        }
        Ok(Shard { index, count })
    }

    /// The 1-based index I.
    pub fn index(self) -> u32 {
        self.index
    }

    /// The number of shards N.
    pub fn count(self) -> u32 {
        self.count
    }

    /// The items `[len*(I-1)/N, len*I/N)` of a stage with `len` items: contiguous, balanced, and
    /// covering `0..len` exactly once over all I. A shard may be empty when `len < N`.
    pub fn range(self, len: usize) -> Range<usize> {
        let bound = |i: u32| ((len as u128 * i as u128) / self.count as u128) as usize;
        bound(self.index - 1)..bound(self.index)
    }

    /// Like [`Shard::range`], but over whole batches of `batch` items: every batch then holds the
    /// same items however the stage is sharded, so batched model code gives bit-identical results
    /// for any sharding (matrix kernels may round differently for different batch shapes).
    pub fn batch_range(self, len: usize, batch: usize) -> Range<usize> {
        let batches = self.range(len.div_ceil(batch));
        (batches.start * batch).min(len)..(batches.end * batch).min(len)
    }

    /// The part file this shard writes, e.g. `part-00002-of-00008.parquet`.
    pub fn part_file_name(self) -> String {
        format!("part-{:05}-of-{:05}.parquet", self.index, self.count)
    }

    /// All shards of a stage split into `count` parts, in order.
    pub fn all_of(count: u32) -> Result<Vec<Shard>> {
        (1..=count.max(1)).map(|i| Shard::new(i, count)).collect()
    }

    /// Parses a part file name written by [`Shard::part_file_name`]; `None` for any other name.
    pub fn from_part_file_name(name: &str) -> Option<Shard> {
        let rest = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
        let (i, n) = rest.split_once("-of-")?;
        if i.len() != 5 || n.len() != 5 {
            return None;
        }
        Shard::new(i.parse().ok()?, n.parse().ok()?).ok()
    }
}

impl FromStr for Shard {
    type Err = Error;

    /// Parses `I/N`, e.g. `2/8`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Usage(format!("bad shard `{s}`: expected I/N with 1 <= I <= N, e.g. 2/8"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index = i.trim().parse::<u32>().map_err(|_| bad())?;
        let count = n.trim().parse::<u32>().map_err(|_| bad())?;
        Shard::new(index, count).map_err(|e| Error::Usage(format!("bad shard `{s}`: {e}")))
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_ranges_cover_everything_in_whole_batches() {
        for count in 1..6 {
            let ranges: Vec<Range<usize>> =
                (1..=count).map(|i| Shard::new(i, count).unwrap().batch_range(23, 4)).collect();
            assert_eq!(ranges.first().unwrap().start, 0);
            assert_eq!(ranges.last().unwrap().end, 23);
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[0].end % 4 == 0 || w[0].end == 23);
            }
        }
    }

    fn ranges(len: usize, count: u32) -> Vec<Range<usize>> {
        Shard::all_of(count).unwrap().into_iter().map(|s| s.range(len)).collect()
    }

    #[test]
    fn ranges_are_contiguous_balanced_and_cover_everything() {
        for len in [0usize, 1, 2, 7, 10, 1000, 1001] {
            for count in [1u32, 2, 3, 4, 8, 13] {
                let rs = ranges(len, count);
                assert_eq!(rs.first().unwrap().start, 0);
                assert_eq!(rs.last().unwrap().end, len);
                for w in rs.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "len {len} count {count}");
                }
                let sizes: Vec<usize> = rs.iter().map(|r| r.len()).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "unbalanced {sizes:?}");
            }
        }
    }

    #[test]
    fn ten_items_in_four_shards() {
        assert_eq!(ranges(10, 4), vec![0..2, 2..5, 5..7, 7..10]);
    }

    #[test]
    fn parse_accepts_one_based_index() {
        let s: Shard = "2/8".parse().unwrap();
        assert_eq!((s.index(), s.count()), (2, 8));
        assert_eq!(s.to_string(), "2/8");
        assert_eq!(s.part_file_name(), "part-00002-of-00008.parquet");
    }

    #[test]
    fn parse_rejects_bad_shards() {
        for bad in ["0/4", "5/4", "x", "1/0", "-1/4", "1/", "/4", "1/2/3", "1.5/4"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn part_file_names_round_trip() {
        let s = Shard::new(3, 12).unwrap();
        assert_eq!(Shard::from_part_file_name(&s.part_file_name()), Some(s));
        assert_eq!(Shard::from_part_file_name("part-1-of-2.parquet"), None);
        assert_eq!(Shard::from_part_file_name("images.parquet"), None);
        assert_eq!(Shard::from_part_file_name("part-00005-of-00004.parquet"), None);
    }
}
