//! Caption tokeniser (`method.md` §2 Inputs): BERT uncased WordPiece plus BLIP-2's `[DEC]`,
//! `[CLS] … [SEP]`, padded (right) and truncated to [`MAX_LEN`] = 35 tokens.
//!
//! Captions are expected already cleaned (LAVIS `blip_caption`); this module only tokenises.
//! The result equals, id for id, the pure-Python BERT tokenizer LAVIS used (transformers'
//! `BertTokenizerLegacy` with `[DEC]` added as `bos_token`), and also transformers 5
//! `BertTokenizer` and `tokenizers.BertWordPieceTokenizer`, on accents, CJK, emoji, control
//! characters, literal special tokens inside the text and over-long captions: see
//! `tests/preprocess.rs` and `tools/make_preprocess_fixtures.py`.

use std::path::{Path, PathBuf};

use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer};
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

/// Token sequence length of the BLIP-2 text side (LAVIS `max_txt_len`).
pub const MAX_LEN: usize = 35;

/// BERT's special tokens, in `vocab.txt`; registered as special added tokens so that a literal
/// `[CLS]` in a caption becomes id 101, as HF `BertTokenizer` does (it never splits them).
const BERT_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// The decoder-start token BLIP-2 adds after the vocabulary (id 30522 for bert-base-uncased).
pub const DEC_TOKEN: &str = "[DEC]";

/// Token ids and attention masks of a batch of captions, row-major `[n, len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// `[n, len]` token ids (`[CLS] … [SEP] [PAD]…`), i32 as the model's embedding lookup takes.
    pub input_ids: Vec<i32>,
    /// `[n, len]`: 1 for real tokens (including `[CLS]`/`[SEP]`), 0 for padding.
    pub attention_mask: Vec<u8>,
    /// Sequence length of every row, [`MAX_LEN`].
    pub len: usize,
}

impl TokenBatch {
    /// Number of captions.
    pub fn n(&self) -> usize {
        self.input_ids.len().checked_div(self.len).unwrap_or(0)
    }

    /// The ids of caption `i`.
    pub fn ids(&self, i: usize) -> &[i32] {
        &self.input_ids[i * self.len..(i + 1) * self.len]
    }

    /// The attention mask of caption `i`.
    pub fn mask(&self, i: usize) -> &[u8] {
        &self.attention_mask[i * self.len..(i + 1) * self.len]
    }
}

/// The BLIP-2 caption tokeniser, built from a model folder.
pub struct CaptionTokenizer {
    tokenizer: Tokenizer,
    /// The file it was built from, to name it in errors.
    source: PathBuf,
}

impl CaptionTokenizer {
    /// Loads `dir/tokenizer.json` when present, else builds the BERT uncased tokenizer from
    /// `dir/vocab.txt` (the BLIP-2 checkpoints on the Hub ship only `vocab.txt`).
    ///
    /// Either way `[DEC]` is ensured (appended after the vocabulary when missing) and padding and
    /// truncation are set to [`MAX_LEN`], right side. Errors are [`Error::Weights`] naming the file.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let mut tok = if json.is_file() {
            let t = Tokenizer::from_file(&json)
                .map_err(|e| Error::weights(&json, format!("malformed tokenizer.json: {}", one_line(&*e))))?;
            Self { tokenizer: t, source: json }
        } else {
            Self::build_from_vocab(&dir.join("vocab.txt"))?
        };
        tok.configure()?;
        Ok(tok)
    }

    /// Builds the tokenizer from a BERT `vocab.txt` (one token per line, id = line number):
    /// WordPiece (`[UNK]`, `##`, 100 chars per word), BertNormalizer (clean text, CJK spacing,
    /// lowercase, strip accents), BertPreTokenizer, `[CLS] $A [SEP]`, `[DEC]`, 35 tokens.
    /// This is what HF `BertTokenizer(vocab.txt, do_lower_case=True)` does.
    pub fn from_vocab(vocab_path: &Path) -> Result<Self> {
        let mut tok = Self::build_from_vocab(vocab_path)?;
        tok.configure()?;
        Ok(tok)
    }

    fn build_from_vocab(vocab_path: &Path) -> Result<Self> {
        if !vocab_path.is_file() {
            return Err(Error::weights(vocab_path, "no such file (need vocab.txt or tokenizer.json)"));
        }
        let path_str = vocab_path.to_str().ok_or_else(|| Error::weights(vocab_path, "path is not UTF-8"))?;
        // One token per line, id = line number (trailing whitespace trimmed, as HF does).
        let vocab =
            WordPiece::read_file(path_str).map_err(|e| Error::weights(vocab_path, format!("cannot read: {e}")))?;
        for special in BERT_SPECIALS {
            if !vocab.contains_key(special) {
                return Err(Error::weights(vocab_path, format!("not a BERT vocabulary: no {special}")));
            }
        }
        let (cls, sep) = (vocab["[CLS]"], vocab["[SEP]"]);
        let wordpiece = WordPiece::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| Error::weights(vocab_path, format!("cannot build WordPiece: {e}")))?;
        let post = TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
            .map_err(|e| Error::weights(vocab_path, e))?
            .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
            .build()
            .map_err(|e| Error::weights(vocab_path, format!("cannot build post-processor: {e}")))?;
        let mut tokenizer = Tokenizer::new(wordpiece);
        tokenizer
            .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
            .with_pre_tokenizer(Some(BertPreTokenizer))
            .with_post_processor(Some(post));
        let specials: Vec<AddedToken> = BERT_SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect();
        tokenizer.add_special_tokens(&specials);
        Ok(Self { tokenizer, source: vocab_path.to_path_buf() })
    }

    /// Adds `[DEC]` if missing, and fixes padding/truncation to [`MAX_LEN`].
    fn configure(&mut self) -> Result<()> {
        if self.tokenizer.token_to_id(DEC_TOKEN).is_none() {
            self.tokenizer.add_special_tokens(&[AddedToken::from(DEC_TOKEN, true)]);
        }
        let pad_id = self.tokenizer.token_to_id("[PAD]").unwrap_or(0);
        self.tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(MAX_LEN),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: "[PAD]".into(),
        }));
        self.tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: MAX_LEN,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::weights(&self.source, format!("cannot set truncation: {e}")))?;
        Ok(())
    }

    /// Id of a token (e.g. `[DEC]`, `[CLS]`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Vocabulary size including added tokens (30,523 for BLIP-2).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Tokenises captions (already cleaned) into `[n, 35]` ids and masks, in input order.
    pub fn encode(&self, captions: &[String]) -> Result<TokenBatch> {
        let inputs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| Error::weights(&self.source, format!("tokenizer failed: {}", one_line(&*e))))?;
        let mut batch = TokenBatch {
            input_ids: Vec::with_capacity(captions.len() * MAX_LEN),
            attention_mask: Vec::with_capacity(captions.len() * MAX_LEN),
            len: MAX_LEN,
        };
        for enc in &encodings {
            // Fixed padding and truncation make every row MAX_LEN long; check rather than trust a
            // tokenizer.json that might override them.
            if enc.get_ids().len() != MAX_LEN {
                return Err(Error::weights(
                    &self.source,
                    format!("tokenizer produced {} tokens, expected {MAX_LEN}", enc.len()),
                ));
            }
            batch.input_ids.extend(enc.get_ids().iter().map(|&id| id as i32));
            batch.attention_mask.extend(enc.get_attention_mask().iter().map(|&m| m as u8));
        }
        Ok(batch)
    }
}

/// An error message on one line (the CLI prints each error as one line).
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_batch_rows() {
        let b = TokenBatch { input_ids: (0..70).collect(), attention_mask: vec![1; 70], len: MAX_LEN };
        assert_eq!(b.n(), 2);
        assert_eq!(b.ids(1)[0], 35);
        assert_eq!(b.mask(0).len(), 35);
    }

    #[test]
    fn tokenizer_json_round_trip() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess");
        let from_vocab = CaptionTokenizer::from_vocab(&fixtures.join("vocab.txt")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), from_vocab.tokenizer.to_string(false).unwrap()).unwrap();
        let from_json = CaptionTokenizer::from_model_dir(dir.path()).unwrap();
        assert_eq!(from_json.source, dir.path().join("tokenizer.json"));
        let caps = vec!["A Café [DEC] 日本".to_string(), "x ".repeat(50)];
        assert_eq!(from_json.encode(&caps).unwrap(), from_vocab.encode(&caps).unwrap());
        assert_eq!(from_json.token_id(DEC_TOKEN), Some(30522));
    }

    #[test]
    fn missing_vocab_names_the_file() {
        let dir = std::env::temp_dir().join("qpert-no-such-model-dir");
        let err = CaptionTokenizer::from_model_dir(&dir).err().expect("must fail");
        assert!(matches!(err, Error::Weights { .. }));
        assert!(err.to_string().contains("vocab.txt"), "{err}");
    }
}
