//! Atomic file commits: every artifact is written to a temporary name in its final folder, flushed to
//! disk, and renamed into place only when complete, so a reader (or a worker killed mid-write) never
//! sees a half-written file. Temporary names start with `.` and end in `.tmp`, so listings skip them.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// The temporary name `path` is written under before the rename: `.<name>.<host>.<pid>.tmp` beside
/// it. Host and pid keep two workers on one shared folder from writing the same temporary file.
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{}.tmp", super::lock::host_name(), std::process::id()))
}

/// Whether `name` is a temporary file left by [`write_atomically`] (e.g. by a killed worker).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Removes the temporary files of `path` that earlier writers left behind (a worker killed
/// mid-write leaves its `.<name>.<host>.<pid>.tmp`). Only for a caller whose lock makes it the one
/// writer of `path`. Returns how many were removed.
pub fn remove_temporaries(path: &Path) -> Result<usize> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return Ok(0) };
    let Ok(entries) = fs::read_dir(dir) else { return Ok(0) };
    let prefix = format!(".{}.", name.to_string_lossy());
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| Error::artifact(dir, e))?;
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        if entry_name.starts_with(&prefix) && is_temporary(&entry_name) {
            fs::remove_file(entry.path()).map_err(|e| Error::artifact(entry.path(), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes the temporary files in `dir` that nobody has written to for longer than `idle`: those
/// of a run killed mid-write (a sim table can be hundreds of MB). A live writer writes its file in
/// one go from data it already holds, so it touches the file all along. Best effort: a file that
/// cannot be removed stays (readers skip it). Returns how many were removed.
pub fn remove_abandoned_temporaries(dir: &Path, idle: Duration) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let abandoned = |entry: &fs::DirEntry| {
        is_temporary(&entry.file_name().to_string_lossy())
            && entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age > idle))
    };
    entries.flatten().filter(abandoned).filter(|entry| fs::remove_file(entry.path()).is_ok()).count()
}

/// Writes `path` atomically: `write` fills a buffered temporary file, which is synced and renamed
/// onto `path`. On any error the temporary file is removed and `path` is left as it was.
pub fn write_atomically<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<()>,
{
    let tmp = temporary_path(path);
    let outcome = write_and_sync(&tmp, write).and_then(|()| {
        fs::rename(&tmp, path).map_err(|e| Error::artifact(path, format!("cannot rename into place: {e}")))
    });
    if outcome.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    outcome
}

fn write_and_sync<F>(tmp: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<()>,
{
    let io = |e: std::io::Error| Error::artifact(tmp, e);
    let file = File::create(tmp).map_err(io)?;
    let mut out = BufWriter::new(file);
    write(&mut out)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |out| out.write_all(bytes).map_err(|e| Error::artifact(path, e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        let err = write_atomically(&path, |_| Err(Error::artifact("x", "boom")));
        assert!(err.is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn successful_write_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_bytes_atomically(&path, b"one").unwrap();
        write_bytes_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(is_temporary(&temporary_path(&path).file_name().unwrap().to_string_lossy()));
    }

    #[test]
    fn temporaries_of_one_file_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part-00001-of-00002.parquet");
        let keep = [
            ".part-00002-of-00002.parquet.host.7.tmp",
            "part-00001-of-00002.parquet",
            ".part-00001-of-00002.parquet.x",
        ];
        for name in
            keep.iter().chain(&[".part-00001-of-00002.parquet.host.7.tmp", ".part-00001-of-00002.parquet.b.9.tmp"])
        {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_temporaries(&path).unwrap(), 2);
        let mut left: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        let mut expected: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(left, expected);
    }

    #[test]
    fn only_temporaries_idle_longer_than_the_limit_are_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for (name, old) in [
            (".pairs.parquet.host.7.tmp", true),
            (".manifest.json.other.9.tmp", false),
            ("pairs.parquet", true),
            (".hidden", true),
        ] {
            let file = File::create(dir.path().join(name)).unwrap();
            if old {
                file.set_modified(hour_ago).unwrap();
            }
        }
        assert_eq!(remove_abandoned_temporaries(dir.path(), Duration::from_secs(600)), 1);
        assert!(!dir.path().join(".pairs.parquet.host.7.tmp").exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
        assert_eq!(remove_abandoned_temporaries(&dir.path().join("missing"), Duration::ZERO), 0);
    }
}
