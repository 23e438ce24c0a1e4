//! PLACEHOLDER for the `rerank` stage, written on the `report` branch only so that `report` compiles
//! and can be tested: it holds nothing but the fingerprint the real stage will provide. The merge
//! with the branch that implements `rerank` replaces this file wholesale.

use super::sim;
use crate::config::Config;
use crate::error::Result;
use crate::store::Fingerprint;

/// What `rerank`'s output depends on (placeholder: `sim` and the top-k size).
pub fn fingerprint(config: &Config) -> Result<Fingerprint> {
    Ok(Fingerprint::new("rerank")
        .with_input("sim", &sim::fingerprint(config)?)
        .with("rerank.k", config.rerank.k))
}
