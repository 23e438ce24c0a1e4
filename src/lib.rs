//! # qpert
//!
//! Cross-modal image-text retrieval with BLIP-2 and Object-Aware Query Perturbation (Q-Pert,
//! ECCV 2024), as staged, resumable, shardable batch jobs. The exact computation is specified in
//! `shared/spec/method.md`; section numbers below refer to it.
//!
//! The pipeline, one stage per module in [`stages`], each writing Parquet under `<output.dir>/<stage>/`:
//!
//! ```text
//! index    annotations + Entities -> images / boxes / texts tables          (data, store)
//! extract  images -> vision tokens Z -> Q-Pert projectors -> ITC image features   (model, qpert)
//! text     captions -> tokens -> ITC text features                                (model)
//! sim      ITC scores in blocks -> top-k per image and per text                    (metrics)
//! rerank   ITM logits for the top-k pairs, sharing each image's Z and projectors  (model, qpert)
//! report   ranks, R@K, size bins -> metrics.json, report.md                        (metrics)
//! ```
//!
//! Module map: [`cli`] parses and resolves the command line; [`config`] is the strict TOML config;
//! [`stages`] runs one stage; [`model`] is BLIP-2 in burn (one code path for CPU and CUDA);
//! [`qpert`] builds the box weights, key subspaces and query perturbation; [`data`] reads datasets,
//! images and captions; [`store`] writes and validates artifacts; [`metrics`] computes ranks and
//! recalls; [`error`] is the one error type; [`bench`] times the real stages on synthetic data
//! (`qpert bench`), reading the [`timing`] counters.

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod error;
pub mod metrics;
pub mod model;
pub mod qpert;
pub mod stages;
pub mod store;
pub mod timing;

pub use error::{Error, Result};
