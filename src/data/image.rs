//! Image preprocessing, Pillow-exact (`method.md` §2 Inputs): decode → RGB → S x S bicubic resize
//! (uint8) → `pixel_values` (scale 1/255, CLIP mean/std, CHW f32).
//!
//! The reference is what the HF `BlipImageProcessor` (PIL backend) produces from
//! `Image.open(path).convert("RGB")`, as LAVIS loads images (no EXIF orientation is applied).
//! Every step reproduces the Pillow code bit for bit, so the vision tower sees exactly the tensors
//! the Python reference sees; `tests/preprocess.rs` checks each step against fixtures written by
//! `tools/make_preprocess_fixtures.py` (Pillow 13.0.0, libjpeg-turbo 3.2.0, transformers 5.24.0).

use std::cell::Cell;
use std::io::{BufRead, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use image::{DynamicImage, RgbImage};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// CLIP / BLIP-2 normalisation mean per RGB channel (`OPENAI_CLIP_MEAN`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP / BLIP-2 normalisation standard deviation per RGB channel (`OPENAI_CLIP_STD`).
// The digits as published (method.md, HF); they round to the same f32.
#[expect(clippy::excessive_precision, reason = "keep the published digits")]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Reads and decodes the image at `path` to 8-bit RGB exactly as `Image.open(path).convert("RGB")`.
///
/// JPEG goes through libjpeg (the `mozjpeg` crate: libjpeg-turbo's decoder with its default
/// settings, i.e. integer slow DCT and fancy upsampling, the same decoder and settings as Pillow),
/// which gives Pillow's pixels exactly. The `image` crate's pure-Rust JPEG decoder differs from it
/// by up to 6 levels (mean up to 0.24) on the test photos, enough to move features by 1e-3.
/// Other formats (PNG) go through the `image` crate, which is lossless, so only the conversion to
/// RGB has to follow Pillow: grey is replicated, alpha is dropped (not composited), palettes are
/// looked up, CMYK uses Pillow's `cmyk2rgb`.
///
/// Errors are [`Error::Input`] naming `path`: missing or unreadable file, not an image,
/// a truncated JPEG (Pillow: "image file is truncated"), corrupt data.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::input(path, io_reason(&e)))?;
    decode_rgb_bytes(path, &bytes)
}

/// [`decode_rgb`] on bytes already in memory; `path` is only used to name errors.
pub fn decode_rgb_bytes(path: &Path, bytes: &[u8]) -> Result<RgbImage> {
    // Sniff the content, not the extension, as Pillow does (JPEG's accept() is this test).
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(path, bytes);
    }
    let format = image::guess_format(bytes).map_err(|_| Error::input(path, "not an image (unrecognised format)"))?;
    let img = image::load_from_memory_with_format(bytes, format).map_err(|e| {
        let name = format.extensions_str().first().map_or_else(|| format!("{format:?}"), |x| x.to_uppercase());
        Error::input(path, format!("{name} decode failed: {e}"))
    })?;
    // The png crate turns a 16-bit grey PNG's tRNS chunk into an alpha channel; Pillow opens that
    // file as `I;16` and ignores the transparency in `convert("RGB")`. Drop the alpha, so that the
    // grey is clipped as `I;16` is, not shifted as a true 16-bit grey + alpha PNG (Pillow: RGBA).
    let img = match img {
        DynamicImage::ImageLumaA16(la) if is_png_grey16(bytes) => DynamicImage::ImageLumaA16(la).to_luma16().into(),
        other => other,
    };
    Ok(dynamic_to_rgb(img))
}

/// Whether `bytes` are a PNG whose header says 16-bit grey (bit depth 16, colour type 0).
fn is_png_grey16(bytes: &[u8]) -> bool {
    // The signature (8 bytes), the IHDR chunk's length and type (8), width and height (8), then
    // the bit depth and the colour type.
    bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.get(24..26) == Some(&[16, 0])
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        _ => format!("cannot read: {e}"),
    }
}

/// A `BufRead` over the file bytes that records whether libjpeg asked for data past the end.
///
/// The mozjpeg source manager answers end-of-data by faking an EOI marker and a warning (which it
/// silences), so a truncated JPEG would decode "successfully" with grey rows. Pillow instead fails
/// with "image file is truncated" (unless `LOAD_TRUNCATED_IMAGES`); the whole file is handed over
/// in the first fill, so any second fill means the data ran out.
struct EofTracking<'a> {
    data: &'a [u8],
    hit_eof: &'a Cell<bool>,
}

impl Read for EofTracking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.fill_buf()?.len().min(buf.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for EofTracking<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.data.is_empty() {
            self.hit_eof.set(true);
        }
        Ok(self.data)
    }
    fn consume(&mut self, amt: usize) {
        self.data = &self.data[amt.min(self.data.len())..];
    }
}

/// Pillow refuses images above twice `Image.MAX_IMAGE_PIXELS` (89,478,485) as decompression
/// bombs; so do we, before allocating.
const MAX_PIXELS: usize = 2 * 89_478_485;

/// libjpeg output before conversion to RGB.
enum JpegPixels {
    Rgb(Vec<u8>),
    Gray(Vec<u8>),
    Cmyk(Vec<u8>),
}

fn decode_jpeg(path: &Path, bytes: &[u8]) -> Result<RgbImage> {
    let hit_eof = Cell::new(false);
    let reader = EofTracking { data: bytes, hit_eof: &hit_eof };
    // libjpeg reports fatal errors by unwinding out of its callbacks (mozjpeg's error manager uses
    // `resume_unwind`, so no panic message is printed); catch it and turn it into an `Error`.
    let decoded = catch_unwind(AssertUnwindSafe(|| -> std::io::Result<(usize, usize, JpegPixels)> {
        let dec = mozjpeg::Decompress::builder().from_reader(reader)?;
        let (w, h) = dec.size();
        if w.saturating_mul(h) > MAX_PIXELS {
            return Err(std::io::Error::other(format!(
                "image too large ({w}x{h} pixels; Pillow's limit is {MAX_PIXELS})"
            )));
        }
        // libjpeg's default output colour space follows the file: YCbCr/RGB → RGB,
        // grey → grey, CMYK/YCCK → CMYK. Pillow asks for the same ("RGB", "L", "CMYK;I").
        Ok(match dec.image()? {
            mozjpeg::Format::RGB(d) => read_all(d, JpegPixels::Rgb)?,
            mozjpeg::Format::Gray(d) => read_all(d, JpegPixels::Gray)?,
            mozjpeg::Format::CMYK(d) => read_all(d, JpegPixels::Cmyk)?,
        })
    }));
    if hit_eof.get() {
        return Err(Error::input(path, "JPEG truncated"));
    }
    let (w, h, pixels) = match decoded {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(Error::input(path, format!("JPEG: {e}"))),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("libjpeg error");
            let msg = msg.strip_prefix("libjpeg fatal error: ").unwrap_or(msg);
            return Err(Error::input(path, format!("JPEG corrupt: {msg}")));
        }
    };
    let (w32, h32) = (
        u32::try_from(w).map_err(|_| Error::input(path, "JPEG too large"))?,
        u32::try_from(h).map_err(|_| Error::input(path, "JPEG too large"))?,
    );
    let rgb = match pixels {
        JpegPixels::Rgb(px) => px,
        JpegPixels::Gray(px) => gray_to_rgb(&px),
        JpegPixels::Cmyk(px) => adobe_cmyk_to_rgb(&px),
    };
    RgbImage::from_raw(w32, h32, rgb).ok_or_else(|| Error::input(path, "JPEG decode returned too few rows"))
}

/// Reads all scanlines and the rest of the file up to EOI (as Pillow does: a missing EOI is a
/// truncated file).
fn read_all<R: BufRead>(
    mut d: mozjpeg::decompress::DecompressStarted<R>,
    wrap: fn(Vec<u8>) -> JpegPixels,
) -> std::io::Result<(usize, usize, JpegPixels)> {
    let px = d.read_scanlines::<u8>()?;
    let (w, h) = (d.width(), d.height());
    d.finish()?;
    Ok((w, h, wrap(px)))
}

/// Pillow's `l2rgb`: replicate the grey level.
fn gray_to_rgb(gray: &[u8]) -> Vec<u8> {
    gray.iter().flat_map(|&v| [v, v, v]).collect()
}

/// libjpeg CMYK (Adobe polarity, i.e. inverted) → RGB as Pillow does it: the `CMYK;I` raw mode
/// inverts each channel, then `cmyk2rgb` computes `nk - nk*c/255` with its `MULDIV255` rounding.
fn adobe_cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let [c, m, y, k] = [px[0], px[1], px[2], px[3]].map(|v| 255 - i32::from(v));
        let nk = 255 - k;
        for v in [c, m, y] {
            out.push((nk - muldiv255(v, nk)).clamp(0, 255) as u8);
        }
    }
    out
}

/// `image::DynamicImage` → RGB following Pillow's `convert("RGB")` for the modes Pillow would open
/// the same file in: alpha is dropped (Pillow's `rgba2rgb`/`la2rgb`), grey replicated, 16-bit
/// colour takes the high byte (Pillow's `RGB;16B` raw mode), 16-bit grey is clipped to 255
/// (Pillow opens it as `I;16`).
///
/// Dropping alpha is what LAVIS does (`Image.open(p).convert("RGB")`). Note that the HF image
/// processors (transformers 5) instead composite transparent images onto white before converting;
/// the two differ only for images with an alpha channel or palette transparency, which do not
/// occur in COCO or Flickr30k (all JPEG).
fn dynamic_to_rgb(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let px: Vec<u8> = match img {
        DynamicImage::ImageRgb8(rgb) => return rgb,
        DynamicImage::ImageRgba8(rgba) => rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(l) => gray_to_rgb(l.as_raw()),
        DynamicImage::ImageLumaA8(la) => la.pixels().flat_map(|p| [p[0]; 3]).collect(),
        DynamicImage::ImageRgb16(rgb) => rgb.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(rgba) => {
            rgba.pixels().flat_map(|p| [p[0], p[1], p[2]].map(|v| (v >> 8) as u8)).collect()
        }
        DynamicImage::ImageLuma16(l) => l.as_raw().iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(la) => la.pixels().flat_map(|p| [(p[0] >> 8) as u8; 3]).collect(),
        other => return other.to_rgb8(),
    };
    RgbImage::from_raw(w, h, px).expect("buffer length matches dimensions")
}

/// Fixed-point precision of Pillow's 8-bit resampler (`PRECISION_BITS` in `Resample.c`):
/// 32 bits minus 8 for the result minus 2 for overflow of negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `bicubic_filter`: Catmull-Rom-like cubic convolution with a = -0.5.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Integer resampling weights for one axis: for output pixel `i`, input pixels
/// `bounds[i].0 .. bounds[i].0 + bounds[i].1` with weights `k[i * ksize ..]`.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

/// Port of Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for BICUBIC (support 2),
/// sampling the source interval `[in0, in1)` (Pillow's `box`, in f32 as there).
///
/// When downscaling, the filter is stretched by the scale (antialiasing); weights are computed
/// in f64, normalised to sum 1, then rounded half away from zero to `PRECISION_BITS` fixed point.
fn precompute_coeffs(in_size: usize, in0: f32, in1: f32, out_size: usize) -> Coeffs {
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // C's (int) truncates toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).max(0) as usize;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            *wx = bicubic(((x as i64 + xmin) as f64 - center + 0.5) * inv_filterscale);
            ww += *wx;
        }
        for (x, &wx) in w.iter().enumerate().take(n) {
            let v = if ww != 0.0 { wx / ww } else { wx };
            let fixed = v * f64::from(1u32 << PRECISION_BITS);
            k[xx * ksize + x] = if v < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
        }
        bounds.push((xmin as usize, n));
    }
    Coeffs { ksize, bounds, k }
}

/// Pillow's `clip8`: drop the fixed-point fraction (arithmetic shift) and clamp to 0..=255.
#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The rounding constant every accumulator starts from (one half in fixed point).
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over rows `row0..row0 + rows` of a packed RGB buffer `src` of width `in_w`.
fn resample_horizontal(src: &[u8], in_w: usize, row0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.bounds.len();
    let mut out = vec![0u8; out_w * rows * 3];
    for (y, line_out) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let line_in = &src[(row0 + y) * in_w * 3..(row0 + y + 1) * in_w * 3];
        for (xx, px) in line_out.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = c.bounds[xx];
            let k = &c.k[xx * c.ksize..xx * c.ksize + n];
            let input = &line_in[xmin * 3..(xmin + n) * 3];
            let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
            for (&kx, p) in k.iter().zip(input.chunks_exact(3)) {
                s0 += i32::from(p[0]) * kx;
                s1 += i32::from(p[1]) * kx;
                s2 += i32::from(p[2]) * kx;
            }
            px[0] = clip8(s0);
            px[1] = clip8(s1);
            px[2] = clip8(s2);
        }
    }
    out
}

/// Vertical pass over a packed RGB buffer `src` of width `w`; `c.bounds` index rows of `src`.
fn resample_vertical(src: &[u8], w: usize, c: &Coeffs) -> Vec<u8> {
    let stride = w * 3;
    let out_h = c.bounds.len();
    let mut out = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for (yy, line_out) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, n) = c.bounds[yy];
        acc.fill(HALF);
        for (j, &ky) in c.k[yy * c.ksize..yy * c.ksize + n].iter().enumerate() {
            let line_in = &src[(ymin + j) * stride..(ymin + j + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(line_in) {
                *a += i32::from(p) * ky;
            }
        }
        for (o, &a) in line_out.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Resizes to `width` x `height` exactly as Pillow's `Image.resize(size, Image.BICUBIC)` does on
/// an RGB image (`ImagingResample` in `libImaging/Resample.c`, Pillow 13.0.0).
///
/// Pillow's BICUBIC is a cubic convolution with a = -0.5 whose support widens with the scale when
/// downscaling (antialiased), applied as two separable uint8 passes with 22-bit fixed-point
/// weights. The pass order matters for rounding and is Pillow's: horizontal first (on just the
/// rows the vertical pass will read) unless the height shrinks more than twice as much as the
/// width. This reproduces Pillow to 0 levels on the five test photos at 364, 224, 56 and 42.
/// The `image` crate's `FilterType::CatmullRom` has the same kernel but computes in f32 with its
/// own support and rounding rules: it differs from Pillow by up to 8 levels (mean 0.06 to 0.19)
/// on the same photos (`report_alternatives_and_speed` in `tests/preprocess.rs`).
pub fn resize_bicubic_to(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if out_w == 0 || out_h == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    let horizontal_first = !(in_h > out_h && (in_h as i64 - out_h as i64) > (in_w as i64 - out_w as i64) * 2);
    let src = img.as_raw();
    let coeffs_v = precompute_coeffs(in_h, 0.0, in_h as f32, out_h);
    let coeffs_h = precompute_coeffs(in_w, 0.0, in_w as f32, out_w);
    let out = match (need_h, need_v, horizontal_first) {
        (false, false, _) => src.clone(),
        (true, false, _) => resample_horizontal(src, in_w, 0, in_h, &coeffs_h),
        (false, true, _) => resample_vertical(src, in_w, &coeffs_v),
        (true, true, true) => {
            // Only rows first..last are read by the vertical pass; shift its bounds.
            let first = coeffs_v.bounds[0].0;
            let (lmin, ln) = coeffs_v.bounds[out_h - 1];
            let last = lmin + ln;
            let mut cv = coeffs_v;
            for b in &mut cv.bounds {
                b.0 -= first;
            }
            let tmp = resample_horizontal(src, in_w, first, last - first, &coeffs_h);
            resample_vertical(&tmp, out_w, &cv)
        }
        (true, true, false) => {
            let tmp = resample_vertical(src, in_w, &coeffs_v);
            resample_horizontal(&tmp, in_w, 0, out_h, &coeffs_h)
        }
    };
    RgbImage::from_raw(width, height, out).expect("buffer length matches dimensions")
}

/// Resizes to `size` x `size`, ignoring the aspect ratio, with Pillow's BICUBIC
/// (see [`resize_bicubic_to`]).
pub fn resize_bicubic(img: &RgbImage, size: u32) -> RgbImage {
    resize_bicubic_to(img, size, size)
}

/// Scales by 1/255 and normalises with [`CLIP_MEAN`] / [`CLIP_STD`]; layout CHW, length
/// `3 * height * width`.
///
/// The arithmetic is the HF image processor's, so the f32 values agree bit for bit:
/// `rescale` multiplies in f64 by the f64 `1/255` and rounds to f32, then `normalize` computes
/// `(x - mean) / std` in f32. (LAVIS's torchvision `ToTensor` divides in f32 by 255 instead; that
/// gives the same f32 for all 256 levels, see the unit test `rescale_matches_torchvision`.)
pub fn pixel_values(img: &RgbImage) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    let scale = 1.0f64 / 255.0;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, p) in img.as_raw().chunks_exact(3).enumerate() {
        for (c, dst) in [(0, &mut r[i]), (1, &mut g[i]), (2, &mut b[i])] {
            let x = (f64::from(p[c]) * scale) as f32;
            *dst = (x - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    out
}

/// Decode, resize to `size` x `size` and normalise one image: the `pixel_values` row
/// (`[3, size, size]`, CHW) the vision tower takes.
pub fn preprocess_image(path: &Path, size: u32) -> Result<Vec<f32>> {
    Ok(pixel_values(&resize_bicubic(&decode_rgb(path)?, size)))
}

/// [`preprocess_image`] for many images in parallel (rayon's global pool), in input order.
///
/// Each image gets its own `Result`, so a caller can record a bad image as skipped and go on.
pub fn preprocess_batch<P: AsRef<Path> + Sync>(paths: &[P], size: u32) -> Vec<Result<Vec<f32>>> {
    paths.par_iter().map(|p| preprocess_image(p.as_ref(), size)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// 4 x 1 PNGs written with Python's zlib (grey values 100, 0x1234, 65535, 0), decoded by Pillow
    /// 13.0: 16-bit grey with a tRNS chunk opens as `I;16` (clipped: 100, 255, 255, 0); 16-bit grey
    /// + alpha as RGBA (high byte: 0, 18, 255, 0).
    #[test]
    fn sixteen_bit_grey_pngs_convert_as_pillow_does() {
        let grey_trns = "89504e470d0a1a0a0000000d49484452000000040000000110000000008cc78c520000000274524e5300007693cd380000\
                         001149444154789c6360481132f9ff9f8101000b2e02a9ff2644240000000049454e44ae426082";
        let grey_alpha = "89504e470d0a1a0a0000000d494844520000000400000001100400000003a51b050000001649444154789c636048f9ff5fc8\
                          e43f183030fcff0f0053b60aa12bade62a0000000049454e44ae426082";
        for (png, grey) in [(grey_trns, [100, 255, 255, 0]), (grey_alpha, [0, 18, 255, 0])] {
            let rgb = decode_rgb_bytes(Path::new("x.png"), &hex(&png.replace(' ', ""))).unwrap();
            assert_eq!(rgb.as_raw(), &grey.iter().flat_map(|&g| [g; 3]).collect::<Vec<u8>>(), "{png}");
        }
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (inn, out) in [(512, 364), (451, 224), (300, 42), (40, 364), (7, 7)] {
            let c = precompute_coeffs(inn, 0.0, inn as f32, out);
            for (i, &(_, n)) in c.bounds.iter().enumerate() {
                let s: i32 = c.k[i * c.ksize..i * c.ksize + n].iter().sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= n as i32, "{inn}->{out} row {i}: {s}");
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([10, 128, 250]));
        for s in [1, 5, 42, 100] {
            let r = resize_bicubic(&img, s);
            assert!(r.pixels().all(|p| p.0 == [10, 128, 250]), "size {s}");
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = RgbImage::from_fn(9, 9, |x, y| image::Rgb([x as u8 * 20, y as u8 * 20, 7]));
        assert_eq!(resize_bicubic(&img, 9), img);
    }

    #[test]
    fn pixel_values_layout_is_chw() {
        let img = RgbImage::from_fn(2, 1, |x, _| image::Rgb([if x == 0 { 255 } else { 0 }, 0, 0]));
        let v = pixel_values(&img);
        assert_eq!(v.len(), 6);
        assert!((v[0] - (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6);
        assert!((v[1] + CLIP_MEAN[0] / CLIP_STD[0]).abs() < 1e-6);
        assert!((v[2] + CLIP_MEAN[1] / CLIP_STD[1]).abs() < 1e-6);
    }

    #[test]
    fn rescale_matches_torchvision() {
        for v in 0..=255u8 {
            assert_eq!((f64::from(v) * (1.0 / 255.0)) as f32, f32::from(v) / 255.0, "level {v}");
        }
    }

    #[test]
    fn cmyk_white_and_black() {
        // Adobe polarity: stored 255 means no ink.
        assert_eq!(adobe_cmyk_to_rgb(&[255, 255, 255, 255]), vec![255, 255, 255]);
        assert_eq!(adobe_cmyk_to_rgb(&[255, 255, 255, 0]), vec![0, 0, 0]);
    }
}
