//! Input preprocessing against the Python reference (`method.md` §2): Pillow decode and BICUBIC
//! resize, HF `BlipImageProcessor` pixel values, HF `BertTokenizer` ids, and bad-input errors.
//!
//! Fixtures come from `tools/make_preprocess_fixtures.py` (Pillow 13.0.0, transformers 5.24.0);
//! see `tests/fixtures/preprocess/manifest.json`.

use std::path::{Path, PathBuf};

use qpert::Error;
use qpert::data::image::{
    decode_rgb, pixel_values, preprocess_batch, preprocess_image, resize_bicubic, resize_bicubic_to,
};
use qpert::data::tokenizer::{CaptionTokenizer, MAX_LEN};
use serde_json::Value;
use sha2::{Digest, Sha256};

const PHOTOS: [&str; 5] = ["astronaut", "camera", "chelsea", "coffee", "rocket"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("preprocess/manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest.json parses")
}

fn photo(name: &str) -> PathBuf {
    fixtures().join(format!("images/{name}.jpg"))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// (max, mean) absolute difference in uint8 levels.
fn level_diff(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let max = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
    let sum: u64 = a.iter().zip(b).map(|(x, y)| u64::from(x.abs_diff(*y))).sum();
    (max, sum as f64 / a.len().max(1) as f64)
}

#[test]
fn decode_equals_pillow_on_photos() {
    let m = manifest();
    for name in PHOTOS {
        let img = decode_rgb(&photo(name)).unwrap();
        let e = &m["photos"][name];
        assert_eq!(
            (u64::from(img.width()), u64::from(img.height())),
            (e["width"].as_u64().unwrap(), e["height"].as_u64().unwrap()),
            "{name}"
        );
        assert_eq!(
            sha256_hex(img.as_raw()),
            e["rgb_sha256"].as_str().unwrap(),
            "{name}: decoded RGB differs from Pillow"
        );
    }
}

#[test]
fn decode_equals_pillow_on_other_modes() {
    // Palette, alpha, 1-bit, 16-bit grey PNGs; CMYK, grey, progressive and subsampled JPEGs.
    let m = manifest();
    for (case, e) in m["decode_cases"].as_object().unwrap() {
        let path = fixtures().join("preprocess").join(e["file"].as_str().unwrap());
        let img = decode_rgb(&path).unwrap_or_else(|err| panic!("{case}: {err}"));
        assert_eq!(sha256_hex(img.as_raw()), e["rgb_sha256"].as_str().unwrap(), "{case} (Pillow mode {})", e["mode"]);
    }
}

#[test]
fn resize_equals_pillow_bicubic() {
    let m = manifest();
    for name in PHOTOS {
        let img = decode_rgb(&photo(name)).unwrap();
        for (size, e) in m["photos"][name]["resized"].as_object().unwrap() {
            let r = resize_bicubic(&img, size.parse().unwrap());
            if let Some(png) = e["png"].as_str() {
                let pil = image::open(fixtures().join("preprocess").join(png)).unwrap().to_rgb8();
                let (max, mean) = level_diff(r.as_raw(), pil.as_raw());
                assert_eq!(max, 0, "{name} at {size}: max diff {max}, mean {mean}");
            }
            assert_eq!(sha256_hex(r.as_raw()), e["sha256"].as_str().unwrap(), "{name} at {size}");
        }
    }
}

#[test]
fn resize_equals_pillow_on_other_paths() {
    // Vertical pass first (tall sources), upscaling, mixed up/down scaling, non-square targets.
    let m = manifest();
    for case in m["resize_cases"].as_array().unwrap() {
        let mut img = decode_rgb(&fixtures().join(case["source"].as_str().unwrap())).unwrap();
        if case["transpose"].as_bool().unwrap() {
            img = image::RgbImage::from_fn(img.height(), img.width(), |x, y| *img.get_pixel(y, x));
        }
        if let Some(c) = case["crop"].as_array() {
            let c: Vec<u32> = c.iter().map(|v| v.as_u64().unwrap() as u32).collect();
            img = image::imageops::crop_imm(&img, c[0], c[1], c[2] - c[0], c[3] - c[1]).to_image();
        }
        let dims = |k: &str| (case[k][0].as_u64().unwrap() as u32, case[k][1].as_u64().unwrap() as u32);
        assert_eq!((img.width(), img.height()), dims("in"));
        let (w, h) = dims("out");
        let r = resize_bicubic_to(&img, w, h);
        assert_eq!(sha256_hex(r.as_raw()), case["sha256"].as_str().unwrap(), "{case}");
    }
}

#[test]
fn pixel_values_equal_hf_blip_image_processor() {
    let m = manifest();
    let pv = &m["pixel_values"];
    let size = pv["size"].as_u64().unwrap() as u32;
    let bytes = std::fs::read(fixtures().join("preprocess").join(pv["file"].as_str().unwrap())).unwrap();
    let expected: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let path = photo(pv["image"].as_str().unwrap());
    let ours = pixel_values(&resize_bicubic(&decode_rgb(&path).unwrap(), size));
    assert_eq!(ours.len(), expected.len());
    let max = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max <= 1e-6, "max |diff| {max}");
    // In fact the arithmetic is the same, so the values are bit-identical.
    assert_eq!(ours, expected);
    assert_eq!(preprocess_image(&path, size).unwrap(), expected);
}

#[test]
fn pixel_values_at_364_equal_hf_bitwise() {
    let m = manifest();
    let paths: Vec<PathBuf> = PHOTOS.iter().map(|n| photo(n)).collect();
    for (name, pv) in PHOTOS.iter().zip(preprocess_batch(&paths, 364)) {
        let bytes: Vec<u8> = pv.unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(sha256_hex(&bytes), m["pixel_values"]["sha256_at_364"][name].as_str().unwrap(), "{name}");
    }
}

#[test]
fn batch_keeps_order_and_reports_each_failure() {
    let missing = fixtures().join("images/no-such-photo.jpg");
    let paths = vec![photo("chelsea"), missing.clone(), photo("camera")];
    let out = preprocess_batch(&paths, 42);
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].as_ref().unwrap(), &preprocess_image(&paths[0], 42).unwrap());
    assert!(matches!(&out[1], Err(Error::Input { path, .. }) if *path == missing));
    assert_eq!(out[2].as_ref().unwrap().len(), 3 * 42 * 42);
}

fn assert_input_error(path: &Path, needle: &str) {
    let err = decode_rgb(path).err().unwrap_or_else(|| panic!("{} decoded", path.display()));
    match &err {
        Error::Input { path: p, .. } => assert_eq!(p, path),
        other => panic!("expected Error::Input, got {other:?}"),
    }
    let line = err.to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(line.starts_with(&path.display().to_string()), "{line}");
    assert!(line.contains(needle), "{line}");
}

#[test]
fn trailing_bytes_after_jpeg_are_ignored_like_pillow() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = std::fs::read(photo("chelsea")).unwrap();
    data.extend_from_slice(b"trailing garbage");
    let path = dir.path().join("trailing.jpg");
    std::fs::write(&path, &data).unwrap();
    assert_eq!(decode_rgb(&path).unwrap(), decode_rgb(&photo("chelsea")).unwrap());
}

#[test]
fn bad_images_are_input_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_input_error(&dir.path().join("missing.jpg"), "no such file");

    let data = std::fs::read(photo("astronaut")).unwrap();
    let truncated = dir.path().join("truncated.jpg");
    std::fs::write(&truncated, &data[..data.len() / 2]).unwrap();
    assert_input_error(&truncated, "JPEG truncated");

    // Pillow also refuses a JPEG that lacks only its EOI marker, and a truncated progressive one.
    let no_eoi = dir.path().join("no_eoi.jpg");
    std::fs::write(&no_eoi, &data[..data.len() - 2]).unwrap();
    assert_input_error(&no_eoi, "JPEG truncated");
    let prog = std::fs::read(fixtures().join("preprocess/decode/jpeg_progressive.jpg")).unwrap();
    let prog_cut = dir.path().join("progressive_cut.jpg");
    std::fs::write(&prog_cut, &prog[..prog.len() / 2]).unwrap();
    assert_input_error(&prog_cut, "JPEG truncated");

    // A header claiming 65000 x 65000 pixels: refused before allocating, like Pillow's bomb check.
    let mut bomb = data.clone();
    let sof = bomb.windows(2).position(|w| w == [0xFF, 0xC0] || w == [0xFF, 0xC2]).expect("SOF marker");
    bomb[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
    let bomb_path = dir.path().join("bomb.jpg");
    std::fs::write(&bomb_path, &bomb).unwrap();
    assert_input_error(&bomb_path, "too large");

    let text = dir.path().join("notes.jpg");
    std::fs::write(&text, "this is not a picture\n").unwrap();
    assert_input_error(&text, "not an image");

    let header_only = dir.path().join("header.jpg");
    std::fs::write(&header_only, &data[..200]).unwrap();
    assert_input_error(&header_only, "JPEG");

    let garbage = dir.path().join("garbage.jpg");
    let mut g = vec![0xFF, 0xD8, 0xFF, 0xE0];
    g.extend(std::iter::repeat_n(0x5Au8, 500));
    std::fs::write(&garbage, &g).unwrap();
    assert_input_error(&garbage, "JPEG");

    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    assert_input_error(&empty, "not an image");

    let png = std::fs::read(fixtures().join("preprocess/decode/png_rgb.png")).unwrap();
    let bad_png = dir.path().join("truncated.png");
    std::fs::write(&bad_png, &png[..png.len() / 2]).unwrap();
    assert_input_error(&bad_png, "PNG");
}

#[test]
fn tokenizer_equals_hf_bert_tokenizer() {
    let tok = CaptionTokenizer::from_model_dir(&fixtures().join("preprocess")).unwrap();
    assert_eq!(tok.token_id("[DEC]"), Some(30522));
    assert_eq!(tok.vocab_size(), 30523);
    let text = std::fs::read_to_string(fixtures().join("preprocess/tokens.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    // The generator found the three Python tokenizers (LAVIS's pure-Python one, transformers 5,
    // tokenizers' BertWordPieceTokenizer) in agreement on every case.
    assert_eq!(fixture["disagreements"].as_array().map(Vec::len), Some(0));
    let cases = fixture["cases"].as_array().unwrap();
    let captions: Vec<String> = cases.iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    let batch = tok.encode(&captions).unwrap();
    assert_eq!((batch.n(), batch.len), (cases.len(), MAX_LEN));
    for (i, c) in cases.iter().enumerate() {
        let ids: Vec<i32> = c["input_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
        let mask: Vec<u8> = c["attention_mask"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
        assert_eq!(batch.ids(i), ids.as_slice(), "ids of {:?} (HF tokens {})", captions[i], c["tokens"]);
        assert_eq!(batch.mask(i), mask.as_slice(), "mask of {:?}", captions[i]);
    }
    // Empty batch is fine.
    assert_eq!(tok.encode(&[]).unwrap().n(), 0);
}

#[test]
fn tokenizer_prefers_tokenizer_json_and_names_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    // A malformed tokenizer.json is an error naming it, not a fallback to vocab.txt.
    std::fs::copy(fixtures().join("preprocess/vocab.txt"), dir.path().join("vocab.txt")).unwrap();
    let json = dir.path().join("tokenizer.json");
    std::fs::write(&json, "{ not json").unwrap();
    let err = CaptionTokenizer::from_model_dir(dir.path()).err().expect("malformed tokenizer.json must fail");
    assert!(matches!(&err, Error::Weights { path, .. } if *path == json), "{err:?}");
    assert!(!err.to_string().contains('\n'));

    let empty = tempfile::tempdir().unwrap();
    let err = CaptionTokenizer::from_model_dir(empty.path()).err().expect("missing vocab.txt must fail");
    assert!(matches!(&err, Error::Weights { path, .. } if *path == empty.path().join("vocab.txt")), "{err:?}");
}

/// Differences of the alternatives we did not choose, and speed. Run with
/// `cargo test --test preprocess -- --ignored --nocapture report`.
#[test]
#[ignore = "prints measurements; not a check"]
fn report_alternatives_and_speed() {
    let m = manifest();
    for name in PHOTOS {
        let path = photo(name);
        let ours = decode_rgb(&path).unwrap();
        let zune = image::open(&path).unwrap().to_rgb8();
        let (dmax, dmean) = level_diff(zune.as_raw(), ours.as_raw());
        print!("{name}: image-crate JPEG decode vs Pillow: max {dmax} mean {dmean:.4}");
        for size in [364u32, 224, 56, 42] {
            let pil = resize_bicubic(&ours, size);
            assert_eq!(
                sha256_hex(pil.as_raw()),
                m["photos"][name]["resized"][size.to_string()]["sha256"].as_str().unwrap()
            );
            let cr = image::imageops::resize(&ours, size, size, image::imageops::FilterType::CatmullRom);
            let (max, mean) = level_diff(cr.as_raw(), pil.as_raw());
            print!(" | CatmullRom@{size}: max {max} mean {mean:.3}");
        }
        println!();
    }
    let reps = 10;
    for name in PHOTOS {
        let path = photo(name);
        let t = std::time::Instant::now();
        for _ in 0..reps {
            std::hint::black_box(resize_bicubic(&decode_rgb(&path).unwrap(), 364));
        }
        println!(
            "{name}: decode+resize@364 {:.2} ms (this build profile)",
            t.elapsed().as_secs_f64() * 1e3 / reps as f64
        );
    }
}
