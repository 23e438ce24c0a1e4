//! `report/recall_by_size.svg`: R@1 by object-size bin, one panel per direction, one bar series per
//! scoring (ITC, and ITM re-rank when it ran), the overall R@1 of each series as a dashed line, and
//! the number of queries under each bin. Hand-written SVG: no plotting crate for one chart.

use std::fmt::Write;

use super::{Block, MetricsFile};
use crate::metrics::NUM_BINS;

const WIDTH: f64 = 980.0;
const HEIGHT: f64 = 470.0;
const PANEL_TOP: f64 = 112.0;
const PANEL_HEIGHT: f64 = 250.0;
const PANEL_WIDTH: f64 = 400.0;
const PANEL_LEFT: [f64; 2] = [70.0, 550.0];
/// Okabe-Ito orange and blue: distinguishable with any colour vision.
const COLOURS: [&str; 2] = ["#E69F00", "#0072B2"];
const FONT: &str = "font-family=\"Helvetica, Arial, sans-serif\"";

/// One bar series: a label, a colour, and the block it plots.
struct Series<'a> {
    label: &'a str,
    colour: &'a str,
    block: &'a Block,
}

/// The plot, as a standalone SVG document.
pub fn render(m: &MetricsFile) -> String {
    let mut series = vec![Series { label: "ITC", colour: COLOURS[0], block: &m.itc }];
    if let Some(b) = &m.rerank {
        series.push(Series { label: "ITC + ITM re-rank", colour: COLOURS[1], block: b });
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" {FONT}>"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="30" font-size="20" font-weight="bold" text-anchor="middle">Recall@1 by object size: {}</text>"#,
        WIDTH / 2.0,
        escape(&m.dataset)
    );
    let qpert = if m.qpert.enabled { format!("Q-Pert alpha {}", m.qpert.alpha) } else { "no Q-Pert".to_string() };
    let _ = writeln!(
        s,
        r##"<text x="{}" y="52" font-size="13" fill="#444" text-anchor="middle">{qpert}; bins of the largest object's area / image area; the number of queries is under each bin</text>"##,
        WIDTH / 2.0
    );
    legend(&mut s, &series);
    panel(&mut s, PANEL_LEFT[0], "Image to text (image queries)", "images", &series, |b| {
        b.bins.iter().map(|x| (x.txt_r1, x.n_images)).collect()
    }, |b| b.overall.txt_r1);
    panel(&mut s, PANEL_LEFT[1], "Text to image (caption queries)", "captions", &series, |b| {
        b.bins.iter().map(|x| (x.img_r1, x.n_texts)).collect()
    }, |b| b.overall.img_r1);
    s.push_str("</svg>\n");
    s
}

fn legend(s: &mut String, series: &[Series]) {
    let mut x = WIDTH / 2.0 - 200.0;
    let y = 76.0;
    for item in series {
        let _ = writeln!(s, r#"<rect x="{x}" y="{}" width="14" height="14" fill="{}"/>"#, y - 11.0, item.colour);
        let _ = writeln!(s, r#"<text x="{}" y="{y}" font-size="13">{}</text>"#, x + 20.0, escape(item.label));
        x += 20.0 + 8.0 * item.label.len() as f64 + 24.0;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{x}" y1="{}" x2="{}" y2="{}" stroke="#333" stroke-width="2" stroke-dasharray="6 4"/>"##,
        y - 4.0,
        x + 28.0,
        y - 4.0
    );
    let _ = writeln!(s, r#"<text x="{}" y="{y}" font-size="13">overall R@1 (all queries)</text>"#, x + 34.0);
}

/// One direction's panel at `left`: axes, grid, bars per bin and series, overall lines, counts.
fn panel(
    s: &mut String,
    left: f64,
    title: &str,
    unit: &str,
    series: &[Series],
    bins: impl Fn(&Block) -> Vec<(Option<f64>, usize)>,
    overall: impl Fn(&Block) -> Option<f64>,
) {
    let bottom = PANEL_TOP + PANEL_HEIGHT;
    let y_of = |v: f64| bottom - v / 100.0 * PANEL_HEIGHT;
    let group = PANEL_WIDTH / NUM_BINS as f64;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="15" font-weight="bold" text-anchor="middle">{}</text>"#,
        left + PANEL_WIDTH / 2.0,
        PANEL_TOP - 12.0,
        escape(title)
    );
    for tick in [0, 20, 40, 60, 80, 100] {
        let y = y_of(tick as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="1"/>"##,
            left + PANEL_WIDTH,
            if tick == 0 { "#333" } else { "#e3e3e3" }
        );
        let _ = writeln!(s, r#"<text x="{}" y="{}" font-size="11" text-anchor="end">{tick}</text>"#, left - 6.0, y + 4.0);
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 {} {})">R@1 (%)</text>"#,
        left - 38.0,
        PANEL_TOP + PANEL_HEIGHT / 2.0,
        left - 38.0,
        PANEL_TOP + PANEL_HEIGHT / 2.0
    );
    let bar = (group - 8.0) / series.len() as f64;
    let counts = bins(series[0].block);
    for k in 0..NUM_BINS {
        let x0 = left + k as f64 * group + 4.0;
        for (j, item) in series.iter().enumerate() {
            let (value, n) = bins(item.block)[k];
            let x = x0 + j as f64 * bar;
            match value {
                Some(v) => {
                    let y = y_of(v);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {v:.2}% of {n} {unit}</title></rect>"#,
                        bar - 1.0,
                        bottom - y,
                        item.colour,
                        escape(item.label)
                    );
                }
                None if j == 0 => {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{}" font-size="11" fill="#999" text-anchor="middle">none</text>"##,
                        x0 + (group - 8.0) / 2.0,
                        bottom - 6.0
                    );
                }
                None => {}
            }
        }
        let centre = left + (k as f64 + 0.5) * group;
        let _ = writeln!(
            s,
            r##"<text x="{centre:.1}" y="{}" font-size="11" fill="#555" text-anchor="middle">{}</text>"##,
            bottom + 34.0,
            counts[k].1
        );
    }
    for k in 0..=NUM_BINS {
        let x = left + k as f64 * group;
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{}" stroke="#333"/>"##, bottom + 4.0);
        let label = if k == 0 { "0".to_string() } else if k == NUM_BINS { "1".to_string() } else { format!(".{k}") };
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{}" font-size="11" text-anchor="middle">{label}</text>"#, bottom + 17.0);
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" font-size="11" fill="#555" text-anchor="end">n {unit}</text>"##,
        left - 6.0,
        bottom + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">object size (largest kept box, fraction of the image)</text>"#,
        left + PANEL_WIDTH / 2.0,
        bottom + 56.0
    );
    for item in series {
        if let Some(v) = overall(item.block) {
            let y = y_of(v);
            let _ = writeln!(
                s,
                r#"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{}" stroke-width="2" stroke-dasharray="6 4"><title>{}: overall R@1 {v:.2}%</title></line>"#,
                left + PANEL_WIDTH,
                item.colour,
                escape(item.label)
            );
        }
    }
}

/// Escapes text for SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
