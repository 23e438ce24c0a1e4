//! The artifact store: every stage writes into `<output.dir>/<stage>/`, through a [`StageDir`].
//!
//! ```text
//! <output.dir>/index/images.parquet               named tables (unsharded stages)
//! <output.dir>/extract/part-00002-of-00008.parquet parts (sharded stages, `--shard 2/8`)
//! <output.dir>/<stage>/manifest.json              written last: fingerprint, files, summary
//! ```
//!
//! Every file is committed atomically ([`commit`]); every Parquet file carries the stage fingerprint
//! in its key-value metadata ([`parquet`]); the manifest ([`manifest`]) is written only once all of
//! a stage's files exist with the current fingerprint. Readers go through [`StageDir::read_table`] /
//! [`StageDir::read_parts`], which refuse anything stale or incomplete: nothing stale is read silently.
//!
//! Concurrency (several workers on one shared folder, e.g. Slurm array tasks): parts of different
//! shards never share a file name; a worker computes a shard only while holding its lock
//! ([`StageDir::claim`], `part-IIIII-of-NNNNN.lock`, see [`lock`]), so two workers never both write
//! one part; parts appear only complete (temporary file + rename), so nobody reads half a part; and
//! the manifest of a sharded stage is written once, under `manifest.lock`, by whichever worker finds
//! all parts present ([`StageDir::finish_parts`]) or by `qpert stage <name> --finalize`
//! ([`StageDir::finalize`]).

pub mod columns;
pub mod commit;
pub mod content_hash;
pub mod lock;
pub mod manifest;
pub mod parquet;
pub mod shard;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

pub use lock::{LockOwner, LockState};
pub use manifest::{DataWarning, FileEntry, Fingerprint, Manifest, Skipped};
pub use shard::Shard;

use crate::error::{Error, Result};

/// File name of a stage's manifest.
pub const MANIFEST_FILE: &str = "manifest.json";

/// File name of the lock held while a sharded stage's manifest is written.
pub const MANIFEST_LOCK_FILE: &str = "manifest.lock";

/// The problem of a file that carries another fingerprint than its stage's manifest.
const REWRITTEN: &str = "fingerprint does not match the manifest (rewritten since?)";

/// A shard claimed by this worker ([`StageDir::claim`]): its lock is released when this is dropped.
#[derive(Debug)]
#[must_use = "the shard is released when the claim is dropped: hold it until the part is written"]
pub struct ShardClaim {
    _lock: lock::Lock,
}

/// What a stage has to say about its inputs besides its tables: items it left out and data warnings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notes {
    /// Items left out, with reasons.
    pub skipped: Vec<Skipped>,
    /// Data warnings raised (and tolerated) while running.
    pub warnings: Vec<DataWarning>,
}

/// One stage's output folder, opened with the fingerprint its output must have now.
#[derive(Debug, Clone)]
pub struct StageDir {
    dir: PathBuf,
    stage: String,
    fingerprint: Fingerprint,
}

/// Where a stage stands, as `qpert status` reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum StageState {
    /// Complete, with the current fingerprint.
    Done(Manifest),
    /// A manifest exists but was made from other inputs; the changed fingerprint entries.
    Stale(Vec<String>),
    /// A current manifest, but files it lists are missing, unreadable, rewritten or cut short
    /// (deleted by hand, a damaged disk), or a manifest that does not parse: what is wrong with
    /// each file, `<file>: <problem>`. `run` recomputes the stage (a sharded stage's intact parts
    /// are kept) and readers refuse it.
    Damaged(Vec<String>),
    /// No current manifest, but some parts exist: which shards are fresh and which stale.
    Partial(Vec<PartState>),
    /// Nothing written yet.
    Missing,
}

/// One part file of a sharded stage found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartState {
    /// The shard that wrote it.
    pub shard: Shard,
    /// `None` when its embedded fingerprint matches the current one; else why not: the
    /// fingerprint entries that differ (`model.model.safetensors: ... -> ...`), or that it cannot
    /// be read.
    pub stale: Option<String>,
}

impl PartState {
    /// Whether the part was written with the current fingerprint (a resumed run keeps it).
    pub fn fresh(&self) -> bool {
        self.stale.is_none()
    }
}

impl StageDir {
    /// Opens `<output_dir>/<stage>/` for a stage whose output must match `fingerprint`. Creates
    /// nothing: writers create the folder on their first write.
    pub fn open(output_dir: &Path, stage: &str, fingerprint: Fingerprint) -> Self {
        StageDir { dir: output_dir.join(stage), stage: stage.to_string(), fingerprint }
    }

    /// The same stage in the sibling folder `folder` of `<output_dir>/` (e.g. `extract-plain`), for
    /// variants of a stage that share one cache.
    pub fn in_folder(mut self, folder: &str) -> Self {
        self.dir.set_file_name(folder);
        self
    }

    /// The stage folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The fingerprint the stage's output must have.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST_FILE)
    }

    /// Whether the stage is complete with the current fingerprint.
    pub fn is_complete(&self) -> Result<bool> {
        Ok(matches!(self.state()?, StageState::Done(_)))
    }

    /// The stage's state: done, stale (with what changed), damaged (which files), partial (which
    /// parts) or missing.
    pub fn state(&self) -> Result<StageState> {
        if let Some(manifest) = Manifest::read(&self.manifest_path())? {
            let manifest = match manifest {
                Ok(manifest) => manifest,
                Err(why) => return Ok(StageState::Damaged(vec![format!("{MANIFEST_FILE}: {why}")])),
            };
            if manifest.fingerprint == self.fingerprint.digest() {
                let problems = self.damaged_files(&manifest);
                return Ok(if problems.is_empty() {
                    StageState::Done(manifest)
                } else {
                    StageState::Damaged(problems)
                });
            }
            let changes = self.fingerprint.changes_since(&manifest.fingerprint());
            return Ok(StageState::Stale(changes));
        }
        let parts = self.part_states()?;
        Ok(if parts.is_empty() { StageState::Missing } else { StageState::Partial(parts) })
    }

    /// What is wrong with the files `manifest` lists, from their footers only (no data is read):
    /// each must exist, and a Parquet file must be readable, carry the current fingerprint and
    /// hold the rows the manifest says. Empty when all are intact.
    fn damaged_files(&self, manifest: &Manifest) -> Vec<String> {
        let digest = self.fingerprint.digest();
        let check = |file: &FileEntry| {
            let path = self.dir.join(&file.name);
            if !path.is_file() {
                return Some("missing".to_string());
            }
            if !file.name.ends_with(".parquet") {
                return None;
            }
            match parquet::read_footer(&path) {
                Err(Error::Artifact { msg, .. }) => Some(msg),
                Err(e) => Some(e.to_string()),
                Ok(footer) if footer.fingerprint() != Some(digest.as_str()) => Some(REWRITTEN.to_string()),
                Ok(footer) if footer.rows != file.rows => {
                    Some(format!("holds {} rows, the manifest says {}", footer.rows, file.rows))
                }
                Ok(_) => None,
            }
        };
        manifest
            .files
            .iter()
            .filter_map(|file| check(file).map(|problem| format!("{}: {problem}", file.name)))
            .collect()
    }

    /// The part files present, sorted by shard count then index, with their freshness.
    pub fn part_states(&self) -> Result<Vec<PartState>> {
        let mut parts = Vec::new();
        for shard in self.parts_on_disk()? {
            let stale = self.why_stale(&self.dir.join(shard.part_file_name()));
            parts.push(PartState { shard, stale });
        }
        parts.sort_by_key(|p| (p.shard.count(), p.shard.index()));
        Ok(parts)
    }

    fn parts_on_disk(&self) -> Result<Vec<Shard>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::artifact(&self.dir, e)),
        };
        Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| Shard::from_part_file_name(&e.file_name().to_string_lossy()))
            .collect())
    }

    /// Why `path` is not a file of this stage as it stands: `None` when it is a readable Parquet
    /// file with the current fingerprint; else the fingerprint entries that differ, or that it
    /// cannot be read (cut short by a full disk, say: it is recomputed).
    fn why_stale(&self, path: &Path) -> Option<String> {
        let Ok(footer) = parquet::read_footer(path) else { return Some("not a readable Parquet file".into()) };
        if footer.fingerprint() == Some(self.fingerprint.digest().as_str()) {
            return None;
        }
        let changes = footer.fingerprint_entries().map(|old| self.fingerprint.changes_since(&old)).unwrap_or_default();
        Some(if changes.is_empty() { "written from other inputs".into() } else { changes.join("; ") })
    }

    /// Whether `shard`'s part exists with the current fingerprint (a resumed run skips it).
    pub fn part_is_fresh(&self, shard: Shard) -> bool {
        self.why_stale(&self.dir.join(shard.part_file_name())).is_none()
    }

    /// Prepares the folder for writing: creates it, removes the temporary files of killed writers
    /// (idle for longer than a lock may go without a heartbeat), and removes a manifest that no
    /// longer matches, so the stage reads as in progress rather than stale or done while it is
    /// recomputed.
    pub fn begin(&self) -> Result<()> {
        fs::create_dir_all(&self.dir).map_err(|e| Error::artifact(&self.dir, e))?;
        commit::remove_abandoned_temporaries(&self.dir, lock::stale_after());
        if let StageState::Stale(_) | StageState::Damaged(_) = self.state()? {
            // Several workers starting at once may race here: the file being gone already is fine.
            match fs::remove_file(self.manifest_path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::artifact(self.manifest_path(), e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes the named table `<name>.parquet` (unsharded stages), atomically, fingerprinted.
    pub fn write_table(&self, name: &str, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<FileEntry> {
        self.write_file(&format!("{name}.parquet"), schema, batches)
    }

    /// Writes `shard`'s part `part-IIIII-of-NNNNN.parquet`, atomically, fingerprinted.
    pub fn write_part(&self, shard: Shard, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<FileEntry> {
        self.write_file(&shard.part_file_name(), schema, batches)
    }

    fn write_file(&self, name: &str, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<FileEntry> {
        self.begin()?;
        let rows = parquet::write_parquet(&self.dir.join(name), schema, batches, &self.file_metadata())?;
        Ok(FileEntry { name: name.to_string(), rows })
    }

    fn file_metadata(&self) -> BTreeMap<String, String> {
        let entries = serde_json::to_string(self.fingerprint.entries()).unwrap_or_default();
        BTreeMap::from([
            (parquet::FINGERPRINT_KEY.to_string(), self.fingerprint.digest()),
            (parquet::FINGERPRINT_ENTRIES_KEY.to_string(), entries),
            (parquet::STAGE_KEY.to_string(), self.stage.clone()),
            (parquet::VERSION_KEY.to_string(), manifest::CODE_VERSION.to_string()),
        ])
    }

    /// Writes the manifest of an unsharded stage, last, after all its `files`.
    pub fn finish(&self, files: Vec<FileEntry>, summary: serde_json::Value, notes: Notes) -> Result<Manifest> {
        self.write_manifest(1, files, summary, notes)
    }

    /// For a sharded stage run in `count` parts: when all of them exist with the current
    /// fingerprint, writes the manifest (once: under `manifest.lock`, and not again when a current
    /// one exists) and returns it; otherwise returns `None` (other workers are still running, some
    /// shards were never started, or another worker is writing the manifest right now).
    pub fn finish_parts(&self, count: u32, summary: serde_json::Value) -> Result<Option<Manifest>> {
        if let StageState::Done(manifest) = self.state()? {
            return Ok(Some(manifest));
        }
        if self.parts_ready(count)?.is_none() {
            return Ok(None);
        }
        fs::create_dir_all(&self.dir).map_err(|e| Error::artifact(&self.dir, e))?;
        let lock::Acquired::Held(_lock) = lock::Lock::try_acquire(&self.dir.join(MANIFEST_LOCK_FILE))? else {
            return Ok(None);
        };
        // Re-check under the lock: the previous holder may have just written it.
        if let StageState::Done(manifest) = self.state()? {
            return Ok(Some(manifest));
        }
        let Some(files) = self.parts_ready(count)? else { return Ok(None) };
        let manifest = self.write_manifest(count, files, summary, Notes::default())?;
        self.remove_other_layouts(count)?;
        Ok(Some(manifest))
    }

    /// Removes the parts of other shard counts once the manifest names this count's parts (an
    /// interrupted 2-shard run finished with 3 shards, say): they are superseded, and a reader
    /// globbing `part-*.parquet` (DuckDB, polars) would count their rows twice.
    fn remove_other_layouts(&self, count: u32) -> Result<()> {
        for shard in self.parts_on_disk()?.into_iter().filter(|s| s.count() != count) {
            let path = self.dir.join(shard.part_file_name());
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::artifact(&path, e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// The file entries of all `count` parts if every one exists with the current fingerprint.
    fn parts_ready(&self, count: u32) -> Result<Option<Vec<FileEntry>>> {
        let mut files = Vec::new();
        for shard in Shard::all_of(count)? {
            if !self.part_is_fresh(shard) {
                return Ok(None);
            }
            let path = self.dir.join(shard.part_file_name());
            files.push(FileEntry { name: shard.part_file_name(), rows: parquet::read_footer(&path)?.rows });
        }
        Ok(Some(files))
    }

    /// `qpert stage <name> --finalize`: writes the manifest of a sharded stage whose parts are all
    /// present, for `count` shards, or (without it) for the one shard count whose parts are all
    /// fresh. An error names the shards still missing, or the worker writing the manifest now.
    pub fn finalize(&self, count: Option<u32>) -> Result<Manifest> {
        if let StageState::Done(manifest) = self.state()? {
            return Ok(manifest);
        }
        let parts = self.part_states()?;
        let count = match count {
            Some(count) => count,
            None => {
                let complete = |n: u32| {
                    (1..=n).all(|i| parts.iter().any(|p| p.fresh() && (p.shard.index(), p.shard.count()) == (i, n)))
                };
                let mut counts: Vec<u32> = parts.iter().map(|p| p.shard.count()).collect();
                counts.sort_unstable();
                counts.dedup();
                let complete_count = counts.iter().rev().copied().find(|&n| complete(n));
                complete_count
                    .or(counts.last().copied())
                    .ok_or_else(|| Error::artifact(&self.dir, "no parts to finalize; run the stage's shards first"))?
            }
        };
        let missing: Vec<String> = Shard::all_of(count)?
            .into_iter()
            .filter(|&s| !parts.iter().any(|p| p.shard == s && p.fresh()))
            .map(|s| s.index().to_string())
            .collect();
        if !missing.is_empty() {
            return Err(Error::artifact(
                &self.dir,
                format!("cannot finalize: shards {} of {count} are not done (see `qpert status`)", missing.join(", ")),
            ));
        }
        let summary = serde_json::json!({ "finalized": true });
        self.finish_parts(count, summary)?.ok_or_else(|| {
            let holder = LockState::read(&self.dir.join(MANIFEST_LOCK_FILE)).ok().flatten();
            let who = holder.map_or_else(|| "another worker".to_string(), |s| s.describe_owner());
            Error::artifact(self.dir.join(MANIFEST_LOCK_FILE), format!("the manifest is being written by {who}"))
        })
    }

    /// Claims `shard` for computing: `None` when the stage is done, however it was sharded, or
    /// the part is already fresh (and `force` is off), so a plain `qpert run` after an 8-way
    /// sharded `extract` does not compute it again; otherwise this worker's lock on it, held until
    /// the returned claim is dropped (after the part is written). A shard a live worker holds is
    /// an error naming that worker (exit 1): two workers never compute one shard. A stale lock
    /// (its owner died) is taken over, and the temporary part file a killed worker left is removed.
    pub fn claim(&self, shard: Shard, force: bool) -> Result<Option<ShardClaim>> {
        if !force && (self.is_complete()? || self.part_is_fresh(shard)) {
            return Ok(None);
        }
        self.begin()?;
        let path = self.dir.join(lock_file_name(shard));
        match lock::Lock::try_acquire(&path)? {
            lock::Acquired::Busy(holder) => Err(Error::artifact(
                &path,
                format!(
                    "shard {shard} of {} is being computed by {}; not computing it twice (if that worker is gone, \
                     its lock counts as stale once its pid has exited on that host, or after {}s without heartbeat \
                     from another host)",
                    self.stage,
                    holder.describe_owner(),
                    lock::stale_after().as_secs()
                ),
            )),
            // Re-check under the lock: the previous holder may have just finished this part.
            lock::Acquired::Held(_) if !force && self.part_is_fresh(shard) => Ok(None),
            lock::Acquired::Held(lock) => {
                commit::remove_temporaries(&self.dir.join(shard.part_file_name()))?;
                Ok(Some(ShardClaim { _lock: lock }))
            }
        }
    }

    /// The shard lock files present, with their owners and whether they are stale.
    pub fn shard_locks(&self) -> Result<Vec<(Shard, LockState)>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::artifact(&self.dir, e)),
        };
        let mut locks = Vec::new();
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(shard) =
                name.strip_suffix(".lock").and_then(|n| Shard::from_part_file_name(&format!("{n}.parquet")))
            else {
                continue;
            };
            if let Some(state) = LockState::read(&entry.path())? {
                locks.push((shard, state));
            }
        }
        locks.sort_by_key(|(s, _)| (s.count(), s.index()));
        Ok(locks)
    }

    fn write_manifest(
        &self,
        shards: u32,
        files: Vec<FileEntry>,
        summary: serde_json::Value,
        notes: Notes,
    ) -> Result<Manifest> {
        let manifest = Manifest {
            stage: self.stage.clone(),
            qpert_version: manifest::CODE_VERSION.to_string(),
            fingerprint: self.fingerprint.digest(),
            fingerprint_entries: self.fingerprint.entries().clone(),
            shards,
            files,
            summary,
            skipped: notes.skipped,
            warnings: notes.warnings,
        };
        manifest.write(&self.manifest_path())?;
        Ok(manifest)
    }

    /// The current manifest, or an error saying the stage is missing, incomplete or stale.
    pub fn require_complete(&self) -> Result<Manifest> {
        let stage = &self.stage;
        match self.state()? {
            StageState::Done(manifest) => Ok(manifest),
            StageState::Stale(changes) => {
                Err(Error::artifact(&self.dir, format!("stale ({}); rerun `qpert stage {stage}`", changes.join("; "))))
            }
            StageState::Damaged(problems) => Err(Error::artifact(
                &self.dir,
                format!("damaged ({}); rerun `qpert stage {stage}`", problems.join("; ")),
            )),
            StageState::Partial(_) | StageState::Missing => {
                Err(Error::artifact(&self.dir, format!("incomplete; run `qpert stage {stage}`")))
            }
        }
    }

    /// Reads the named table `<name>.parquet` of a complete, fresh stage.
    pub fn read_table(&self, name: &str) -> Result<RecordBatch> {
        self.require_complete()?;
        self.read_checked(&format!("{name}.parquet"))
    }

    /// Reads all parts of a complete, fresh sharded stage as one table, in shard order.
    pub fn read_parts(&self) -> Result<RecordBatch> {
        let manifest = self.require_complete()?;
        let batches = manifest.files.iter().map(|f| self.read_checked(&f.name)).collect::<Result<Vec<_>>>()?;
        let first = batches.first().ok_or_else(|| Error::artifact(&self.dir, "the manifest lists no parts"))?;
        arrow::compute::concat_batches(&first.schema(), &batches).map_err(|e| Error::artifact(&self.dir, e))
    }

    /// Reads a file of the stage, checking its fingerprint again: it may have been rewritten
    /// since the manifest was checked.
    fn read_checked(&self, name: &str) -> Result<RecordBatch> {
        let path = self.dir.join(name);
        if parquet::read_footer(&path)?.fingerprint() != Some(self.fingerprint.digest().as_str()) {
            return Err(Error::artifact(&path, REWRITTEN));
        }
        parquet::read_parquet(&path)
    }
}

/// The lock file of `shard`: `part-IIIII-of-NNNNN.lock`.
pub fn lock_file_name(shard: Shard) -> String {
    format!("part-{:05}-of-{:05}.lock", shard.index(), shard.count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, UInt32Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn table(values: Vec<u32>) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![Field::new("idx", DataType::UInt32, false)]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(UInt32Array::from(values))]).unwrap();
        (schema, batch)
    }

    fn values(batch: &RecordBatch) -> Vec<u32> {
        let col = batch.column(0).as_any().downcast_ref::<UInt32Array>().unwrap();
        (0..col.len()).map(|i| col.value(i)).collect()
    }

    fn write_shard(stage: &StageDir, shard: Shard, items: &[u32]) {
        let (schema, batch) = table(items[shard.range(items.len())].to_vec());
        stage.write_part(shard, &schema, &[batch]).unwrap();
    }

    #[test]
    fn parts_written_in_any_order_read_back_as_one_table() {
        let out = tempfile::tempdir().unwrap();
        let stage = StageDir::open(out.path(), "extract", Fingerprint::new("extract").with("a", 1));
        let items: Vec<u32> = (0..10).collect();
        assert_eq!(stage.state().unwrap(), StageState::Missing);
        for i in [3, 1] {
            write_shard(&stage, Shard::new(i, 3).unwrap(), &items);
            assert!(stage.finish_parts(3, serde_json::Value::Null).unwrap().is_none());
        }
        let StageState::Partial(parts) = stage.state().unwrap() else { panic!("expected partial") };
        assert_eq!(parts.iter().map(|p| (p.shard.index(), p.fresh())).collect::<Vec<_>>(), [(1, true), (3, true)]);
        assert!(stage.read_parts().is_err(), "an incomplete stage must not be readable");
        write_shard(&stage, Shard::new(2, 3).unwrap(), &items);
        let manifest = stage.finish_parts(3, serde_json::Value::Null).unwrap().unwrap();
        assert_eq!(manifest.files.iter().map(|f| f.rows).sum::<u64>(), 10);
        assert_eq!(values(&stage.read_parts().unwrap()), items);
    }

    #[test]
    fn a_changed_fingerprint_makes_the_stage_stale_and_unreadable() {
        let out = tempfile::tempdir().unwrap();
        let old = StageDir::open(out.path(), "index", Fingerprint::new("index").with("dataset.box_origin", 1));
        let (schema, batch) = table(vec![1, 2]);
        let file = old.write_table("images", &schema, &[batch]).unwrap();
        old.finish(vec![file], serde_json::json!({"images": 2}), Notes::default()).unwrap();
        assert!(old.is_complete().unwrap());
        assert_eq!(values(&old.read_table("images").unwrap()), [1, 2]);

        let new = StageDir::open(out.path(), "index", Fingerprint::new("index").with("dataset.box_origin", 0));
        assert_eq!(new.state().unwrap(), StageState::Stale(vec!["dataset.box_origin: 1 -> 0".into()]));
        let err = new.read_table("images").unwrap_err().to_string();
        assert!(err.contains("stale (dataset.box_origin: 1 -> 0)"), "{err}");
        new.begin().unwrap();
        assert_eq!(new.state().unwrap(), StageState::Missing);
    }

    #[test]
    fn a_done_stage_whose_files_are_damaged_is_not_done_and_is_recomputed() {
        let out = tempfile::tempdir().unwrap();
        let stage = StageDir::open(out.path(), "sim", Fingerprint::new("sim").with("k", 1));
        let (schema, batch) = table(vec![1, 2, 3]);
        let a = stage.write_table("a", &schema, std::slice::from_ref(&batch)).unwrap();
        let b = stage.write_table("b", &schema, std::slice::from_ref(&batch)).unwrap();
        fs::write(stage.path().join("c.md"), "text").unwrap();
        let c = FileEntry { name: "c.md".into(), rows: 0 };
        // The manifest says b has 4 rows where the file holds 3 (a file swapped for another of this run).
        let b = FileEntry { rows: 4, ..b };
        stage.finish(vec![a, b, c], serde_json::Value::Null, Notes::default()).unwrap();
        fs::remove_file(stage.path().join("c.md")).unwrap();
        let bytes = fs::read(stage.path().join("a.parquet")).unwrap();
        fs::write(stage.path().join("a.parquet"), &bytes[..bytes.len() - 8]).unwrap();

        let StageState::Damaged(problems) = stage.state().unwrap() else { panic!("expected damaged") };
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("a.parquet: not a readable Parquet file"), "{problems:?}");
        assert_eq!(problems[1..], ["b.parquet: holds 3 rows, the manifest says 4", "c.md: missing"]);
        let err = stage.read_table("b").unwrap_err().to_string();
        assert!(
            err.contains("damaged (a.parquet: not a readable") && err.ends_with("rerun `qpert stage sim`"),
            "{err}"
        );
        // Recomputing starts by dropping the manifest, so the stage reads as in progress.
        stage.begin().unwrap();
        assert_eq!(stage.state().unwrap(), StageState::Missing);
    }

    #[test]
    fn a_manifest_that_does_not_parse_is_damaged_and_rewritten_from_intact_parts() {
        let out = tempfile::tempdir().unwrap();
        let stage = StageDir::open(out.path(), "text", Fingerprint::new("text").with("k", 1));
        let items: Vec<u32> = (0..4).collect();
        for i in [1, 2] {
            write_shard(&stage, Shard::new(i, 2).unwrap(), &items);
        }
        assert!(stage.finish_parts(2, serde_json::Value::Null).unwrap().is_some());
        fs::write(stage.path().join(MANIFEST_FILE), "{\"stage\": \"te").unwrap();
        let StageState::Damaged(problems) = stage.state().unwrap() else { panic!("expected damaged") };
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("manifest.json: corrupt manifest: EOF while parsing"), "{problems:?}");
        // The parts are intact: a worker finding them fresh only writes the manifest again.
        assert!(!stage.is_complete().unwrap());
        assert!(stage.claim(Shard::new(1, 2).unwrap(), false).unwrap().is_none());
        assert!(stage.finish_parts(2, serde_json::Value::Null).unwrap().is_some());
        assert_eq!(values(&stage.read_parts().unwrap()), items);
    }

    #[test]
    fn a_stale_part_is_reported_and_not_reused() {
        let out = tempfile::tempdir().unwrap();
        let items: Vec<u32> = (0..4).collect();
        let old = StageDir::open(out.path(), "text", Fingerprint::new("text").with("k", 1));
        write_shard(&old, Shard::new(1, 2).unwrap(), &items);
        let new = StageDir::open(out.path(), "text", Fingerprint::new("text").with("k", 2));
        assert!(!new.part_is_fresh(Shard::new(1, 2).unwrap()));
        write_shard(&new, Shard::new(2, 2).unwrap(), &items);
        assert!(new.finish_parts(2, serde_json::Value::Null).unwrap().is_none());
        let StageState::Partial(parts) = new.state().unwrap() else { panic!("expected partial") };
        let why: Vec<Option<&str>> = parts.iter().map(|p| p.stale.as_deref()).collect();
        assert_eq!(why, [Some("k: 1 -> 2"), None]);
    }

    #[test]
    fn a_claimed_shard_cannot_be_claimed_twice_and_a_fresh_one_needs_no_claim() {
        let out = tempfile::tempdir().unwrap();
        let stage = StageDir::open(out.path(), "extract", Fingerprint::new("extract").with("a", 1));
        let shard = Shard::new(1, 2).unwrap();
        let claim = stage.claim(shard, false).unwrap().expect("the first claim wins");
        let err = stage.claim(shard, false).unwrap_err();
        assert_eq!(err.exit_code(), 1);
        let msg = err.to_string();
        assert!(msg.contains("part-00001-of-00002.lock: shard 1/2 of extract is being computed by host "), "{msg}");
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        assert!(stage.claim(Shard::new(2, 2).unwrap(), false).unwrap().is_some(), "other shards are free");
        write_shard(&stage, shard, &[1, 2, 3]);
        drop(claim);
        assert!(!stage.path().join("part-00001-of-00002.lock").exists(), "released on drop");
        assert!(stage.claim(shard, false).unwrap().is_none(), "a fresh part is not recomputed");
        assert!(stage.claim(shard, true).unwrap().is_some(), "--force recomputes it");
    }

    #[test]
    fn finalize_writes_the_manifest_once_all_parts_are_there() {
        let out = tempfile::tempdir().unwrap();
        let stage = StageDir::open(out.path(), "rerank", Fingerprint::new("rerank").with("a", 1));
        let items: Vec<u32> = (0..7).collect();
        assert!(stage.finalize(None).unwrap_err().to_string().contains("no parts to finalize"));
        for i in [1, 3] {
            write_shard(&stage, Shard::new(i, 3).unwrap(), &items);
        }
        let err = stage.finalize(None).unwrap_err().to_string();
        assert!(err.contains("cannot finalize: shards 2 of 3 are not done"), "{err}");
        write_shard(&stage, Shard::new(2, 3).unwrap(), &items);
        // Another worker holding manifest.lock is writing it: nobody else writes it meanwhile.
        let held = match lock::Lock::try_acquire(&stage.path().join(MANIFEST_LOCK_FILE)).unwrap() {
            lock::Acquired::Held(l) => l,
            lock::Acquired::Busy(_) => panic!("free"),
        };
        assert!(stage.finish_parts(3, serde_json::Value::Null).unwrap().is_none());
        assert!(stage.finalize(Some(3)).unwrap_err().to_string().contains("the manifest is being written by host"));
        drop(held);
        let manifest = stage.finalize(None).unwrap();
        assert_eq!((manifest.shards, manifest.files.len()), (3, 3));
        assert_eq!(manifest.summary, serde_json::json!({ "finalized": true }));
        // Written once: a later finisher returns the manifest as it is.
        let again = stage.finish_parts(3, serde_json::json!({ "other": 1 })).unwrap().unwrap();
        assert_eq!(again.summary, manifest.summary);
        assert_eq!(values(&stage.read_parts().unwrap()), items);
    }
}
