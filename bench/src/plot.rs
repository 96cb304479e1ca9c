//! The SVG plot of shape 2: aggregate throughput against parallel flows, one curve per binary and
//! core count, a panel per tunnel kind; and the scaling summary printed under its table.

use std::fmt::Write as _;

use crate::shapes::{Parallel, ParallelRow};

const PANEL_W: f64 = 420.0;
const PANEL_H: f64 = 300.0;
const MARGIN_L: f64 = 56.0;
const MARGIN_R: f64 = 16.0;
const MARGIN_T: f64 = 40.0;
const MARGIN_B: f64 = 46.0;
const LEGEND_H: f64 = 64.0;
const COLORS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/// The binaries of the proxied rows, in the order they first appear.
fn binaries(parallel: &Parallel) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for row in parallel.rows.iter().filter(|r| r.cores.is_some()) {
        if !names.contains(&row.path) {
            names.push(row.path.clone());
        }
    }
    names
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The plot, as a standalone SVG document.
pub(crate) fn parallel_svg(parallel: &Parallel, title: &str) -> String {
    let names = binaries(parallel);
    let mut flows: Vec<usize> = parallel.rows.iter().map(|r| r.flows).collect();
    flows.sort_unstable();
    flows.dedup();
    let proxied: Vec<&ParallelRow> = parallel.rows.iter().filter(|r| r.cores.is_some()).collect();
    let top = proxied.iter().map(|r| r.median_gbps).fold(0.0_f64, f64::max);
    let step = nice_step(top / 5.0);
    let y_max = ((top / step).ceil() * step).max(step);

    let tunnels = ["pooled", "per-flow"];
    let width = MARGIN_L + tunnels.len() as f64 * (PANEL_W + MARGIN_R) + 8.0;
    let height = MARGIN_T + PANEL_H + MARGIN_B + LEGEND_H;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{:.0}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    for (p, tunnel) in tunnels.iter().enumerate() {
        let x0 = MARGIN_L + p as f64 * (PANEL_W + MARGIN_R);
        let y0 = MARGIN_T;
        let x_of = |i: usize| {
            if flows.len() <= 1 {
                x0 + PANEL_W / 2.0
            } else {
                x0 + 20.0 + (PANEL_W - 40.0) * i as f64 / (flows.len() - 1) as f64
            }
        };
        let y_of = |gbps: f64| y0 + PANEL_H - PANEL_H * gbps / y_max;
        let _ = writeln!(
            svg,
            r##"<rect x="{x0:.1}" y="{y0:.1}" width="{PANEL_W:.1}" height="{PANEL_H:.1}" fill="none" stroke="#888"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{} tunnel{}</text>"#,
            x0 + PANEL_W / 2.0,
            y0 - 6.0,
            tunnel,
            if *tunnel == "pooled" {
                " (one for all flows)"
            } else {
                " (one per flow)"
            }
        );
        // Grid and axes.
        let mut tick = 0.0;
        while tick <= y_max + 1e-9 {
            let y = y_of(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{x0:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{tick}</text>"##,
                x0 + PANEL_W,
                x0 - 4.0,
                y + 4.0
            );
            tick += step;
        }
        for (i, f) in flows.iter().enumerate() {
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{f}</text>"#,
                x_of(i),
                y0 + PANEL_H + 16.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">parallel flows</text>"#,
            x0 + PANEL_W / 2.0,
            y0 + PANEL_H + 34.0
        );
        if p == 0 {
            let _ = writeln!(
                svg,
                r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">aggregate Gbit/s</text>"#,
                y0 + PANEL_H / 2.0
            );
        }
        // Curves.
        for (b, name) in names.iter().enumerate() {
            let color = COLORS[b % COLORS.len()];
            for cores in [1, 2] {
                let points: Vec<(f64, f64)> = flows
                    .iter()
                    .enumerate()
                    .filter_map(|(i, f)| {
                        proxied
                            .iter()
                            .find(|r| r.path == *name && r.tunnel == *tunnel && r.cores == Some(cores) && r.flows == *f)
                            .map(|r| (x_of(i), y_of(r.median_gbps)))
                    })
                    .collect();
                if points.is_empty() {
                    continue;
                }
                let path: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let dash = if cores == 1 { r#" stroke-dasharray="6 4""# } else { "" };
                let _ = writeln!(
                    svg,
                    r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                    path.join(" ")
                );
                for (x, y) in &points {
                    let _ = writeln!(svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#);
                }
            }
        }
    }
    // Legend.
    let mut lx = MARGIN_L;
    let ly = MARGIN_T + PANEL_H + MARGIN_B + 18.0;
    for (b, name) in names.iter().enumerate() {
        let color = COLORS[b % COLORS.len()];
        for cores in [1, 2] {
            let dash = if cores == 1 { r#" stroke-dasharray="6 4""# } else { "" };
            let label = format!("{name}, {cores} core{}", if cores == 1 { "" } else { "s" });
            let _ = writeln!(
                svg,
                r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 28.0,
                lx + 34.0,
                ly + 4.0,
                escape(&label)
            );
            lx += 34.0 + 8.0 * label.len() as f64;
        }
    }
    let _ = writeln!(
        svg,
        r##"<text x="{MARGIN_L:.1}" y="{:.1}" fill="#555">dashed: both proxies restricted to 1 CPU; solid: to 2 CPUs (the load generator shares the machine)</text>"##,
        ly + 26.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// A round step (1, 2 or 5 times a power of ten) near `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let unit = raw / magnitude;
    let nice = if unit <= 1.0 {
        1.0
    } else if unit <= 2.0 {
        2.0
    } else if unit <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// The lines printed under shape 2's table: for each binary and tunnel, the 2-core / 1-core ratio
/// of each flow count and their mean at 4 flows or more (the goal is 1.8x), and each binary's
/// proxy CPU-seconds per GB at 2 cores.
pub(crate) fn scaling_summary(parallel: &Parallel) -> Vec<String> {
    let mut lines = Vec::new();
    for name in binaries(parallel) {
        for tunnel in ["pooled", "per-flow"] {
            let ratios: Vec<_> = parallel
                .ratios
                .iter()
                .filter(|r| r.path == name && r.tunnel == tunnel)
                .collect();
            if ratios.is_empty() {
                continue;
            }
            let each: Vec<String> = ratios.iter().map(|r| format!("{:.2}x@{}", r.ratio, r.flows)).collect();
            let many: Vec<f64> = ratios.iter().filter(|r| r.flows >= 4).map(|r| r.ratio).collect();
            let mean = if many.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2}x", many.iter().sum::<f64>() / many.len() as f64)
            };
            lines.push(format!(
                "scaling {name} {tunnel}: 2 cores / 1 core {}; mean at >= 4 flows {mean} (goal 1.8x)",
                each.join(" ")
            ));
        }
        let cpu: Vec<f64> = parallel
            .rows
            .iter()
            .filter(|r| r.path == name && r.cores == Some(2))
            .filter_map(|r| r.median_cpu_s_per_gb)
            .collect();
        if !cpu.is_empty() {
            lines.push(format!(
                "CPU-s/GB {name} at 2 cores, mean over every flow count and tunnel: {:.3}",
                cpu.iter().sum::<f64>() / cpu.len() as f64
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::shapes::ParallelRatio;

    fn row(path: &str, tunnel: &'static str, cores: Option<usize>, flows: usize, gbps: f64) -> ParallelRow {
        ParallelRow {
            path: path.to_owned(),
            tunnel,
            cores,
            flows,
            median_gbps: gbps,
            median_cpu_s_per_gb: cores.map(|_| 1.5),
            hbone_connections: None,
            runs: Vec::new(),
        }
    }

    #[test]
    fn the_plot_has_a_curve_per_binary_and_core_count_and_the_summary_the_ratios() {
        let mut rows = Vec::new();
        let mut ratios = Vec::new();
        for flows in [1, 4, 16] {
            rows.push(row("direct", "direct", None, flows, 50.0));
            for tunnel in ["pooled", "per-flow"] {
                rows.push(row("a<b", tunnel, Some(1), flows, 4.0));
                rows.push(row("a<b", tunnel, Some(2), flows, 7.2));
                ratios.push(ParallelRatio {
                    path: "a<b".to_owned(),
                    tunnel,
                    flows,
                    gbps_1_core: 4.0,
                    gbps_2_cores: 7.2,
                    ratio: 1.8,
                });
            }
        }
        let parallel = Parallel { rows, ratios };
        let svg = parallel_svg(&parallel, "title");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 4, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 12);
        assert!(svg.contains("a&lt;b, 2 cores") && !svg.contains("a<b"));
        let summary = scaling_summary(&parallel);
        assert_eq!(summary.len(), 3, "{summary:?}");
        assert!(summary[0].contains("1.80x@4") && summary[0].contains("mean at >= 4 flows 1.80x"));
        assert!(summary[2].contains("1.500"));
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(1.7), 2.0);
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(12.0), 20.0);
    }
}
