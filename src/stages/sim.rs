//! PLACEHOLDER for the `sim` stage, written on the `report` branch only so that `report` compiles and
//! can be tested: it holds nothing but the fingerprint the real stage will provide. The merge with
//! the branch that implements `sim` replaces this file wholesale.

use super::index;
use crate::config::Config;
use crate::error::Result;
use crate::store::Fingerprint;

/// What `sim`'s output depends on (placeholder: the index and the top-k size).
pub fn fingerprint(config: &Config) -> Result<Fingerprint> {
    Ok(Fingerprint::new("sim")
        .with_input("index", &index::fingerprint(config)?)
        .with("rerank.k", config.rerank.k))
}
