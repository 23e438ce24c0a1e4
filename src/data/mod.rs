//! Dataset readers: the retrieval split (LAVIS or Karpathy JSON), Flickr30K Entities boxes, and
//! LAVIS caption cleaning (method.md sections 2, 3 and 8).

pub mod captions;
pub mod dataset;
pub mod flickr_entities;
pub mod karpathy_json;
pub mod lavis_json;
