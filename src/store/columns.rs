//! Building artifact tables, and typed access to their columns with errors that name the file and
//! the column, so a table written by another version (or edited by hand) fails clearly instead of
//! panicking on a downcast.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, BooleanArray, FixedSizeListArray, Float32Array, Float64Array, PrimitiveArray,
    StringArray, UInt32Array,
};
use arrow::datatypes::{Field, Float32Type, Int32Type, Schema, UInt8Type};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};

/// A table read from `path` (a stage folder or file), for typed column access.
pub struct Table<'a> {
    pub batch: &'a RecordBatch,
    pub path: &'a Path,
}

impl<'a> Table<'a> {
    /// Wraps `batch`, read from `path`.
    pub fn new(batch: &'a RecordBatch, path: &'a Path) -> Self {
        Table { batch, path }
    }

    fn column<T: Array + 'static>(&self, name: &str, kind: &str) -> Result<&'a T> {
        let column =
            self.batch.column_by_name(name).ok_or_else(|| Error::artifact(self.path, format!("no column `{name}`")))?;
        if column.null_count() > 0 && kind != "nullable" {
            return Err(Error::artifact(self.path, format!("column `{name}` has nulls")));
        }
        column.as_any().downcast_ref::<T>().ok_or_else(|| {
            Error::artifact(self.path, format!("column `{name}` is {}, expected {kind}", column.data_type()))
        })
    }

    /// A non-null uint32 column.
    pub fn u32s(&self, name: &str) -> Result<&'a [u32]> {
        Ok(self.column::<UInt32Array>(name, "uint32")?.values())
    }

    /// A non-null float32 column.
    pub fn f32s(&self, name: &str) -> Result<&'a [f32]> {
        Ok(self.column::<Float32Array>(name, "float32")?.values())
    }

    /// A non-null float64 column.
    pub fn f64s(&self, name: &str) -> Result<&'a [f64]> {
        Ok(self.column::<Float64Array>(name, "float64")?.values())
    }

    /// A non-null utf8 column.
    pub fn strings(&self, name: &str) -> Result<&'a StringArray> {
        self.column::<StringArray>(name, "utf8")
    }

    /// A non-null boolean column, as a vector.
    pub fn bools(&self, name: &str) -> Result<Vec<bool>> {
        Ok(self.column::<BooleanArray>(name, "bool")?.values().iter().collect())
    }

    /// A FixedSizeList<float32, width> column as one row-major slice.
    pub fn f32_rows(&self, name: &str, width: usize) -> Result<&'a [f32]> {
        self.list_rows::<Float32Type>(name, width)
    }

    /// A FixedSizeList<int32, width> column as one row-major slice.
    pub fn i32_rows(&self, name: &str, width: usize) -> Result<&'a [i32]> {
        self.list_rows::<Int32Type>(name, width)
    }

    /// A FixedSizeList<uint8, width> column as one row-major slice.
    pub fn u8_rows(&self, name: &str, width: usize) -> Result<&'a [u8]> {
        self.list_rows::<UInt8Type>(name, width)
    }

    fn list_rows<T: ArrowPrimitiveType>(&self, name: &str, width: usize) -> Result<&'a [T::Native]> {
        let list = self.fixed_list(name, width)?;
        let values = list.values().as_any().downcast_ref::<PrimitiveArray<T>>().ok_or_else(|| {
            Error::artifact(
                self.path,
                format!("column `{name}` holds {}, expected {}", list.value_type(), T::DATA_TYPE),
            )
        })?;
        Ok(&values.values()[list.offset() * width..(list.offset() + list.len()) * width])
    }

    fn fixed_list(&self, name: &str, width: usize) -> Result<&'a FixedSizeListArray> {
        let list = self.column::<FixedSizeListArray>(name, "fixed-size list")?;
        if list.value_length() as usize != width {
            return Err(Error::artifact(
                self.path,
                format!("column `{name}` has rows of {}, expected {width}", list.value_length()),
            ));
        }
        Ok(list)
    }

    /// Schema-level metadata value `key`, parsed as an integer.
    pub fn metadata_usize(&self, key: &str) -> Result<usize> {
        self.batch
            .schema()
            .metadata()
            .get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::artifact(self.path, format!("schema metadata `{key}` is missing or not a number")))
    }
}

/// A record batch of non-null `columns`, named in order (every artifact table is built this way).
pub fn record_batch(columns: Vec<(&str, ArrayRef)>) -> std::result::Result<RecordBatch, ArrowError> {
    record_batch_with_metadata(columns, HashMap::new())
}

/// [`record_batch`] with schema-level metadata (e.g. Q and E of the image features).
pub fn record_batch_with_metadata(
    columns: Vec<(&str, ArrayRef)>,
    metadata: HashMap<String, String>,
) -> std::result::Result<RecordBatch, ArrowError> {
    let fields: Vec<Field> = columns.iter().map(|(n, c)| Field::new(*n, c.data_type().clone(), false)).collect();
    RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(fields, metadata)),
        columns.into_iter().map(|(_, c)| c).collect(),
    )
}

/// A FixedSizeList<item, width> column over row-major `values`.
pub fn fixed_size_list(values: ArrayRef, width: usize) -> std::result::Result<ArrayRef, ArrowError> {
    let field = Arc::new(Field::new_list_field(values.data_type().clone(), false));
    Ok(Arc::new(FixedSizeListArray::try_new(field, width as i32, values, None)?))
}
