//! Dataset inputs: the retrieval split (LAVIS or Karpathy JSON), Flickr30K and COCO Entities boxes, LAVIS
//! caption cleaning (method.md sections 2, 3 and 8), images decoded and resized exactly as Pillow
//! does ([`image`]), and captions tokenised exactly as the BLIP-2 BERT tokenizer does ([`tokenizer`]).

pub mod captions;
pub mod coco_entities;
pub mod dataset;
pub mod flickr_entities;
pub mod image;
pub mod karpathy_json;
pub mod lavis_json;
pub mod tokenizer;
