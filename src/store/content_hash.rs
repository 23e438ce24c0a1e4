//! Content hashes of large input files (the model's safetensors, a COCO Entities JSON), so that a
//! fingerprint names them by content: copies of the weights on different cluster nodes, or a second
//! download of them, agree whatever their modification times. Reading 4.7 GB takes seconds, so each
//! hash is remembered per (path, size, modification time): in this process, and in
//! `<output.dir>/content-hashes.json` for later runs; a file is read again only when one of those
//! changes (trusting, like `make`, that a file rewritten in place gets a new modification time).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::UNIX_EPOCH;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::commit::write_bytes_atomically;
use crate::error::{Error, Result};

/// The cache's file name in the output folder.
pub const CACHE_FILE: &str = "content-hashes.json";

/// One remembered hash: the file as it was when hashed, and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CachedHash {
    path: PathBuf,
    bytes: u64,
    mtime_ns: u128,
    sha256: String,
}

impl CachedHash {
    fn key(&self) -> (PathBuf, u64, u128) {
        (self.path.clone(), self.bytes, self.mtime_ns)
    }
}

/// The hashes this process has taken or read, by (path, size, mtime).
static REMEMBERED: Mutex<BTreeMap<(PathBuf, u64, u128), String>> = Mutex::new(BTreeMap::new());

/// The size and SHA-256 (hex) of the file at `path`, hashed at most once per (path, size, mtime):
/// looked up in this process, then in `cache_dir`'s cache file, else read (with a progress bar on a
/// terminal) and added to both. The cache is written only where `cache_dir` exists, and a cache that
/// cannot be read or written is only a cost: the file is hashed instead.
pub fn size_and_sha256(path: &Path, cache_dir: &Path) -> Result<(u64, String)> {
    let meta = fs::metadata(path).map_err(|e| Error::input(path, e))?;
    let mtime_ns = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let path = fs::canonicalize(path).map_err(|e| Error::input(path, e))?;
    let key = (path.clone(), meta.len(), mtime_ns);
    let remembered = |sha256: String| {
        REMEMBERED.lock().unwrap_or_else(PoisonError::into_inner).insert(key.clone(), sha256.clone());
        Ok((meta.len(), sha256))
    };
    if let Some(sha256) = REMEMBERED.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
        return Ok((meta.len(), sha256.clone()));
    }
    let cache_path = cache_dir.join(CACHE_FILE);
    if let Some(hit) = read_cache(&cache_path).into_iter().find(|c| c.key() == key) {
        return remembered(hit.sha256);
    }
    let sha256 = hash_file(&path, meta.len())?;
    if cache_dir.is_dir() {
        // Read again just before writing: another worker may have added its own files meanwhile.
        let mut cache = read_cache(&cache_path);
        // Entries of the same path with other times stay: on a shared output folder they may be
        // other nodes' copies of the file.
        cache.retain(|c| c.key() != key);
        cache.push(CachedHash { path: path.clone(), bytes: meta.len(), mtime_ns, sha256: sha256.clone() });
        if let Ok(json) = serde_json::to_vec_pretty(&cache) {
            let _ = write_bytes_atomically(&cache_path, &json);
        }
    }
    remembered(sha256)
}

/// The cache's entries; none when it is missing or unreadable (it is rebuilt as files are hashed).
fn read_cache(path: &Path) -> Vec<CachedHash> {
    fs::read(path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
}

fn hash_file(path: &Path, len: u64) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::input(path, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let style = ProgressStyle::with_template("hashing {msg} once [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    // Drawn on stderr only when it is a terminal, like the stages' bars.
    let bar = ProgressBar::new(len).with_style(style).with_message(name);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| Error::input(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(super::manifest::hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_mtime(path: &Path, secs: u64) {
        let time = UNIX_EPOCH + std::time::Duration::from_secs(secs);
        File::options().write(true).open(path).unwrap().set_modified(time).unwrap();
    }

    #[test]
    fn hashes_by_content_and_remembers_per_size_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.bin"));
        fs::write(&a, b"abc").unwrap();
        fs::write(&b, b"abc").unwrap();
        set_mtime(&a, 1_000);
        set_mtime(&b, 2_000);
        // The SHA-256 of "abc" (FIPS 180-2, appendix B.1).
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(size_and_sha256(&a, dir.path()).unwrap(), (3, abc.to_string()));
        assert_eq!(size_and_sha256(&b, dir.path()).unwrap().1, abc, "a copy with another mtime agrees");
        let cache = read_cache(&dir.path().join(CACHE_FILE));
        assert_eq!(cache.len(), 2, "{cache:?}");

        // A remembered hash is trusted while size and mtime stay: a forged cache entry shows it.
        let forged: Vec<CachedHash> =
            cache.iter().map(|c| CachedHash { sha256: "f0".repeat(32), ..c.clone() }).collect();
        fs::write(dir.path().join(CACHE_FILE), serde_json::to_vec(&forged).unwrap()).unwrap();
        REMEMBERED.lock().unwrap().clear();
        assert_eq!(size_and_sha256(&a, dir.path()).unwrap().1, "f0".repeat(32));

        // A new mtime reads the file again; the old entry stays (another node's copy may match it).
        fs::write(&a, b"abd").unwrap();
        set_mtime(&a, 3_000);
        let abd = size_and_sha256(&a, dir.path()).unwrap().1;
        assert_eq!(abd, super::super::manifest::hex(&Sha256::digest(b"abd")));
        let cache = read_cache(&dir.path().join(CACHE_FILE));
        let canonical_a = fs::canonicalize(&a).unwrap();
        let entries_of_a: Vec<_> =
            cache.iter().filter(|c| c.path == canonical_a).map(|c| (c.mtime_ns, c.sha256.clone())).collect();
        assert_eq!(entries_of_a, vec![(1_000_000_000_000, "f0".repeat(32)), (3_000_000_000_000, abd)]);
    }

    #[test]
    fn an_unreadable_cache_or_a_missing_folder_only_costs_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.bin");
        fs::write(&file, b"weights").unwrap();
        set_mtime(&file, 4_000);
        fs::write(dir.path().join(CACHE_FILE), b"{ not json").unwrap();
        let expected = super::super::manifest::hex(&Sha256::digest(b"weights"));
        assert_eq!(size_and_sha256(&file, dir.path()).unwrap(), (7, expected.clone()));
        assert_eq!(read_cache(&dir.path().join(CACHE_FILE)).len(), 1, "the broken cache is replaced");
        REMEMBERED.lock().unwrap().clear();
        assert_eq!(size_and_sha256(&file, &dir.path().join("no-such-folder")).unwrap().1, expected);
        assert!(!dir.path().join("no-such-folder").exists());
        let missing = size_and_sha256(&dir.path().join("gone.bin"), dir.path()).unwrap_err().to_string();
        assert!(missing.contains("gone.bin"), "{missing}");
    }
}
