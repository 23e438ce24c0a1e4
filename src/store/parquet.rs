//! Parquet files as qpert writes and reads them: zstd-compressed, the Arrow schema embedded (so
//! DuckDB, polars and pyarrow see the exact types), row groups bounded to about
//! [`ROW_GROUP_BYTES`] of Arrow data, and the stage's fingerprint in the key-value metadata
//! ([`FINGERPRINT_KEY`] and friends) so that a single file says what produced it.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::commit::write_atomically;
use super::manifest::Fingerprint;
use crate::error::{Error, Result};

/// Key-value metadata key holding the producing stage's fingerprint digest.
pub const FINGERPRINT_KEY: &str = "qpert.fingerprint";
/// Key-value metadata key holding the fingerprint's entries as a JSON object.
pub const FINGERPRINT_ENTRIES_KEY: &str = "qpert.fingerprint_entries";
/// Key-value metadata key holding the producing stage's name.
pub const STAGE_KEY: &str = "qpert.stage";
/// Key-value metadata key holding the qpert version that wrote the file.
pub const VERSION_KEY: &str = "qpert.version";

/// Target size of one row group, in bytes of Arrow data; wide rows (feature vectors) get fewer rows.
pub const ROW_GROUP_BYTES: usize = 64 << 20;
/// Upper bound on rows per row group, whatever the row width.
pub const ROW_GROUP_MAX_ROWS: usize = 1 << 16;

/// Writes `batches` (all of `schema`) to `path` atomically, with `metadata` as key-value metadata.
/// Returns the number of rows written.
pub fn write_parquet(
    path: &Path,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    metadata: &BTreeMap<String, String>,
) -> Result<u64> {
    let props = writer_properties(batches, metadata);
    let pq = |e: parquet::errors::ParquetError| Error::artifact(path, e);
    write_atomically(path, |out| {
        let mut writer = ArrowWriter::try_new(out, schema.clone(), Some(props)).map_err(pq)?;
        for batch in batches {
            writer.write(batch).map_err(pq)?;
        }
        writer.close().map_err(pq)?;
        // The temporary file is complete but not yet in place: where tests kill a run mid-write.
        fail::fail_point!("write-parquet");
        Ok(())
    })?;
    Ok(batches.iter().map(|b| b.num_rows() as u64).sum())
}

fn writer_properties(batches: &[RecordBatch], metadata: &BTreeMap<String, String>) -> WriterProperties {
    let kv = metadata.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect();
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_size(row_group_rows(batches))
        .set_key_value_metadata(Some(kv))
        .build()
}

/// Rows per row group so that one group holds about [`ROW_GROUP_BYTES`] of Arrow data.
fn row_group_rows(batches: &[RecordBatch]) -> usize {
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let bytes: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
    let per_row = bytes.checked_div(rows).unwrap_or(1).max(1);
    (ROW_GROUP_BYTES / per_row).clamp(1, ROW_GROUP_MAX_ROWS)
}

/// Reads a whole Parquet file as one record batch.
pub fn read_parquet(path: &Path) -> Result<RecordBatch> {
    let pq = |e: parquet::errors::ParquetError| Error::artifact(path, format!("not a readable Parquet file: {e}"));
    let file = open(path)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq)?;
    let schema = builder.schema().clone();
    let batches = builder
        .build()
        .map_err(pq)?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::artifact(path, e))?;
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| Error::artifact(path, e))
}

/// What a Parquet file's footer says, read without touching its data pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// The key-value metadata (the stage fingerprint and friends for qpert's files).
    pub metadata: BTreeMap<String, String>,
    /// The number of rows the file holds.
    pub rows: u64,
}

impl Footer {
    /// The fingerprint digest of the stage that wrote the file, if it says.
    pub fn fingerprint(&self) -> Option<&str> {
        self.metadata.get(FINGERPRINT_KEY).map(String::as_str)
    }

    /// The whole fingerprint (its entries) of the stage that wrote the file, if it says, so that
    /// `status` can tell what differs.
    pub fn fingerprint_entries(&self) -> Option<Fingerprint> {
        let json = self.metadata.get(FINGERPRINT_ENTRIES_KEY)?;
        serde_json::from_str(json).ok().map(Fingerprint::from_entries)
    }
}

/// Reads only the footer of a Parquet file: cheap, so checking that an artifact is intact costs
/// no data read.
pub fn read_footer(path: &Path) -> Result<Footer> {
    let reader = SerializedFileReader::new(open(path)?)
        .map_err(|e| Error::artifact(path, format!("not a readable Parquet file: {e}")))?;
    let file_metadata = reader.metadata().file_metadata();
    let kv = file_metadata.key_value_metadata().cloned().unwrap_or_default();
    Ok(Footer {
        metadata: kv.into_iter().filter_map(|KeyValue { key, value }| Some((key, value?))).collect(),
        rows: file_metadata.num_rows().max(0) as u64,
    })
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::artifact(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float32Array, UInt32Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn batch(values: &[u32]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("idx", DataType::UInt32, false),
            Field::new("score", DataType::Float32, false),
        ]));
        let scores: Vec<f32> = values.iter().map(|&v| v as f32 / 2.0).collect();
        RecordBatch::try_new(
            schema,
            vec![Arc::new(UInt32Array::from(values.to_vec())), Arc::new(Float32Array::from(scores))],
        )
        .unwrap()
    }

    #[test]
    fn round_trips_batches_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let (a, b) = (batch(&[1, 2]), batch(&[3]));
        let meta = BTreeMap::from([(FINGERPRINT_KEY.to_string(), "abc".to_string())]);
        assert_eq!(write_parquet(&path, &a.schema(), &[a.clone(), b], &meta).unwrap(), 3);
        let back = read_parquet(&path).unwrap();
        assert_eq!(back.num_rows(), 3);
        assert_eq!(back.schema().fields(), a.schema().fields());
        assert_eq!(back.schema().metadata()[FINGERPRINT_KEY], "abc", "key-value metadata shows in the Arrow schema");
        let footer = read_footer(&path).unwrap();
        assert_eq!((footer.fingerprint(), footer.rows), (Some("abc"), 3));
    }

    #[test]
    fn row_groups_are_bounded() {
        assert_eq!(row_group_rows(&[]), ROW_GROUP_MAX_ROWS);
        assert!(row_group_rows(&[batch(&[1, 2, 3])]) <= ROW_GROUP_MAX_ROWS);
    }
}
