//! Q-Pert against the independent Python reference (`tools/qpert_reference.py`, method.md
//! sections 3-5) on the tiny models' fixtures: box weights exactly, Gram matrices, component
//! counts, both projectors and Pi within 1e-5.

mod common;

use common::{Fixture, assert_close};
use qpert::qpert::perturbation::{BoxGrams, image_perturbations};
use qpert::qpert::subspace::KeySubspace;
use qpert::qpert::{AlphaWeight, Components, ObjectBox, PatchGrid, ProjectorKind, QpertSettings, patch_weights};

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
    let per_layer: Vec<Tensor<4>> = (0..l)
        .map(|layer| keys.clone().narrow(1, layer, 1).reshape([b, t, heads, d]).swap_dims(1, 2))
        .collect();
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
fn patch_weights_and_areas_equal_the_reference_exactly() {
    for model in MODELS {
        let fx = Fixture::load(model);
        let expected = fx.qpert("patch_weights");
        let areas = fx.qpert("box_area");
        let boxes = fixture_boxes(&fx);
        let t = grid(&fx).num_tokens();
        assert_eq!(expected.len(), boxes.len() * t);
        for (o, (b, w, h)) in boxes.iter().enumerate() {
            assert_eq!(patch_weights(b, *w, *h, grid(&fx)), expected[o * t..(o + 1) * t], "{model} box {o}");
            assert_close(&[b.area(*w, *h)], &areas[o..o + 1], 1e-7, &format!("{model} area {o}"));
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
                assert_close(&s.projector(ProjectorKind::Principal, m), &principal[block.clone()], 1e-5, &format!("{model} P {i}"));
            }
            // With npc = 2 the second eigenvector is only determined when lambda_2 > lambda_3 = 0 at least.
            if rank[i] >= 2 {
                let p2 = s.projector(ProjectorKind::Principal, 2);
                assert_close(&p2, &n2[block.clone()], 1e-5, &format!("{model} P n2 {i}"));
            }
            if full_rank[i] == 1 && gap[i] > 1e-3 {
                assert_close(&s.projector(ProjectorKind::Official, m), &official[block], 1e-5, &format!("{model} P~ {i}"));
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
            for image in 0..images {
                if projector == ProjectorKind::Official && comparable[image] == 0 {
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
