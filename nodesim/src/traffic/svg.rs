//! A small SVG line chart: value vs number of entries (log scale), one line per mode through
//! the medians, min–max whiskers at each point. Hand-written to keep xtask's build light.

use std::fmt::Write as _;

pub struct Series {
    pub label: String,
    /// (x, median, min, max)
    pub points: Vec<(f64, f64, f64, f64)>,
}

pub struct Plot {
    pub title: String,
    /// A longer description in small print under the title.
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// baseline, iptables, ebpf.
const COLOURS: [&str; 3] = ["#666666", "#d95f02", "#1b9e77"];
const DASHES: [&str; 3] = ["4 3", "", ""];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" step (1, 2 or 5 × 10^k) giving about `ticks` intervals over `span`.
fn nice_step(span: f64, ticks: f64) -> f64 {
    let raw = span / ticks;
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// An axis label: integers with thousands separators, or as many decimals as the step needs.
fn tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        super::report::group(v)
    } else {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a small positive decimal count"
        )]
        let decimals = (-step.log10()).ceil().max(0.0) as usize;
        format!("{v:.decimals$}")
    }
}

impl Plot {
    pub fn render(&self) -> String {
        let finite = |v: f64| v.is_finite();
        let xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .filter(|x| *x > 0.0)
            .collect();
        let ys: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().flat_map(|p| [p.1, p.2, p.3]))
            .filter(|v| finite(*v))
            .collect();
        let (x_min, x_max) = xs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x.log10()), b.max(x.log10()))
            });
        let (x_min, x_max) = if x_min < x_max {
            (x_min - 0.15, x_max + 0.15)
        } else {
            (x_min - 1.0, x_min + 1.0)
        };
        let y_top = ys.iter().copied().fold(0.0, f64::max);
        let step = nice_step(if y_top > 0.0 { y_top } else { 1.0 }, 5.0);
        let y_max = (y_top / step).ceil().max(1.0) * step;
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let px = |x: f64| LEFT + (x.log10() - x_min) / (x_max - x_min) * plot_w;
        let py = |y: f64| TOP + plot_h - y / y_max * plot_h;

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            r##"<rect width="100%" height="100%" fill="white"/><text x="{x}" y="20" text-anchor="middle" font-size="14">{}</text><text x="{x}" y="36" text-anchor="middle" font-size="10" fill="#444">{}</text>"##,
            escape(&self.title),
            escape(&self.subtitle),
            x = WIDTH / 2.0,
        );
        // Y grid and labels.
        let mut y = 0.0;
        while y <= y_max + step / 2.0 {
            let yy = py(y);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                yy + 4.0,
                tick(y, step)
            );
            y += step;
        }
        // X ticks at the measured scales.
        let mut ticks: Vec<f64> = xs.clone();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        for x in ticks {
            let xx = px(x);
            let _ = writeln!(
                s,
                r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + plot_h,
                TOP + plot_h + 18.0,
                tick(x, 1.0)
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
            LEFT + plot_w / 2.0,
            HEIGHT - 14.0,
            escape(&self.x_label),
            TOP + plot_h / 2.0,
            escape(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            draw_series(&mut s, i, series, &px, &py, LEFT + plot_w + 14.0);
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#666">median; bars: min–max</text>"##,
            LEFT + plot_w + 14.0,
            TOP + 10.0 + f64::from(u32::try_from(self.series.len()).unwrap_or(0)) * 20.0 + 6.0
        );
        s.push_str("</svg>\n");
        s
    }
}

/// One mode's line, its median markers with min–max whiskers, and its legend entry at `lx`.
fn draw_series(
    s: &mut String,
    i: usize,
    series: &Series,
    px: &impl Fn(f64) -> f64,
    py: &impl Fn(f64) -> f64,
    lx: f64,
) {
    let finite = |v: f64| v.is_finite();
    let colour = COLOURS[i % COLOURS.len()];
    let dash = DASHES[i % DASHES.len()];
    let points: Vec<String> = series
        .points
        .iter()
        .filter(|p| p.0 > 0.0 && finite(p.1))
        .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
        .collect();
    let _ = writeln!(
        *s,
        r#"<polyline fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}" points="{}"/>"#,
        points.join(" ")
    );
    for &(x, median, min, max) in &series.points {
        if x <= 0.0 || !finite(median) {
            continue;
        }
        // Spread whiskers are offset per series so overlapping ones stay readable.
        #[expect(clippy::cast_precision_loss, reason = "a handful of series")]
        let xx = px(x) + (i as f64 - 1.0) * 4.0;
        if finite(min) && finite(max) {
            let _ = writeln!(
                *s,
                r#"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="{colour}"/>"#,
                py(min),
                py(max)
            );
        }
        let _ = writeln!(
            *s,
            r#"<circle cx="{xx:.1}" cy="{:.1}" r="3.5" fill="{colour}"/>"#,
            py(median)
        );
    }
    #[expect(clippy::cast_precision_loss, reason = "a handful of series")]
    let ly = TOP + 10.0 + i as f64 * 20.0;

    let _ = writeln!(
        *s,
        r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
        lx + 24.0,
        lx + 30.0,
        ly + 4.0,
        escape(&series.label)
    );
}
