//! Fingerprints and manifests. A [`Fingerprint`] lists everything a stage's output depends on
//! (relevant config values, upstream fingerprints, input and model file identities, the code version)
//! as sorted `key = value` entries; its digest is the SHA-256 of those entries. A [`Manifest`] is the
//! JSON file a stage writes last, recording the fingerprint, the files it wrote and a summary. A
//! stage is fresh only when its manifest's digest equals the digest computed now.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::commit::write_bytes_atomically;
use crate::error::{Error, Result};

/// The crate version, part of every fingerprint: a new qpert release recomputes everything.
pub const CODE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What one stage's output depends on, as sorted `key = value` entries.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fingerprint {
    entries: BTreeMap<String, String>,
}

impl Fingerprint {
    /// A fingerprint for `stage`, holding the stage name and [`CODE_VERSION`].
    pub fn new(stage: &str) -> Self {
        Fingerprint::default().with("stage", stage).with("code.version", CODE_VERSION)
    }

    /// Adds a value the output depends on, e.g. `("qpert.alpha", 8.0)`.
    pub fn with(mut self, key: &str, value: impl Display) -> Self {
        self.entries.insert(key.to_string(), value.to_string());
        self
    }

    /// The fingerprint with exactly these entries, as a manifest or a file's footer records them.
    pub fn from_entries(entries: BTreeMap<String, String>) -> Self {
        Fingerprint { entries }
    }

    /// Adds an upstream stage's fingerprint digest, as `input.<stage>`.
    pub fn with_input(self, stage: &str, upstream: &Fingerprint) -> Self {
        self.with(&format!("input.{stage}"), upstream.digest())
    }

    /// Adds a small input file by content: its size and SHA-256. Renaming, copying or touching the
    /// file does not change the fingerprint; editing it does.
    pub fn with_file_contents(self, key: &str, path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(|e| Error::input(path, e))?;
        Ok(self.with(key, format!("{} bytes, sha256 {}", bytes.len(), hex(&Sha256::digest(&bytes)))))
    }

    /// Adds many small files by content, e.g. the Entities files of a split's images: one SHA-256
    /// over each path with its bytes (or an absence marker), in the given order.
    pub fn with_files_contents(self, key: &str, paths: &[PathBuf]) -> Result<Self> {
        let mut hasher = Sha256::new();
        let mut present = 0;
        for path in paths {
            hasher.update(path.to_string_lossy().as_bytes());
            match fs::read(path) {
                Ok(bytes) => {
                    present += 1;
                    hasher.update((bytes.len() as u64).to_le_bytes());
                    hasher.update(&bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => hasher.update(b"\0absent"),
                Err(e) => return Err(Error::input(path, e)),
            }
        }
        let digest = hex(&hasher.finalize());
        Ok(self.with(key, format!("{present} of {} files present, sha256 {digest}", paths.len())))
    }

    /// Adds many files by byte size only, e.g. a split's images: one SHA-256 over each path with
    /// its size (or an absence marker), in the given order. Sizes are read in parallel (one `stat`
    /// each) and survive copies; a replacement of exactly the same size goes unseen.
    pub fn with_file_sizes(self, key: &str, paths: &[PathBuf]) -> Result<Self> {
        let sizes: Vec<Option<u64>> = paths
            .par_iter()
            .map(|path| match fs::metadata(path) {
                Ok(meta) => Ok(Some(meta.len())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::input(path, e)),
            })
            .collect::<Result<_>>()?;
        let mut hasher = Sha256::new();
        for (path, size) in paths.iter().zip(&sizes) {
            hasher.update(path.to_string_lossy().as_bytes());
            match size {
                Some(bytes) => hasher.update(bytes.to_le_bytes()),
                None => hasher.update(b"\0absent"),
            }
        }
        let present = sizes.iter().flatten().count();
        let digest = hex(&hasher.finalize());
        Ok(self.with(key, format!("{present} of {} files present, sha256 {digest}", paths.len())))
    }

    /// Adds a large file (model weights, a COCO Entities JSON) by content, its size and SHA-256, read
    /// once per copy and remembered in `cache_dir` ([`content_hash`](super::content_hash)): copies of
    /// the file agree whatever their modification times.
    pub fn with_large_file(self, key: &str, path: &Path, cache_dir: &Path) -> Result<Self> {
        let (bytes, sha256) = super::content_hash::size_and_sha256(path, cache_dir)?;
        Ok(self.with(key, format!("{bytes} bytes, sha256 {sha256}")))
    }

    /// The SHA-256 (hex) of the entries, one `key=value` line each, in key order.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for (k, v) in &self.entries {
            hasher.update(format!("{k}={v}\n").as_bytes());
        }
        hex(&hasher.finalize())
    }

    /// The entries, in key order.
    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.entries
    }

    /// The entries that differ between `old` and `self`, worded for a human:
    /// `dataset.box_origin: 1 -> 0`, `extract changed` (an upstream stage), `qpert.alpha: added`,
    /// `input.index: removed`.
    pub fn changes_since(&self, old: &Fingerprint) -> Vec<String> {
        let keys: std::collections::BTreeSet<&String> = self.entries.keys().chain(old.entries.keys()).collect();
        keys.into_iter()
            .filter_map(|k| match (old.entries.get(k), self.entries.get(k)) {
                (Some(a), Some(b)) if a == b => None,
                // An upstream stage's digest says only that it changed; its own status says how.
                (Some(_), Some(_)) if k.starts_with("input.") => Some(format!("{} changed", &k["input.".len()..])),
                (Some(a), Some(b)) => Some(format!("{k}: {}", changed_fields(a, b))),
                (None, Some(_)) => Some(format!("{k}: added")),
                (Some(_), None) => Some(format!("{k}: removed")),
                (None, None) => None,
            })
            .collect()
    }
}

/// `a -> b`, or for values of the same comma-separated fields (`4588552 bytes, sha256 dc7c...`)
/// only the fields that differ, hashes cut to 12 digits (`sha256 dc7c1b2a3f4e -> sha256 9f2e...`).
fn changed_fields(a: &str, b: &str) -> String {
    let (fields_a, fields_b): (Vec<&str>, Vec<&str>) = (a.split(", ").collect(), b.split(", ").collect());
    if fields_a.len() < 2 || fields_a.len() != fields_b.len() {
        return format!("{a} -> {b}");
    }
    let (diff_a, diff_b): (Vec<&str>, Vec<&str>) = fields_a.iter().zip(&fields_b).filter(|(x, y)| x != y).unzip();
    let short = |fields: Vec<&str>| -> String {
        let cut = |f: &str| match f.strip_prefix("sha256 ") {
            Some(hash) if hash.len() > 12 => format!("sha256 {}", &hash[..12]),
            _ => f.to_string(),
        };
        fields.into_iter().map(cut).collect::<Vec<_>>().join(", ")
    };
    format!("{} -> {}", short(diff_a), short(diff_b))
}

/// Lowercase hex digits of `bytes`.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One file a stage wrote, with its row count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the stage folder, e.g. `images.parquet` or `part-00001-of-00004.parquet`.
    pub name: String,
    /// Number of rows.
    pub rows: u64,
}

/// An item a stage could not process and left out, with the reason (never a silent drop).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The item, e.g. an image id.
    pub item: String,
    /// Why it was left out.
    pub reason: String,
}

/// A data warning raised while a stage ran (e.g. a box reaching outside its image), kept in the
/// manifest so that `--strict` still fails on an up-to-date stage that had warnings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataWarning {
    /// The input file the warning is about.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// A stage's `manifest.json`: written last, so its presence with a matching fingerprint means done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Stage name, e.g. `index`.
    pub stage: String,
    /// qpert version that wrote it.
    pub qpert_version: String,
    /// The fingerprint digest; the stage is fresh when it equals the digest computed now.
    pub fingerprint: String,
    /// The fingerprint's entries, so `status` can say what changed.
    pub fingerprint_entries: BTreeMap<String, String>,
    /// Number of shards the stage ran in (1 for unsharded stages).
    pub shards: u32,
    /// The files the stage wrote, in the order they form its table(s).
    pub files: Vec<FileEntry>,
    /// Stage-specific summary (for `index`: the coverage counts).
    #[serde(default)]
    pub summary: serde_json::Value,
    /// Items left out, with reasons.
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    /// Data warnings raised while the stage ran.
    #[serde(default)]
    pub warnings: Vec<DataWarning>,
}

impl Manifest {
    /// The fingerprint recorded in this manifest.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::from_entries(self.fingerprint_entries.clone())
    }

    /// Reads a manifest: `Ok(None)` when the file does not exist, `Ok(Some(Err(why)))` when it
    /// does not parse (it was damaged after qpert wrote it, atomically: the stage is recomputed).
    pub fn read(path: &Path) -> Result<Option<std::result::Result<Manifest, String>>> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::artifact(path, e)),
        };
        Ok(Some(serde_json::from_str(&text).map_err(|e| format!("corrupt manifest: {e}"))))
    }

    /// Writes the manifest atomically (pretty JSON, trailing newline).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut json = serde_json::to_string_pretty(self).map_err(|e| Error::artifact(path, e))?;
        json.push('\n');
        write_bytes_atomically(path, json.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_every_entry_but_not_on_insertion_order() {
        let a = Fingerprint::new("index").with("x", 1).with("y", "two");
        let b = Fingerprint::new("index").with("y", "two").with("x", 1);
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), a.clone().with("x", 2).digest());
        assert_ne!(a.digest(), Fingerprint::new("extract").with("x", 1).with("y", "two").digest());
        assert_eq!(a.digest().len(), 64);
    }

    #[test]
    fn changes_are_listed_by_key() {
        let old = Fingerprint::new("index").with("dataset.box_origin", 1).with("gone", "x");
        let new = Fingerprint::new("index").with("dataset.box_origin", 0).with("fresh", "y");
        assert_eq!(new.changes_since(&old), vec!["dataset.box_origin: 1 -> 0", "fresh: added", "gone: removed"]);
        // A file identity names only the fields that changed.
        let (ab, cd) = ("ab".repeat(32), "cd".repeat(32));
        let old = Fingerprint::new("text").with("model.w", format!("10 bytes, sha256 {ab}")).with("p", "a, b");
        let new = Fingerprint::new("text").with("model.w", format!("10 bytes, sha256 {cd}")).with("p", "a, b, c");
        assert_eq!(
            new.changes_since(&old),
            vec!["model.w: sha256 abababababab -> sha256 cdcdcdcdcdcd", "p: a, b -> a, b, c"]
        );
    }

    #[test]
    fn upstream_change_propagates() {
        let index = Fingerprint::new("index").with("dataset.box_origin", 1);
        let extract = Fingerprint::new("extract").with_input("index", &index);
        let index2 = index.clone().with("dataset.box_origin", 0);
        assert_ne!(extract.digest(), Fingerprint::new("extract").with_input("index", &index2).digest());
    }

    #[test]
    fn file_contents_not_mtime_matter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        fs::write(&path, "[1]").unwrap();
        let one = Fingerprint::new("s").with_file_contents("f", &path).unwrap();
        fs::write(&path, "[1]").unwrap();
        assert_eq!(one, Fingerprint::new("s").with_file_contents("f", &path).unwrap());
        fs::write(&path, "[2]").unwrap();
        assert_ne!(one, Fingerprint::new("s").with_file_contents("f", &path).unwrap());
    }

    #[test]
    fn many_files_are_hashed_with_absences() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.xml"), dir.path().join("b.xml"));
        fs::write(&a, "<a/>").unwrap();
        let paths = [a.clone(), b.clone()];
        let one = Fingerprint::new("s").with_files_contents("e", &paths).unwrap();
        assert!(one.entries()["e"].starts_with("1 of 2 files present"));
        fs::write(&b, "").unwrap();
        assert_ne!(one, Fingerprint::new("s").with_files_contents("e", &paths).unwrap());
    }
}
