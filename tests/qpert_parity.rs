//! Q-Pert against the independent Python reference (`tools/qpert_reference.py`, method.md
//! sections 3-5) on the tiny models' fixtures: box weights exactly, Gram matrices, component
//! counts, both projectors and Pi within 1e-5.

mod reference;

use qpert::qpert::perturbation::{BoxGrams, image_perturbations};
use qpert::qpert::subspace::KeySubspace;
use qpert::qpert::{AlphaWeight, Components, ObjectBox, PatchGrid, ProjectorKind, QpertSettings, patch_weights};
use reference::{Fixture, assert_close};

const MODELS: [&str; 2] = ["tiny_blip2_a", "tiny_blip2_b"];

/// The fixture's boxes in annotation order, with the 1-based origin shifted away as released.
fn fixture_boxes(fx: &Fixture) -> Vec<(ObjectBox, u32, u32)> {
    let mut out = Vec::new();
    for image in fx.qpert_json["images"].as_array().unwrap() {
        let (w, h) = (image["width"].as_u64().unwrap() as u32, image["height"].as_u64().unwrap() as u32);
        for b in image["boxes"].as_array().unwrap() {
            let c: Vec<f32> = b.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32 - 1.0).collect();
            out.push((ObjectBox { xmin: c[0], ymin: c[1], xmax: c[2], ymax: c[3] }, w, h));
        }
    }
    out
}

fn grid(fx: &Fixture) -> PatchGrid {
    let v = &fx.config["vision_config"];
    PatchGrid {
        image_size: v["image_size"].as_u64().unwrap() as usize,
        patch_size: v["patch_size"].as_u64().unwrap() as usize,
    }
}

/// The Gram matrices as the pipeline computes them: on the device, in f64, from the fixture's
/// f32 keys and box weights (the same inputs the f64 reference used). Row-major [n, L, H, d, d].
fn device_grams(fx: &Fixture) -> Vec<f64> {
    use burn::tensor::{Device, Int, Tensor, TensorData};
    let device = Device::default();
    let d = fx.qpert_json["head_dim"].as_u64().unwrap() as usize;
    let heads = fx.qpert_json["heads"].as_u64().unwrap() as usize;
    let [b, l, t, dq] = fx.qpert_shape::<4>("cross_keys");
    let keys = Tensor::<4>::from_data(TensorData::new(fx.qpert("cross_keys"), [b, l, t, dq]), &device);
    let per_layer: Vec<Tensor<4>> =
        (0..l).map(|layer| keys.clone().narrow(1, layer, 1).reshape([b, t, heads, d]).swap_dims(1, 2)).collect();
    let weights = fx.qpert("patch_weights");
    let n = weights.len() / t;
    let grams = qpert::qpert::gram::gram_matrices(
        &per_layer,
        Tensor::from_data(TensorData::new(weights, [n, t]), &device),
        Tensor::<1, Int>::from_data(TensorData::new(fx.qpert_i64("box_image"), [n]), &device),
    );
    grams.into_data().try_into_vec_as::<f64>().unwrap()
}

#[test]
fn patch_weights_equal_the_reference_exactly() {
    for model in MODELS {
        let fx = Fixture::load(model);
        let expected = fx.qpert("patch_weights");
        let boxes = fixture_boxes(&fx);
        let t = grid(&fx).num_tokens();
        assert_eq!(expected.len(), boxes.len() * t);
        for (o, (b, w, h)) in boxes.iter().enumerate() {
            assert_eq!(patch_weights(b, *w, *h, grid(&fx)), expected[o * t..(o + 1) * t], "{model} box {o}");
        }
    }
}

#[test]
fn subspaces_and_projectors_match_the_reference() {
    for model in MODELS {
        let fx = Fixture::load(model);
        let d = fx.qpert_json["head_dim"].as_u64().unwrap() as usize;
        let grams = device_grams(&fx);
        let eigenvalues = fx.qpert("eigenvalues");
        let m_expected = fx.qpert_i64("num_components");
        let full_rank = fx.qpert_u8("gram_full_rank");
        let gap = fx.qpert("eigengap_at_m");
        let rank = fx.qpert_i64("gram_rank");
        let (principal, official, n2) =
            (fx.qpert("projector_principal"), fx.qpert("projector_official"), fx.qpert("projector_principal_n2"));
        let mut compared_official = 0;
        for (i, gram) in grams.chunks(d * d).enumerate() {
            let s = KeySubspace::of_gram(gram, d);
            let scale = s.eigenvalues[0].abs().max(1e-12) as f32;
            let values: Vec<f32> = s.eigenvalues.iter().map(|&v| v as f32 / scale).collect();
            let want: Vec<f32> = eigenvalues[i * d..(i + 1) * d].iter().map(|v| v / scale).collect();
            assert_close(&values, &want, 1e-5, &format!("{model} eigenvalues {i}"));
            let m = s.num_components(Components::Ratio(0.99));
            assert_eq!(m as i64, m_expected[i], "{model} m {i}");
            let block = i * d * d..(i + 1) * d * d;
            // A projector is only defined up to rounding when its eigengap is tiny.
            if gap[i] > 1e-3 {
                assert_close(
                    &s.projector(ProjectorKind::Principal, m),
                    &principal[block.clone()],
                    1e-5,
                    &format!("{model} P {i}"),
                );
            }
            // With npc = 2 the second eigenvector is only determined when lambda_2 > lambda_3 = 0 at least.
            if rank[i] >= 2 {
                let p2 = s.projector(ProjectorKind::Principal, 2);
                assert_close(&p2, &n2[block.clone()], 1e-5, &format!("{model} P n2 {i}"));
            }
            if full_rank[i] == 1 && gap[i] > 1e-3 {
                assert_close(
                    &s.projector(ProjectorKind::Official, m),
                    &official[block],
                    1e-5,
                    &format!("{model} P~ {i}"),
                );
                compared_official += 1;
            }
        }
        assert!(compared_official > 0, "{model}: no full-rank case compared for the official projector");
    }
}

#[test]
fn pi_matches_the_reference_for_every_weight_variant() {
    for model in MODELS {
        let fx = Fixture::load(model);
        let d = fx.qpert_json["head_dim"].as_u64().unwrap() as usize;
        let heads = fx.qpert_json["heads"].as_u64().unwrap() as usize;
        let layers = fx.qpert_json["cross_attention_layers"].as_array().unwrap().len();
        let images = fx.qpert_json["images"].as_array().unwrap().len();
        let grams = device_grams(&fx);
        let box_image: Vec<usize> = fx.qpert_i64("box_image").iter().map(|&i| i as usize).collect();
        let box_area = fx.qpert("box_area");
        let comparable = fx.qpert_u8("image_official_comparable");
        let boxes = BoxGrams { grams: &grams, box_image: &box_image, box_area: &box_area, layers, heads, dim: d };
        let per_image = layers * heads * d * d;
        let cases = [
            ("pi_principal_constant", AlphaWeight::Constant, ProjectorKind::Principal),
            ("pi_principal_norm_area", AlphaWeight::NormArea, ProjectorKind::Principal),
            ("pi_principal_norm_area_inv", AlphaWeight::NormAreaInv, ProjectorKind::Principal),
            ("pi_principal_centered_area", AlphaWeight::CenteredArea, ProjectorKind::Principal),
            ("pi_principal_centered_area_inv", AlphaWeight::CenteredAreaInv, ProjectorKind::Principal),
            ("pi_official_constant", AlphaWeight::Constant, ProjectorKind::Official),
        ];
        for (name, weight, projector) in cases {
            let settings = QpertSettings { weight, projector, ..QpertSettings::published() };
            let pi = image_perturbations(&boxes, images, &settings);
            let want = fx.qpert(name);
            for (image, &comparable) in comparable.iter().enumerate().take(images) {
                if projector == ProjectorKind::Official && comparable == 0 {
                    continue;
                }
                let r = image * per_image..(image + 1) * per_image;
                assert_close(&pi[r.clone()], &want[r], 1e-5, &format!("{model} {name} image {image}"));
            }
        }
    }
}

#[test]
fn gram_matrices_on_the_device_match_the_reference() {
    for model in MODELS {
        let fx = Fixture::load(model);
        let got: Vec<f32> = device_grams(&fx).iter().map(|&v| v as f32).collect();
        // The reference accumulates in f64 and stores f32: agreement to f32 rounding.
        let want = fx.qpert("gram");
        let scale = want.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let rel: Vec<f32> = got.iter().map(|v| v / scale).collect();
        let want_rel: Vec<f32> = want.iter().map(|v| v / scale).collect();
        assert_close(&rel, &want_rel, 1e-6, &format!("{model} gram"));
    }
}

mod with_the_model {
    //! The whole Q-Pert path through the burn model: keys from Z, Pi from the fixture's boxes,
    //! perturbed ITC image features and ITM logits against the reference's hooked HF model.
    use super::*;
    use burn::tensor::{Device, Int, Tensor, TensorData};
    use qpert::model::Blip2Model;
    use qpert::qpert::{BatchBoxes, query_perturbation};

    struct Run {
        fx: Fixture,
        model: Blip2Model,
        z: Tensor<3>,
        keys: Vec<Tensor<4>>,
        boxes: BatchBoxes,
        device: Device,
    }

    fn run(name: &str) -> Run {
        let fx = Fixture::load(name);
        let device = Device::default();
        let model = Blip2Model::load(&fx.dir, &device).unwrap();
        let shape = fx.reference_shape::<4>("pixel_values");
        let pixels = Tensor::<4>::from_data(TensorData::new(fx.reference("pixel_values"), shape), &device);
        let z = model.vision_tokens(pixels).unwrap();
        let keys = model.cross_attention_keys(z.clone()).unwrap();
        let mut boxes = BatchBoxes::default();
        let all = fixture_boxes(&fx);
        let box_image = fx.qpert_i64("box_image");
        let area = fx.qpert("box_area");
        for (o, (b, w, h)) in all.iter().enumerate() {
            boxes.push(box_image[o] as usize, b, area[o], *w, *h, grid(&fx));
        }
        Run { fx, model, z, keys, boxes, device }
    }

    fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec_as::<f32>().unwrap()
    }

    impl Run {
        fn itm(&self, pi: Option<Tensor<5>>) -> Vec<f32> {
            let text = self.fx.reference_i64("itm_text_index");
            let image = self.fx.reference_i64("itm_image_index");
            let ids = self.fx.reference_i64("input_ids");
            let mask = self.fx.reference_i64("attention_mask");
            let len = 35;
            let rows = |all: &[i64]| -> Vec<i64> {
                text.iter().flat_map(|&t| all[t as usize * len..][..len].to_vec()).collect()
            };
            let p = text.len();
            let int2 = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [p, len]), &self.device);
            let pair_image = Tensor::<1, Int>::from_data(TensorData::new(image, [p]), &self.device);
            host(self.model.itm_logits(self.z.clone(), pair_image, int2(rows(&ids)), int2(rows(&mask)), pi).unwrap())
        }
    }

    #[test]
    fn perturbed_features_and_itm_match_the_reference() {
        for name in MODELS {
            let r = run(name);
            let comparable = r.fx.qpert_u8("image_official_comparable");
            let pair_image = r.fx.reference_i64("itm_image_index");
            let [b, q, e] = r.fx.qpert_shape::<3>("image_embeds_principal");
            for (projector, label) in [(ProjectorKind::Principal, "principal"), (ProjectorKind::Official, "official")] {
                let settings = QpertSettings { projector, ..QpertSettings::published() };
                let pi = query_perturbation(&r.keys, &r.boxes, &settings).unwrap().expect("a perturbation");
                let features = host(r.model.image_features(r.z.clone(), Some(pi.clone())).unwrap());
                let want = r.fx.qpert(&format!("image_embeds_{label}"));
                let mut compared = 0;
                for (image, &comparable) in comparable.iter().enumerate().take(b) {
                    if projector == ProjectorKind::Official && comparable == 0 {
                        continue;
                    }
                    let rows = image * q * e..(image + 1) * q * e;
                    assert_close(
                        &features[rows.clone()],
                        &want[rows],
                        1e-5,
                        &format!("{name} ITC {label} image {image}"),
                    );
                    compared += 1;
                }
                assert!(compared > 0);
                let itm = r.itm(Some(pi));
                let want = r.fx.qpert(&format!("itm_logits_{label}"));
                for (pair, &image) in pair_image.iter().enumerate() {
                    if projector == ProjectorKind::Official && comparable[image as usize] == 0 {
                        continue;
                    }
                    assert_close(
                        &itm[pair..pair + 1],
                        &want[pair..pair + 1],
                        1e-5,
                        &format!("{name} ITM {label} pair {pair}"),
                    );
                }
            }
        }
    }

    #[test]
    fn alpha_zero_and_images_without_boxes_are_bit_identical_to_the_plain_model() {
        for name in MODELS {
            let r = run(name);
            let plain = host(r.model.image_features(r.z.clone(), None).unwrap());
            let zero = QpertSettings { alpha: 0.0, ..QpertSettings::published() };
            let pi = query_perturbation(&r.keys, &r.boxes, &zero).unwrap().expect("a perturbation");
            assert_eq!(host(r.model.image_features(r.z.clone(), Some(pi.clone())).unwrap()), plain, "{name} ITC");
            assert_eq!(r.itm(Some(pi)), r.itm(None), "{name} ITM");

            let pi =
                query_perturbation(&r.keys, &r.boxes, &QpertSettings::published()).unwrap().expect("a perturbation");
            let perturbed = host(r.model.image_features(r.z.clone(), Some(pi)).unwrap());
            let [_, q, e] = r.fx.qpert_shape::<3>("image_embeds_principal");
            let without_boxes: Vec<usize> = (0..r.fx.qpert_json["images"].as_array().unwrap().len())
                .filter(|i| !r.boxes.image.contains(i))
                .collect();
            assert!(!without_boxes.is_empty(), "{name}: the fixture has an image without boxes");
            for image in without_boxes {
                let rows = image * q * e..(image + 1) * q * e;
                assert_eq!(perturbed[rows.clone()], plain[rows], "{name} image {image} without boxes");
            }
            assert_ne!(perturbed, plain, "{name}: the perturbation changes the images with boxes");
        }
    }

    #[test]
    fn no_boxes_at_all_means_no_perturbation() {
        let r = run(MODELS[0]);
        assert!(query_perturbation(&r.keys, &BatchBoxes::default(), &QpertSettings::published()).unwrap().is_none());
    }
}
