#!/usr/bin/env python3
"""Writes the fixtures of tests/preprocess.rs into tests/fixtures/preprocess/.

Regenerate (from the repository root; a venv outside the repo, no torch needed):

    python3 -m venv /work/venv-light
    /work/venv-light/bin/pip install pillow numpy transformers tokenizers safetensors
    /work/venv-light/bin/python tools/make_preprocess_fixtures.py

Pinned by this run: see "versions" in tests/fixtures/preprocess/manifest.json
(Pillow 13.0.0 with libjpeg-turbo 3.x, transformers 5.24.0, tokenizers 0.23.3).

What it writes (kept small; all < 2 MB):
  manifest.json        versions; per photo: Pillow's decoded RGB size + sha256, and the sha256 of the
                       BICUBIC resize at 364/224/56/42; the extra decode cases; the pixel_values file;
                       the tokenizer cases.
  resized/<name>_<s>.png   Pillow's resized RGB at s = 224, 56, 42 (lossless PNG), for measuring
                       differences, not only equality.
  decode/<case>.<ext>  small synthetic images in other modes (palette, RGBA, LA, L, 1-bit, CMYK JPEG,
                       progressive JPEG, odd sizes with 4:2:0), each with the sha256 of Pillow's
                       Image.open(f).convert("RGB").tobytes() in the manifest.
  pixel_values_chelsea_56.f32  HF BlipImageProcessorPil (size 56) pixel_values[0], CHW, little-endian f32;
                       plus, in the manifest, the sha256 of those bytes at size 364 for every photo.
  tokens.json          strings and ids/masks from HF BertTokenizerLegacy (the pure-Python tokenizer LAVIS
                       used) with [DEC] added as bos_token; checked equal to transformers' BertTokenizer
                       (tokenizers backend) and to tokenizers.BertWordPieceTokenizer.
  vocab.txt            copy of shared/assets/bert-base-uncased/vocab.txt (Apache-2.0).
"""

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL
import tokenizers
import transformers
from PIL import Image, features

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "fixtures" / "images"
OUT = ROOT / "tests" / "fixtures" / "preprocess"
VOCAB_SRC = Path("/work/shared/assets/bert-base-uncased/vocab.txt")
NAMES = ["astronaut", "camera", "chelsea", "coffee", "rocket"]
SIZES = [364, 224, 56, 42]
PNG_SIZES = [224, 56, 42]
MAX_LEN = 35


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def photos(manifest):
    (OUT / "resized").mkdir(parents=True, exist_ok=True)
    out = {}
    for name in NAMES:
        im = rgb(PHOTOS / f"{name}.jpg")
        entry = {"width": im.width, "height": im.height, "rgb_sha256": sha(im.tobytes()), "resized": {}}
        for s in SIZES:
            r = im.resize((s, s), Image.BICUBIC)
            e = {"sha256": sha(r.tobytes())}
            if s in PNG_SIZES:
                rel = f"resized/{name}_{s}.png"
                r.save(OUT / rel, optimize=True)
                e["png"] = rel
            entry["resized"][str(s)] = e
        out[name] = entry
    manifest["photos"] = out


def decode_cases(manifest):
    d = OUT / "decode"
    d.mkdir(parents=True, exist_ok=True)
    base = rgb(PHOTOS / "chelsea.jpg").resize((37, 23), Image.BICUBIC)
    cases = {}

    def add(name, im, fmt, **kw):
        path = d / f"{name}.{ 'jpg' if fmt == 'JPEG' else 'png'}"
        im.save(path, fmt, **kw)
        with Image.open(path) as check:
            mode = check.mode
        cases[name] = {"file": str(path.relative_to(OUT)), "mode": mode, "rgb_sha256": sha(rgb(path).tobytes())}

    add("png_rgb", base, "PNG")
    add("png_rgba", base.convert("RGBA").copy(), "PNG")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    add("png_rgba_gradient_alpha", rgba, "PNG")
    add("png_l", base.convert("L"), "PNG")
    la = base.convert("LA")
    la.putalpha(Image.linear_gradient("L").resize(base.size))
    add("png_la", la, "PNG")
    add("png_1bit", base.convert("1"), "PNG")
    add("png_palette", base.convert("P", palette=Image.ADAPTIVE, colors=16), "PNG")
    pt = base.convert("P", palette=Image.ADAPTIVE, colors=16)
    add("png_palette_transparency", pt, "PNG", transparency=3)
    add("png_gray16", Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 3), "PNG")
    add("jpeg_cmyk", base.convert("CMYK"), "JPEG", quality=90)
    add("jpeg_420_odd", base, "JPEG", quality=85, subsampling="4:2:0")
    add("jpeg_422_odd", base, "JPEG", quality=85, subsampling="4:2:2")
    add("jpeg_444_odd", base, "JPEG", quality=85, subsampling="4:4:4")
    add("jpeg_progressive", base, "JPEG", quality=85, progressive=True)
    add("jpeg_gray", base.convert("L"), "JPEG", quality=85)
    # For the record: transformers' convert_to_rgb composites alpha onto white, Pillow's convert("RGB")
    # (used by LAVIS, and by us) drops it.
    from transformers.image_transforms import convert_to_rgb
    with Image.open(d / "png_rgba_gradient_alpha.png") as im:
        hf = np.asarray(convert_to_rgb(im, return_numpy=True))
    pil = np.asarray(rgb(d / "png_rgba_gradient_alpha.png"))
    manifest["hf_convert_to_rgb_vs_pillow_on_alpha"] = {"case": "png_rgba_gradient_alpha",
                                                         "max_abs_diff": int(np.abs(hf.astype(int) - pil).max())}
    manifest["decode_cases"] = cases


def resize_cases(manifest):
    """Resizes that take the other code paths: vertical pass first (tall sources), upscaling,
    mixed up/down, non-square targets. Sources are photos transposed/cropped, or decode cases."""
    cases = []
    specs = [
        ("images/coffee.jpg", True, None, [(364, 364), (224, 224), (42, 42)]),
        ("images/rocket.jpg", True, None, [(364, 364)]),
        ("images/camera.jpg", False, [0, 0, 512, 100], [(364, 364), (56, 56)]),
        ("images/chelsea.jpg", False, [100, 0, 160, 300], [(364, 364), (42, 42), (5, 300)]),
        ("preprocess/decode/png_rgb.png", False, None, [(364, 364), (56, 56), (30, 30), (300, 100), (1, 1)]),
        ("images/astronaut.jpg", False, None, [(300, 100), (100, 300), (512, 200), (1, 1)]),
    ]
    for src, transpose, crop, sizes in specs:
        im = rgb(ROOT / "tests" / "fixtures" / src)
        if transpose:
            im = im.transpose(Image.Transpose.TRANSPOSE)
        if crop:
            im = im.crop(tuple(crop))
        for w, h in sizes:
            r = im.resize((w, h), Image.BICUBIC)
            cases.append({"source": src, "transpose": transpose, "crop": crop, "in": [im.width, im.height],
                          "out": [w, h], "sha256": sha(r.tobytes())})
    manifest["resize_cases"] = cases


def pixel_values(manifest):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    proc = BlipImageProcessorPil(size={"height": 56, "width": 56})
    im = Image.open(PHOTOS / "chelsea.jpg")  # the processor converts to RGB itself
    pv = proc(images=im, return_tensors="np")["pixel_values"][0]
    assert pv.shape == (3, 56, 56) and pv.dtype == np.float32, (pv.shape, pv.dtype)
    # Same result from the documented arithmetic: f64 rescale -> f32, then (x - mean) / std in f32.
    r = np.asarray(rgb(PHOTOS / "chelsea.jpg").resize((56, 56), Image.BICUBIC))
    x = (r.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    ref = ((x - mean) / std).transpose(2, 0, 1)
    assert np.array_equal(ref, pv), np.abs(ref - pv).max()
    (OUT / "pixel_values_chelsea_56.f32").write_bytes(pv.astype("<f4").tobytes())
    # At the model's size, 364, only checksums (little-endian f32 bytes, CHW) for every photo.
    proc364 = BlipImageProcessorPil(size={"height": 364, "width": 364})
    sha364 = {}
    for name in NAMES:
        pv364 = proc364(images=Image.open(PHOTOS / f"{name}.jpg"), return_tensors="np")["pixel_values"][0]
        assert pv364.shape == (3, 364, 364) and pv364.dtype == np.float32
        sha364[name] = sha(pv364.astype("<f4").tobytes())
    manifest["pixel_values"] = {"image": "chelsea", "size": 56, "file": "pixel_values_chelsea_56.f32", "shape": [3, 56, 56],
                                "processor": "transformers BlipImageProcessorPil (resample BICUBIC, OPENAI_CLIP mean/std)",
                                "sha256_at_364": sha364}


CAPTIONS = [
    "Two cats laying on a pink blanket.",
    "a man riding a wave on top of a surfboard",
    "café au lait and a naïve Ångström",
    "ÉCOLE Über straße façade",
    "日本語 テスト の 写真",
    "中文字符和English混合",
    "a dog 🐶 on the beach 🏖️ !!",
    "what?! yes... (maybe) -- \"quoted\" 'single' [brackets] {braces} <angle> a/b c\\d",
    "literal [CLS] and [DEC] and [SEP] inside",
    "lowercase [cls] and [dec] are not special",
    "[DEC]",
    "tab\tseparated\nnew line\r\ncarriage",
    "  leading and trailing spaces  ",
    "control\u0000chars\u0007here\u200bzero-width",
    "",
    " ",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x" * 120,
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three twenty-four twenty-five "
    "twenty-six twenty-seven twenty-eight twenty-nine thirty thirty-one thirty-two thirty-three",
    "a" + " b" * 40,
    "numbers 3.14 1,000 2nd 10% $5 #hashtag @user e-mail@example.com",
    "Ωmega ΣIGMA ρ Привет мир",
]


def tokens(manifest):
    from transformers.models.bert.tokenization_bert import BertTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    from tokenizers import BertWordPieceTokenizer

    shutil.copyfile(VOCAB_SRC, OUT / "vocab.txt")
    vocab = str(OUT / "vocab.txt")
    kw = dict(padding="max_length", truncation=True, max_length=MAX_LEN)

    legacy = BertTokenizerLegacy(vocab, do_lower_case=True)
    legacy.add_special_tokens({"bos_token": "[DEC]"})
    assert legacy.convert_tokens_to_ids("[DEC]") == 30522
    enc = legacy(CAPTIONS, **kw)

    fast = BertTokenizer(vocab=vocab, do_lower_case=True)
    fast.add_special_tokens({"bos_token": "[DEC]"})
    enc_fast = fast(CAPTIONS, **kw)

    wp = BertWordPieceTokenizer(vocab, lowercase=True, strip_accents=None, clean_text=True, handle_chinese_chars=True)
    wp.add_special_tokens(["[DEC]"])
    wp.enable_padding(length=MAX_LEN, pad_id=0, pad_token="[PAD]")
    wp.enable_truncation(MAX_LEN)
    enc_wp = wp.encode_batch(CAPTIONS)

    cases = []
    disagreements = []
    for i, c in enumerate(CAPTIONS):
        ids, mask = enc["input_ids"][i], enc["attention_mask"][i]
        assert len(ids) == MAX_LEN
        others = {"transformers.BertTokenizer": (enc_fast["input_ids"][i], enc_fast["attention_mask"][i]),
                  "tokenizers.BertWordPieceTokenizer": (enc_wp[i].ids, enc_wp[i].attention_mask)}
        for who, (oi, om) in others.items():
            if list(oi) != list(ids) or list(om) != list(mask):
                disagreements.append({"text": c, "who": who, "ids": list(oi)})
        cases.append({"text": c, "input_ids": ids, "attention_mask": mask,
                      "tokens": legacy.convert_ids_to_tokens([t for t, m in zip(ids, mask) if m])})
    if disagreements:
        print("DISAGREEMENTS:", json.dumps(disagreements, ensure_ascii=False, indent=1), file=sys.stderr)
    (OUT / "tokens.json").write_text(json.dumps({
        "reference": "transformers BertTokenizerLegacy(vocab.txt, do_lower_case=True) + add_special_tokens({'bos_token': '[DEC]'}); "
                     "padding='max_length', truncation=True, max_length=35",
        "vocab": "tests/fixtures/preprocess/vocab.txt (copy of shared/assets/bert-base-uncased/vocab.txt, sha256 "
                 + sha((OUT / "vocab.txt").read_bytes()) + ")",
        "dec_id": 30522,
        "disagreements": disagreements,
        "cases": cases,
    }, ensure_ascii=False, indent=1) + "\n")


def truncated_jpeg_fails_in_pillow():
    data = (PHOTOS / "astronaut.jpg").read_bytes()
    try:
        with Image.open(io.BytesIO(data[: len(data) // 2])) as im:
            im.convert("RGB")
    except OSError as e:
        return str(e)
    raise AssertionError("Pillow decoded a truncated JPEG")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {"versions": {"python": sys.version.split()[0], "pillow": PIL.__version__, "libjpeg": features.version("jpg"), "libjpeg_turbo": features.version("libjpeg_turbo"),
                             "numpy": np.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}}
    manifest["pillow_truncated_jpeg_error"] = truncated_jpeg_fails_in_pillow()
    photos(manifest)
    decode_cases(manifest)
    resize_cases(manifest)
    pixel_values(manifest)
    tokens(manifest)
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
