//! Dataset inputs (`method.md` §2): images decoded and resized exactly as Pillow does
//! ([`image`]), and captions tokenised exactly as the BLIP-2 BERT tokenizer does ([`tokenizer`]).

pub mod image;
pub mod tokenizer;
