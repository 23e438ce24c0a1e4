//! Loading a Hugging Face BLIP-2 checkpoint into the burn modules (method.md section 1, "Weights"
//! and "Tensor names").
//!
//! The files are `model.safetensors`, or shards `model-0000X-of-0000N.safetensors` listed by
//! `model.safetensors.index.json`; they are memory-mapped and each tensor is converted to f32 (from
//! f32, f16, bf16 or f64 storage), then to the run dtype, only when its parameter is loaded, so
//! peak host memory stays near one copy of the weights. No `__metadata__` header is required.
//!
//! The Rust field paths of the modules are the HF names, so a module path maps to its tensor name
//! through the short [`RENAMES`] table. Loading walks every parameter of the module (a burn
//! [`ModuleMapper`]); a tensor that is missing, mis-shaped or of an unsupported dtype becomes an
//! [`Error::Weights`] naming it, with expected and found shapes. Nothing falls back to random init,
//! and completeness is judged by this walk, not by burn-store's `unused` list. Linear weights need
//! no transposition here: the modules use burn's `LinearLayout::Col`, whose parameters have the
//! PyTorch `[out, in]` shape.
//!
//! [`save_module`] is the inverse walk: it writes every parameter under its HF name, so a model
//! built in Rust (e.g. with random weights for `qpert bench`) becomes a model folder `load` reads.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use memmap2::Mmap;
#[cfg(unix)]
use memmap2::UncheckedAdvice;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, Metadata, TensorView};

use crate::error::{Error, Result};

/// qpert module path -> HF tensor name, as fragments with their surrounding dots. Anything not
/// listed maps 1:1.
pub const RENAMES: &[(&str, &str)] = &[
    (".layer_norm.", ".LayerNorm."), // BERT capitalisation; Rust field names are snake_case
    (".gamma.", ".weight."),         // burn's LayerNorm calls its scale `gamma`
    (".beta.", ".bias."),            // ... and its shift `beta`
];

/// The HF tensor name of a module parameter path, e.g.
/// `qformer.encoder.layer.0.output.layer_norm.gamma` -> `qformer.encoder.layer.0.output.LayerNorm.weight`.
pub fn hf_name(module_path: &str) -> String {
    let mut name = format!(".{module_path}.");
    for (from, to) in RENAMES {
        name = name.replace(from, to);
    }
    name.trim_matches('.').to_string()
}

/// The fused vision qkv bias of older exports, which store `self_attn.q_bias` and
/// `self_attn.v_bias` only: `concat(q_bias, zeros, v_bias)` (the key projection has no bias).
pub fn fuse_qkv_bias(q_bias: &[f32], v_bias: &[f32]) -> Vec<f32> {
    let mut fused = Vec::with_capacity(q_bias.len() * 2 + v_bias.len());
    fused.extend_from_slice(q_bias);
    fused.extend(std::iter::repeat_n(0.0, q_bias.len()));
    fused.extend_from_slice(v_bias);
    fused
}

/// Converts little-endian safetensors storage to f32; `None` for dtypes that are not floats.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        _ => return None,
    })
}

/// One memory-mapped safetensors file and its parsed header.
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl MappedFile {
    fn open(path: PathBuf) -> Result<Self> {
        let file = File::open(&path).map_err(|e| Error::weights(&path, format!("cannot open: {e}")))?;
        // SAFETY: the mapping is read-only and lives as long as `self`; like every safetensors
        // reader we assume the checkpoint is not modified while it is being loaded.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::weights(&path, format!("cannot map: {e}")))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::weights(&path, format!("not a valid safetensors file: {e:?}")))?;
        Ok(Self { path, mmap, header_len, metadata })
    }
}

/// A tensor read from the checkpoint, converted to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// The safetensors files of a model folder, memory-mapped, with a name -> file index.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    index: HashMap<String, usize>,
}

/// `model.safetensors.index.json`; only `weight_map` is read.
#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn open(model_dir: &Path) -> Result<Self> {
        let single = model_dir.join("model.safetensors");
        let index_path = model_dir.join("model.safetensors.index.json");
        let paths = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| Error::weights(&index_path, format!("cannot read: {e}")))?;
            let shard_index: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| Error::weights(&index_path, format!("malformed shard index: {e}")))?;
            let mut shards: Vec<&String> = shard_index.weight_map.values().collect();
            shards.sort();
            shards.dedup();
            let mut paths = Vec::with_capacity(shards.len());
            for shard in shards {
                let path = model_dir.join(shard);
                if !path.is_file() {
                    return Err(Error::weights(&path, format!("shard listed in {} is missing", index_path.display())));
                }
                paths.push(path);
            }
            paths
        } else {
            return Err(Error::weights(
                &single,
                "no model.safetensors and no model.safetensors.index.json in the model folder",
            ));
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = MappedFile::open(path)?;
            for name in file.metadata.tensors().into_keys() {
                index.insert(name, files.len());
            }
            files.push(file);
        }
        Ok(Self { dir: model_dir.to_path_buf(), files, index })
    }

    /// The file holding `name`, or the default file name for errors about absent tensors.
    fn file_of(&self, name: &str) -> PathBuf {
        match self.index.get(name) {
            Some(&i) => self.files[i].path.clone(),
            None if self.files.len() == 1 => self.files[0].path.clone(),
            None => self.dir.join("model.safetensors.index.json"),
        }
    }

    /// Reads `name` as f32; `Ok(None)` when the checkpoint does not hold it.
    pub fn read(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let file = &self.files[i];
        let bad = |msg: String| Error::weights(&file.path, format!("tensor `{name}`: {msg}"));
        let info = file.metadata.info(name).ok_or_else(|| bad("not in the header".into()))?;
        let start = 8 + file.header_len + info.data_offsets.0;
        let end = 8 + file.header_len + info.data_offsets.1;
        let bytes = file.mmap.get(start..end).ok_or_else(|| bad("data lies outside the file".into()))?;
        let values = to_f32(info.dtype, bytes)
            .ok_or_else(|| bad(format!("dtype {:?} is not a float type (f32, f16, bf16, f64)", info.dtype)))?;
        // The converted copy is all we keep: let the kernel drop the mapped pages now, so that peak
        // memory while loading stays near one copy of the weights instead of two.
        // SAFETY: the map is read-only and shared; dropped pages are re-read from the file if touched.
        #[cfg(unix)]
        let _ = unsafe { file.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
        if values.len() != info.shape.iter().product::<usize>() {
            return Err(bad(format!("{} values for shape {:?}", values.len(), info.shape)));
        }
        Ok(Some(HostTensor { shape: info.shape.clone(), values }))
    }

    /// Reads the tensor for HF name `name`, expected of shape `expected`; older-layout fallbacks
    /// (the fused vision qkv bias) are resolved here.
    fn read_expected(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let tensor = match self.read(name)? {
            Some(tensor) => tensor,
            None => match name.strip_suffix("qkv.bias") {
                Some(prefix) => self.read_split_qkv_bias(prefix, name, expected)?,
                None => return Err(self.missing(name, expected)),
            },
        };
        if tensor.shape != expected {
            return Err(Error::weights(
                self.file_of(name),
                format!("tensor `{name}`: expected shape {expected:?}, found {:?}", tensor.shape),
            ));
        }
        Ok(tensor)
    }

    /// `<prefix>q_bias` + `<prefix>v_bias` fused into the qkv bias of shape `expected` ([3 Dv]).
    fn read_split_qkv_bias(&self, prefix: &str, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let width = expected.first().copied().unwrap_or(0) / 3;
        let mut parts = Vec::with_capacity(2);
        for part in ["q_bias", "v_bias"] {
            let part_name = format!("{prefix}{part}");
            let tensor = self.read(&part_name)?.ok_or_else(|| self.missing(name, expected))?;
            if tensor.shape != [width] {
                return Err(Error::weights(
                    self.file_of(&part_name),
                    format!("tensor `{part_name}`: expected shape [{width}], found {:?}", tensor.shape),
                ));
            }
            parts.push(tensor.values);
        }
        Ok(HostTensor { shape: expected.to_vec(), values: fuse_qkv_bias(&parts[0], &parts[1]) })
    }

    fn missing(&self, name: &str, expected: &[usize]) -> Error {
        Error::weights(self.file_of(name), format!("missing tensor `{name}` (expected shape {expected:?})"))
    }
}

/// The mapper that replaces each parameter with its checkpoint tensor.
struct CheckpointMapper<'a> {
    checkpoint: &'a Checkpoint,
    device: Device,
    dtype: FloatDType,
    path: Vec<String>,
    errors: Vec<Error>,
}

impl ModuleMapper for CheckpointMapper<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = hf_name(&self.path.join("."));
        let expected = param.lazy_shape().to_vec();
        match self.checkpoint.read_expected(&name, &expected) {
            Ok(host) => {
                let dtype = DType::from(self.dtype);
                let data = TensorData::new(host.values, host.shape).convert_dtype(dtype);
                let tensor = Tensor::<D>::from_data(data, (&self.device, dtype));
                let id = param.id;
                param.transform_for_load(tensor, id)
            }
            Err(e) => {
                self.errors.push(e);
                param
            }
        }
    }
}

/// Replaces every float parameter of `module` with the tensor of the same (HF) name in the
/// checkpoint, converted on the host to `dtype` (whatever the stored dtype) before it goes to
/// `device`. All problems are collected; the first is returned, its message counting the rest.
pub fn load_module<M: Module>(module: M, checkpoint: &Checkpoint, device: &Device, dtype: FloatDType) -> Result<M> {
    let mut mapper =
        CheckpointMapper { checkpoint, device: device.clone(), dtype, path: Vec::new(), errors: Vec::new() };
    let module = module.map(&mut mapper);
    let mut errors = mapper.errors.into_iter();
    match errors.next() {
        None => Ok(module),
        Some(first) => {
            let more = errors.len();
            if more == 0 {
                return Err(first);
            }
            Err(match first {
                Error::Weights { path, msg } => {
                    Error::Weights { path, msg: format!("{msg} (and {more} more weight errors)") }
                }
                other => other,
            })
        }
    }
}

/// The visitor that collects every float parameter as (HF name, shape, little-endian f32 bytes).
struct TensorCollector {
    path: Vec<String>,
    tensors: Vec<(String, Vec<usize>, Vec<u8>)>,
}

impl ModuleVisitor for TensorCollector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // The saved form: burn's `LinearLayout::Col` weights are stored `[out, in]`, as in HF.
        let tensor = param.transform_for_save().val();
        let shape = tensor.dims().to_vec();
        let values = tensor.into_data().try_into_vec_as::<f32>().expect("float parameters read back as f32");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.push((hf_name(&self.path.join(".")), shape, bytes));
    }
}

/// Writes every float parameter of `module` to `path` as an f32 safetensors file, under the HF
/// names [`load_module`] reads (no `__metadata__`).
pub fn save_module<M: Module>(module: &M, path: &Path) -> Result<()> {
    let mut collector = TensorCollector { path: Vec::new(), tensors: Vec::new() };
    module.visit(&mut collector);
    let views = collector
        .tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::weights(path, format!("tensor `{name}`: {e:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| Error::weights(path, format!("cannot write: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_map_module_paths_to_hf_names() {
        assert_eq!(
            hf_name("qformer.encoder.layer.0.attention.output.layer_norm.gamma"),
            "qformer.encoder.layer.0.attention.output.LayerNorm.weight"
        );
        assert_eq!(hf_name("qformer.layernorm.beta"), "qformer.layernorm.bias");
        assert_eq!(
            hf_name("vision_model.encoder.layers.3.layer_norm1.gamma"),
            "vision_model.encoder.layers.3.layer_norm1.weight"
        );
        assert_eq!(hf_name("query_tokens"), "query_tokens");
        assert_eq!(hf_name("itm_head.weight"), "itm_head.weight");
    }

    #[test]
    fn qkv_bias_is_q_zeros_v() {
        assert_eq!(fuse_qkv_bias(&[1.0, 2.0], &[3.0, 4.0]), vec![1.0, 2.0, 0.0, 0.0, 3.0, 4.0]);
    }

    #[test]
    fn half_storage_converts_to_f32() {
        let values = [1.5f32, -2.25, 0.0];
        let f16: Vec<u8> = values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let bf16: Vec<u8> = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let f32s: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(to_f32(Dtype::F16, &f16).unwrap(), values);
        assert_eq!(to_f32(Dtype::BF16, &bf16).unwrap(), values);
        assert_eq!(to_f32(Dtype::F32, &f32s).unwrap(), values);
        assert_eq!(to_f32(Dtype::I64, &f32s), None);
    }
}
