//! Streaming top-k and ground-truth ranks over a score matrix seen block by block, so the `sim`
//! stage never holds more than one block of the images x texts matrix (method.md section 6).

use std::cmp::Ordering;

/// One candidate of a top-k list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub index: u32,
    pub score: f32,
}

/// The k best-scoring items of one query, in stable descending order (ties broken by index).
#[derive(Debug, Clone)]
pub struct TopK {
    k: usize,
    best: Vec<Scored>,
}

impl TopK {
    /// An empty list that keeps at most `k` items.
    pub fn new(k: usize) -> Self {
        TopK { k, best: Vec::with_capacity(k + 1) }
    }

    /// Offers an item. Items must be offered in increasing index order for ties to break by index.
    pub fn offer(&mut self, index: u32, score: f32) {
        if self.best.len() == self.k
            && self.best.last().is_some_and(|worst| score.partial_cmp(&worst.score) != Some(Ordering::Greater))
        {
            return;
        }
        // First position whose score is lower: equal scores keep their (earlier) place.
        let at = self.best.partition_point(|s| s.score >= score);
        self.best.insert(at, Scored { index, score });
        self.best.truncate(self.k);
    }

    /// The kept items, best first.
    pub fn into_sorted(self) -> Vec<Scored> {
        self.best
    }
}

/// Counts, for one query, how many items outrank a known ground-truth score, block by block.
/// The final rank is `higher + equal_before`, matching [`super::best_rank`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RankCounter {
    /// Items with a strictly higher score.
    pub higher: usize,
    /// Items before the target (by index) with an equal score.
    pub equal_before: usize,
}

impl RankCounter {
    /// Counts `score` of item `index` against the target's `(target_index, target_score)`.
    pub fn count(&mut self, index: u32, score: f32, target_index: u32, target_score: f32) {
        if score > target_score {
            self.higher += 1;
        } else if score == target_score && index < target_index {
            self.equal_before += 1;
        }
    }

    /// The 0-based rank.
    pub fn rank(&self) -> usize {
        self.higher + self.equal_before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_k_best_with_ties_by_index() {
        let mut top = TopK::new(3);
        for (i, s) in [0.1, 0.5, 0.3, 0.5, 0.9, 0.3].into_iter().enumerate() {
            top.offer(i as u32, s);
        }
        let got: Vec<u32> = top.into_sorted().iter().map(|s| s.index).collect();
        assert_eq!(got, vec![4, 1, 3]);
    }

    #[test]
    fn rank_counter_agrees_with_best_rank() {
        let scores = [0.5f32, 0.9, 0.5, 0.1, 0.5];
        for target in 0..scores.len() {
            let mut c = RankCounter::default();
            for (i, &s) in scores.iter().enumerate() {
                c.count(i as u32, s, target as u32, scores[target]);
            }
            assert_eq!(c.rank(), crate::metrics::best_rank(&scores, &[target]));
        }
    }
}
