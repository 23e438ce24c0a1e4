//! Retrieval metrics: ranks and recalls ([`recall`]) and object-size bins ([`size_bins`]).

pub mod recall;
pub mod size_bins;
pub mod topk;

pub use recall::{RankSummary, best_rank};
pub use size_bins::{NUM_BINS, bin_bounds, bin_of};
pub use topk::{RankCounter, Scored, TopK};
