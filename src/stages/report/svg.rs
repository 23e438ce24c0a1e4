//! `report/recall_by_size.svg`: R@1 by object-size bin, one panel per direction, one line with
//! markers per scoring (ITC, and ITM re-rank when it ran), the overall R@1 of each series as a dashed
//! line, and the number of queries under each bin. The y axis starts at the multiple of 10 below the
//! lowest value (shared by both panels, stated on the axis), since real recalls crowd near 100.
//! Hand-written SVG: no plotting crate for one chart.

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

/// One series: a label, a colour, a marker shape, and the block it plots.
struct Series<'a> {
    label: &'a str,
    colour: &'a str,
    square: bool,
    block: &'a Block,
}

impl Series<'_> {
    /// The series' marker centred at (x, y), with a hover title.
    fn marker(&self, x: f64, y: f64, title: &str) -> String {
        let shape = if self.square {
            format!(r#"<rect x="{:.1}" y="{:.1}" width="9" height="9" fill="{}""#, x - 4.5, y - 4.5, self.colour)
        } else {
            format!(r#"<circle cx="{x:.1}" cy="{y:.1}" r="5" fill="{}""#, self.colour)
        };
        format!(
            "{shape} stroke=\"white\" stroke-width=\"1\"><title>{}</title></{}>",
            escape(title),
            if self.square { "rect" } else { "circle" }
        )
    }
}

/// The lowest value on the y axis: the multiple of 10 at least 2 points below every plotted value,
/// at most 90 (so the axis spans at least 10 points).
fn y_floor(series: &[Series]) -> f64 {
    let values = series.iter().flat_map(|s| {
        let b = s.block;
        let bins = b.bins.iter().flat_map(|x| [x.txt_r1, x.img_r1]);
        bins.chain([b.overall.txt_r1, b.overall.img_r1]).flatten()
    });
    let min = values.fold(100.0f64, f64::min);
    (((min - 2.0) / 10.0).floor() * 10.0).clamp(0.0, 90.0)
}

/// The plot, as a standalone SVG document.
pub fn render(m: &MetricsFile) -> String {
    let mut series = vec![Series { label: "ITC", colour: COLOURS[0], square: false, block: &m.itc }];
    if let Some(b) = &m.rerank {
        series.push(Series { label: "ITC + ITM re-rank", colour: COLOURS[1], square: true, block: b });
    }
    let floor = y_floor(&series);
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
    let qpert = match &m.qpert.settings {
        Some(q) => format!("Q-Pert alpha {}", q.alpha),
        None => "no Q-Pert".to_string(),
    };
    let _ = writeln!(
        s,
        r##"<text x="{}" y="52" font-size="13" fill="#444" text-anchor="middle">{qpert}; bins of the largest object's area / image area; the number of queries is under each bin</text>"##,
        WIDTH / 2.0
    );
    legend(&mut s, &series);
    panel(&mut s, PANEL_LEFT[0], floor, "Image to text (image queries)", "images", &series, |b| {
        (b.bins.iter().map(|x| (x.txt_r1, x.n_images)).collect(), b.overall.txt_r1)
    });
    panel(&mut s, PANEL_LEFT[1], floor, "Text to image (caption queries)", "captions", &series, |b| {
        (b.bins.iter().map(|x| (x.img_r1, x.n_texts)).collect(), b.overall.img_r1)
    });
    s.push_str("</svg>\n");
    s
}

fn legend(s: &mut String, series: &[Series]) {
    let mut x = WIDTH / 2.0 - 200.0;
    let y = 76.0;
    for item in series {
        let _ = writeln!(
            s,
            r#"<line x1="{x}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="2.5"/>"#,
            y - 4.0,
            x + 28.0,
            y - 4.0,
            item.colour
        );
        s.push_str(&item.marker(x + 14.0, y - 4.0, item.label));
        s.push('\n');
        let _ = writeln!(s, r#"<text x="{}" y="{y}" font-size="13">{}</text>"#, x + 34.0, escape(item.label));
        x += 34.0 + 7.5 * item.label.len() as f64 + 24.0;
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

/// One direction's panel at `left`: axes, grid, a line with markers per series (broken at empty
/// bins), the overall lines, and the query counts.
fn panel(
    s: &mut String,
    left: f64,
    floor: f64,
    title: &str,
    unit: &str,
    series: &[Series],
    data: impl Fn(&Block) -> (Vec<(Option<f64>, usize)>, Option<f64>),
) {
    let bins = |b: &Block| data(b).0;
    let overall = |b: &Block| data(b).1;
    let bottom = PANEL_TOP + PANEL_HEIGHT;
    let y_of = |v: f64| bottom - (v - floor) / (100.0 - floor) * PANEL_HEIGHT;
    let group = PANEL_WIDTH / NUM_BINS as f64;
    let centre = |k: usize| left + (k as f64 + 0.5) * group;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="15" font-weight="bold" text-anchor="middle">{}</text>"#,
        left + PANEL_WIDTH / 2.0,
        PANEL_TOP - 12.0,
        escape(title)
    );
    let step = if 100.0 - floor > 50.0 { 20 } else { 10 };
    for tick in (floor as i32..=100).step_by(step) {
        let y = y_of(tick as f64);
        let colour = if tick as f64 == floor { "#333" } else { "#e3e3e3" };
        let _ =
            writeln!(s, r#"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{colour}"/>"#, left + PANEL_WIDTH);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" font-size="11" text-anchor="end">{tick}</text>"#,
            left - 6.0,
            y + 4.0
        );
    }
    let axis = if floor > 0.0 { format!("R@1 (%), axis from {floor}") } else { "R@1 (%)".to_string() };
    let mid = PANEL_TOP + PANEL_HEIGHT / 2.0;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{mid}" font-size="12" text-anchor="middle" transform="rotate(-90 {} {mid})">{axis}</text>"#,
        left - 38.0,
        left - 38.0
    );
    for item in series {
        if let Some(v) = overall(item.block) {
            let y = y_of(v);
            let _ = writeln!(
                s,
                r#"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{}" stroke-width="1.5" stroke-dasharray="6 4" opacity="0.8"><title>{}: overall R@1 {v:.2}%</title></line>"#,
                left + PANEL_WIDTH,
                item.colour,
                escape(item.label)
            );
        }
    }
    let counts = bins(series[0].block);
    for item in series {
        let values = bins(item.block);
        // Polylines over runs of non-empty bins.
        for run in values.iter().enumerate().collect::<Vec<_>>().split(|(_, (v, _))| v.is_none()) {
            if run.len() < 2 {
                continue;
            }
            let points: Vec<String> =
                run.iter().map(|(k, (v, _))| format!("{:.1},{:.1}", centre(*k), y_of(v.unwrap_or(floor)))).collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2.5" stroke-linejoin="round"/>"#,
                points.join(" "),
                item.colour
            );
        }
        for (k, (v, n)) in values.iter().enumerate() {
            if let Some(v) = v {
                let title = format!("{}: R@1 {v:.2}% of {n} {unit}", item.label);
                s.push_str(&item.marker(centre(k), y_of(*v), &title));
                s.push('\n');
            }
        }
    }
    for (k, (_, n)) in counts.iter().enumerate() {
        if *n == 0 {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{}" font-size="11" fill="#999" text-anchor="middle">none</text>"##,
                centre(k),
                bottom - 6.0
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" font-size="11" fill="#555" text-anchor="middle">{n}</text>"##,
            centre(k),
            bottom + 34.0
        );
    }
    for k in 0..=NUM_BINS {
        let x = left + k as f64 * group;
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{}" stroke="#333"/>"##, bottom + 4.0);
        let label = match k {
            0 => "0".to_string(),
            NUM_BINS => "1".to_string(),
            _ => format!(".{k}"),
        };
        let _ =
            writeln!(s, r#"<text x="{x:.1}" y="{}" font-size="11" text-anchor="middle">{label}</text>"#, bottom + 17.0);
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
}

/// Escapes text for SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::report::{GroundTruth, Ranks};

    fn block(i2t: Vec<Option<usize>>, t2i: Vec<usize>) -> Block {
        let truth = GroundTruth::new(3, vec![0, 0, 1, 1, 2, 2]).unwrap();
        Block::of(&Ranks { i2t, t2i }, &truth, &[0.05, 0.35, 0.95])
    }

    #[test]
    fn the_y_floor_is_a_multiple_of_ten_below_every_value() {
        let high = block(vec![Some(0); 3], vec![0; 6]);
        let s = |b| Series { label: "x", colour: "red", square: false, block: b };
        assert_eq!(y_floor(&[s(&high)]), 90.0);
        let low = block(vec![Some(0); 3], vec![0, 9, 0, 0, 0, 0]);
        // Bin 0's caption R@1 is 50: the floor is 40, shared by both series.
        assert_eq!(y_floor(&[s(&high), s(&low)]), 40.0);
        let zero = block(vec![Some(5); 3], vec![5; 6]);
        assert_eq!(y_floor(&[s(&zero)]), 0.0);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape(r#"a&b <c> "d""#), "a&amp;b &lt;c&gt; &quot;d&quot;");
    }
}
