//! Measures the Q-Pert subspace work for one image of the real model (method.md section 4):
//! 8 boxes x 6 cross-attention layers x 12 heads = 576 Gram matrices of 64 x 64, their
//! eigendecompositions and projectors, on one core and on all cores.
//!
//! Run: `cargo run --release --example subspace_cost`

use std::time::Instant;

use qpert::qpert::perturbation::{BoxGrams, image_perturbations};
use qpert::qpert::subspace::KeySubspace;
use qpert::qpert::{Components, ProjectorKind, QpertSettings};

fn main() {
    let (boxes, layers, heads, d, tokens) = (8usize, 6usize, 12usize, 64usize, 677usize);
    // Deterministic pseudo-random keys: a simple LCG is enough to get full-rank Gram matrices.
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) as f64 / (1u64 << 24) as f64) - 0.5
    };
    let n = boxes * layers * heads;
    let mut grams = vec![0f64; n * d * d];
    for g in grams.chunks_mut(d * d) {
        let keys: Vec<f64> = (0..tokens / 4 * d).map(|_| next()).collect();
        for k in keys.chunks(d) {
            for a in 0..d {
                for b in 0..d {
                    g[a * d + b] += k[a] * k[b];
                }
            }
        }
    }

    let start = Instant::now();
    let subspaces: Vec<KeySubspace> = grams.chunks(d * d).map(|g| KeySubspace::of_gram(g, d)).collect();
    let decompositions = start.elapsed().as_secs_f64();
    for s in &subspaces {
        let m = s.num_components(Components::Ratio(0.99));
        std::hint::black_box(s.projector(ProjectorKind::Official, m));
    }
    let one_core = start.elapsed().as_secs_f64();

    let box_image: Vec<usize> = (0..boxes).collect::<Vec<_>>().iter().map(|_| 0).collect();
    let box_area = vec![0.1f32; boxes];
    let input = BoxGrams { grams: &grams, box_image: &box_image, box_area: &box_area, layers, heads, dim: d };
    let start = Instant::now();
    std::hint::black_box(image_perturbations(&input, 1, &QpertSettings::published()));
    let all_cores = start.elapsed().as_secs_f64();

    let threads = rayon::current_num_threads();
    println!("subspace work for one image ({n} eigendecompositions of {d}x{d}, f64, faer):");
    println!("  one core:        {:8.1} ms  ({:.0} us per matrix)", one_core * 1e3, one_core * 1e6 / n as f64);
    println!(
        "    of which eigendecompositions {:.1} ms, projectors {:.1} ms",
        decompositions * 1e3,
        (one_core - decompositions) * 1e3
    );
    println!(
        "  {threads} rayon threads: {:8.1} ms  (speed-up {:.2}x over one core)",
        all_cores * 1e3,
        one_core / all_cores
    );
}
