//! Retrieval ranks and their summaries (method.md section 6.3): 0-based ranks with ties broken by
//! index (a stable descending order), R@1/5/10 in percent, median and mean rank (1-based), MRR.

use serde::{Deserialize, Serialize};

/// The rank of the best of `targets` when `scores` are sorted descending, ties broken by index.
///
/// Counting instead of sorting: an item's rank is the number of items with a higher score plus
/// the number of earlier items with an equal score.
pub fn best_rank(scores: &[f32], targets: &[usize]) -> usize {
    targets
        .iter()
        .map(|&target| {
            let s = scores[target];
            scores.iter().enumerate().filter(|&(j, &other)| other > s || (other == s && j < target)).count()
        })
        .min()
        .expect("a query has at least one ground-truth item")
}

/// Summary of one direction's ranks, in percent where a recall.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankSummary {
    /// Number of queries.
    pub n: usize,
    pub r1: f64,
    pub r5: f64,
    pub r10: f64,
    /// Median rank, 1-based (the mean of the two middle ranks for an even count).
    pub median_rank: f64,
    /// Mean rank, 1-based.
    pub mean_rank: f64,
    /// Mean reciprocal rank, in [0, 1].
    pub mrr: f64,
}

impl RankSummary {
    /// Summarises 0-based `ranks`; `None` when there are no queries.
    pub fn of(ranks: &[usize]) -> Option<Self> {
        if ranks.is_empty() {
            return None;
        }
        let n = ranks.len() as f64;
        let recall = |k: usize| 100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / n;
        let mut sorted: Vec<usize> = ranks.to_vec();
        sorted.sort_unstable();
        let mid = sorted.len() / 2;
        let median0 =
            if sorted.len() % 2 == 1 { sorted[mid] as f64 } else { (sorted[mid - 1] + sorted[mid]) as f64 / 2.0 };
        Some(RankSummary {
            n: ranks.len(),
            r1: recall(1),
            r5: recall(5),
            r10: recall(10),
            median_rank: median0 + 1.0,
            mean_rank: ranks.iter().map(|&r| r as f64 + 1.0).sum::<f64>() / n,
            mrr: ranks.iter().map(|&r| 1.0 / (r as f64 + 1.0)).sum::<f64>() / n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_are_broken_by_index() {
        let scores = [0.5, 0.9, 0.5, 0.1];
        assert_eq!(best_rank(&scores, &[1]), 0);
        assert_eq!(best_rank(&scores, &[0]), 1);
        assert_eq!(best_rank(&scores, &[2]), 2);
        assert_eq!(best_rank(&scores, &[3, 2]), 2);
    }

    #[test]
    fn hand_checked_summary() {
        let s = RankSummary::of(&[0, 0, 3, 12]).unwrap();
        assert_eq!((s.r1, s.r5, s.r10), (50.0, 75.0, 75.0));
        assert_eq!(s.median_rank, 2.5);
        assert_eq!(s.mean_rank, 4.75);
        assert!((s.mrr - (1.0 + 1.0 + 0.25 + 1.0 / 13.0) / 4.0).abs() < 1e-12);
        assert_eq!(RankSummary::of(&[]), None);
    }
}
