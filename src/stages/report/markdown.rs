//! `report/report.md`: the released README's "Text to Image" / "Image to Text" tables (R@1/5/10,
//! overall and small) for ITC and ITM re-ranking, beside the published numbers of method.md
//! section 7 when the dataset is Flickr30K or COCO; rank statistics; and the per-bin table.

use std::fmt::Write;

use super::{Block, MetricsFile, Summary, pct};
use crate::config::Config;
use crate::stages::counted;

/// Published R@1/5/10 of one setting, as printed in the source.
struct Published {
    label: &'static str,
    note: &'static str,
    t2i: [&'static str; 3],
    i2t: [&'static str; 3],
    small_t2i: Option<[&'static str; 3]>,
    small_i2t: Option<[&'static str; 3]>,
}

const QPERT_FLICKR: Published = Published {
    label: "published Q-Pert + ITM",
    note: "Q-Pert + ITM as released (README): Flickr30K 1K test, official projector, alpha 8, tau 0.99, k 64, fp32",
    t2i: ["89.88", "98.14", "99.06"],
    i2t: ["97.70", "100.00", "100.00"],
    small_t2i: Some(["85.33", "94.67", "94.67"]),
    small_i2t: Some(["93.33", "100.00", "100.00"]),
};

const BLIP2_FLICKR: Published = Published {
    label: "published BLIP-2",
    note: "BLIP-2 without perturbation, LAVIS evaluation, ITM re-rank with k 128: Flickr30K 1K test",
    t2i: ["89.7", "98.1", "98.9"],
    i2t: ["97.6", "100.0", "100.0"],
    small_t2i: None,
    small_i2t: None,
};

const BLIP2_COCO: Published = Published {
    label: "published BLIP-2",
    note: "BLIP-2 without perturbation, LAVIS evaluation, ITM re-rank with k 128: COCO 5K test",
    t2i: ["68.3", "87.7", "92.6"],
    i2t: ["85.4", "97.0", "98.5"],
    small_t2i: None,
    small_i2t: None,
};

/// The published settings to compare with, by dataset name (`flickr30k*`, `coco*`; none otherwise).
fn published(dataset: &str) -> Vec<&'static Published> {
    let name = dataset.to_ascii_lowercase();
    if name.starts_with("flickr30k") {
        vec![&QPERT_FLICKR, &BLIP2_FLICKR]
    } else if name.starts_with("coco") {
        vec![&BLIP2_COCO]
    } else {
        Vec::new()
    }
}

/// The report, linking the plot `plot_file` (beside it).
pub fn render(config: &Config, m: &MetricsFile, plain: Option<&serde_json::Value>, plot_file: &str) -> String {
    let mut out = String::new();
    let c = &m.counts;
    let model = config.model.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let qpert = match &m.qpert.settings {
        Some(q) => format!(
            "on: alpha {}, npc {}, weight {}, projector {}",
            q.alpha,
            q.npc,
            super::json_name(&q.weight),
            super::json_name(&q.projector)
        ),
        None => "off (plain BLIP-2)".to_string(),
    };
    let rerank = match m.rerank {
        Some(_) => format!("ITM on each query's ITC top-{} (score = ITM + ITC)", m.k),
        None => "off: ITC only".to_string(),
    };
    let _ = writeln!(out, "# qpert report: {}\n", m.dataset);
    let _ = writeln!(out, "- Model: `{model}`");
    let _ = writeln!(out, "- Q-Pert: {qpert}");
    let _ = writeln!(out, "- Re-rank: {rerank}");
    let _ = writeln!(
        out,
        "- Queries: {} images ({} with an object size, {} small), {} captions ({} of small images)",
        c.images, c.images_with_size, c.small_images, c.texts, c.small_texts
    );
    let _ = writeln!(
        out,
        "- Recall in percent; ranks are against the full gallery, ties broken by index; \
         small = largest kept box below 10% of the image.\n"
    );

    let pubs = published(&m.dataset);
    direction_table(&mut out, "Text to Image", m, &pubs, Dir::T2i);
    direction_table(&mut out, "Image to Text", m, &pubs, Dir::I2t);
    for (i, p) in pubs.iter().enumerate() {
        let _ = writeln!(out, "{}. {}", i + 1, p.note);
    }
    if !pubs.is_empty() {
        out.push('\n');
    }

    if let Some(plain) = plain {
        comparison_table(&mut out, m, plain);
    }
    rank_table(&mut out, m);

    let _ = writeln!(out, "## Recall by object size\n");
    let _ = writeln!(out, "![Recall@1 by object size]({plot_file})\n");
    let _ = writeln!(
        out,
        "Each bin holds the images whose largest kept box covers [lo, hi) of the image (image to text) \
         and those images' captions (text to image); images without an Entities annotation are in no bin{}.\n",
        match c.images_beyond_last_bin {
            0 => String::new(),
            n => format!(
                ", nor (here: {}) are those whose largest box covers the whole image or more",
                counted(n, "image")
            ),
        }
    );
    bin_table(&mut out, "ITC", &m.itc);
    if let Some(b) = &m.rerank {
        bin_table(&mut out, "ITC + ITM re-rank", b);
    }
    out
}

#[derive(Clone, Copy)]
enum Dir {
    T2i,
    I2t,
}

impl Dir {
    fn recalls(self, s: &Summary) -> [Option<f64>; 3] {
        match self {
            Dir::T2i => [s.img_r1, s.img_r5, s.img_r10],
            Dir::I2t => [s.txt_r1, s.txt_r5, s.txt_r10],
        }
    }

    fn published(self, p: &Published) -> ([&'static str; 3], Option<[&'static str; 3]>) {
        match self {
            Dir::T2i => (p.t2i, p.small_t2i),
            Dir::I2t => (p.i2t, p.small_i2t),
        }
    }
}

/// One direction: rows R@1/5/10 overall and small; columns this run's scorings, then the published.
fn direction_table(out: &mut String, title: &str, m: &MetricsFile, pubs: &[&Published], dir: Dir) {
    let _ = writeln!(out, "## {title}\n");
    let mut blocks: Vec<(&str, &Block)> = vec![("ITC", &m.itc)];
    if let Some(b) = &m.rerank {
        blocks.push(("ITC + ITM re-rank", b));
    }
    let mut header = String::from("| |");
    let mut rule = String::from("|---|");
    for (label, _) in &blocks {
        let _ = write!(header, " {label} |");
        rule.push_str("---:|");
    }
    for (i, p) in pubs.iter().enumerate() {
        let _ = write!(header, " {} ({}) |", p.label, i + 1);
        rule.push_str("---:|");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for (small, name) in [(false, ""), (true, "small ")] {
        for (k, at) in [(0, "R@1"), (1, "R@5"), (2, "R@10")] {
            let mut row = format!("| {name}{at} |");
            for (_, b) in &blocks {
                let s = if small { &b.small.summary } else { &b.overall };
                let _ = write!(row, " {} |", pct(dir.recalls(s)[k]));
            }
            for p in pubs {
                let (all, small_pub) = dir.published(p);
                let v = if small { small_pub.map_or("-", |v| v[k]) } else { all[k] };
                let _ = write!(row, " {v} |");
            }
            let _ = writeln!(out, "{row}");
        }
    }
    let (_, head) = blocks[blocks.len() - 1];
    let small = &head.small.summary;
    let _ = writeln!(out, "\nsmall: {}, {}.\n", counted(small.n_images, "image"), counted(small.n_texts, "caption"));
}

/// Reads one statistic of a summary.
type Stat = fn(&Summary) -> Option<f64>;

/// Median rank, mean rank, MRR and the recall means, per scoring.
fn rank_table(out: &mut String, m: &MetricsFile) {
    let _ = writeln!(out, "## Rank statistics\n");
    let mut blocks: Vec<(&str, &Block)> = vec![("ITC", &m.itc)];
    if let Some(b) = &m.rerank {
        blocks.push(("ITC + ITM re-rank", b));
    }
    let header: String = blocks.iter().map(|(l, _)| format!(" {l} |")).collect();
    let rule: String = blocks.iter().map(|_| "---:|").collect();
    let _ = writeln!(out, "| |{header}\n|---|{rule}");
    let rows: [(&str, Stat, bool); 9] = [
        ("text to image, median rank", |s| s.img_mdr, false),
        ("text to image, mean rank", |s| s.img_mer, false),
        ("text to image, MRR", |s| s.img_mrr, true),
        ("image to text, median rank", |s| s.txt_mdr, false),
        ("image to text, mean rank", |s| s.txt_mer, false),
        ("image to text, MRR", |s| s.txt_mrr, true),
        ("text to image, mean of R@1/5/10", |s| s.img_r_mean, false),
        ("image to text, mean of R@1/5/10", |s| s.txt_r_mean, false),
        ("r_mean", |s| s.r_mean, false),
    ];
    for (label, get, four) in rows {
        let cells: String = blocks
            .iter()
            .map(|(_, b)| match get(&b.overall) {
                Some(v) if four => format!(" {v:.4} |"),
                v => format!(" {} |", pct(v)),
            })
            .collect();
        let _ = writeln!(out, "| {label} |{cells}");
    }
    out.push('\n');
}

/// The ten bins of one scoring: counts and R@1/5/10 in both directions.
fn bin_table(out: &mut String, label: &str, block: &Block) {
    let _ = writeln!(out, "### {label}, by object size\n");
    let _ =
        writeln!(out, "| object size | images | captions | image to text R@1 / 5 / 10 | text to image R@1 / 5 / 10 |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for b in &block.bins {
        let triple = |v: [Option<f64>; 3]| match v {
            [None, None, None] => "-".to_string(),
            [a, b, c] => format!("{} / {} / {}", pct(a), pct(b), pct(c)),
        };
        let _ = writeln!(
            out,
            "| [{:.1}, {:.1}) | {} | {} | {} | {} |",
            b.lo,
            b.hi,
            b.n_images,
            b.n_texts,
            triple([b.txt_r1, b.txt_r5, b.txt_r10]),
            triple([b.img_r1, b.img_r5, b.img_r10])
        );
    }
    out.push('\n');
}

/// Q-Pert against the plain BLIP-2 run of the same cache (`<stage>-plain/`): R@1/5/10 overall and
/// small, both directions, per scoring, with the difference in points.
fn comparison_table(out: &mut String, m: &MetricsFile, plain: &serde_json::Value) {
    let _ = writeln!(out, "## Q-Pert against plain BLIP-2 (same cache)\n");
    let _ = writeln!(out, "| scoring | metric | plain BLIP-2 | Q-Pert | delta |\n|---|---|---:|---:|---:|");
    let mut blocks: Vec<(&str, &str, &Block)> = vec![("ITC", "itc", &m.itc)];
    if let Some(b) = &m.rerank {
        blocks.push(("ITC + ITM re-rank", "rerank", b));
    }
    for (label, key, block) in blocks {
        for (small, prefix) in [(false, ""), (true, "small ")] {
            let ours = if small { &block.small.summary } else { &block.overall };
            let theirs = if small { &plain[key]["small"] } else { &plain[key] };
            for (dir, name, recalls) in [
                (Dir::T2i, "text to image", ["img_r1", "img_r5", "img_r10"]),
                (Dir::I2t, "image to text", ["txt_r1", "txt_r5", "txt_r10"]),
            ] {
                for (k, field) in recalls.iter().enumerate() {
                    let q = dir.recalls(ours)[k];
                    let p = theirs[field].as_f64();
                    let delta = match (q, p) {
                        (Some(q), Some(p)) => format!("{:+.2}", q - p),
                        _ => "-".to_string(),
                    };
                    let at = ["R@1", "R@5", "R@10"][k];
                    let _ = writeln!(out, "| {label} | {prefix}{name} {at} | {} | {} | {delta} |", pct(p), pct(q));
                }
            }
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_numbers_by_dataset_name() {
        let labels = |name: &str| published(name).iter().map(|p| p.note).collect::<Vec<_>>();
        assert_eq!(labels("Flickr30K-test"), [QPERT_FLICKR.note, BLIP2_FLICKR.note]);
        assert_eq!(labels("coco-karpathy-5k"), [BLIP2_COCO.note]);
        assert!(labels("flickr-mini").is_empty());
        assert!(labels("my-coco").is_empty());
    }
}
