//! Shared helpers for the parity tests: loading the committed reference fixtures
//! (`tests/fixtures/tiny_blip2_*`, written by `tools/make_fixtures.py`) and comparing values.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

use safetensors::SafeTensors;

/// One tiny model's fixture folder.
pub struct Fixture {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    pub qpert_json: serde_json::Value,
    reference: Vec<u8>,
    qpert: Vec<u8>,
}

impl Fixture {
    pub fn load(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()));
        let json = |f: &str| serde_json::from_slice(&read(f)).unwrap();
        Fixture {
            config: json("config.json"),
            qpert_json: json("qpert.json"),
            reference: read("reference.safetensors"),
            qpert: read("qpert.safetensors"),
            dir,
        }
    }

    fn tensor<'a>(bytes: &'a [u8], name: &str) -> safetensors::tensor::TensorView<'a> {
        SafeTensors::deserialize(bytes).unwrap().tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn f32s(bytes: &[u8], name: &str) -> Vec<f32> {
        let t = Self::tensor(bytes, name);
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn i64s(bytes: &[u8], name: &str) -> Vec<i64> {
        let t = Self::tensor(bytes, name);
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
        t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    /// An f32 tensor of `reference.safetensors`.
    pub fn reference(&self, name: &str) -> Vec<f32> {
        Self::f32s(&self.reference, name)
    }

    /// An i64 tensor of `reference.safetensors`.
    pub fn reference_i64(&self, name: &str) -> Vec<i64> {
        Self::i64s(&self.reference, name)
    }

    /// The shape of a tensor of `reference.safetensors`.
    pub fn reference_shape<const D: usize>(&self, name: &str) -> [usize; D] {
        Self::tensor(&self.reference, name).shape().try_into().unwrap()
    }

    /// An f32 tensor of `qpert.safetensors`.
    pub fn qpert(&self, name: &str) -> Vec<f32> {
        Self::f32s(&self.qpert, name)
    }

    /// An i64 tensor of `qpert.safetensors`.
    pub fn qpert_i64(&self, name: &str) -> Vec<i64> {
        Self::i64s(&self.qpert, name)
    }

    /// A u8 tensor of `qpert.safetensors`.
    pub fn qpert_u8(&self, name: &str) -> Vec<u8> {
        Self::tensor(&self.qpert, name).data().to_vec()
    }

    /// The shape of a tensor of `qpert.safetensors`.
    pub fn qpert_shape<const D: usize>(&self, name: &str) -> [usize; D] {
        Self::tensor(&self.qpert, name).shape().try_into().unwrap()
    }
}

/// Asserts `got` equals `want` element-wise within `tol` absolute, naming the worst element.
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (worst, err) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold((0, 0f32), |(bi, be), (i, e)| if e > be || e.is_nan() { (i, e) } else { (bi, be) });
    assert!(err <= tol, "{what}: max |diff| {err} at {worst} (got {}, want {}) > {tol}", got[worst], want[worst]);
}
