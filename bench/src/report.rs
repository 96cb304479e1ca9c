//! Small tables on standard output, medians, and percentiles.

use hdrhistogram::Histogram;
use meshwire_testkit::measure::median;
use serde::Serialize;

/// A text table: a header row and rows of cells, columns as wide as their widest cell.
pub(crate) struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(title: impl Into<String>, header: &[&str]) -> Table {
        Table {
            title: title.into(),
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as Markdown-compatible text (pipes between columns).
    pub(crate) fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> = (0..columns)
                .map(|i| {
                    let cell = cells.get(i).map_or("", String::as_str);
                    format!("{cell:<width$}", width = widths[i])
                })
                .collect();
            format!("| {} |", padded.join(" | "))
        };
        let mut out = format!("{}\n\n", self.title);
        out.push_str(&line(&self.header));
        out.push('\n');
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

/// Formats a number with `digits` decimals, or `-` when absent.
pub(crate) fn fmt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) p50_us: f64,
    pub(crate) p90_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) max_us: f64,
}

impl Percentiles {
    /// The percentiles of a histogram recorded in nanoseconds.
    pub(crate) fn of(h: &Histogram<u64>) -> Percentiles {
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            p50_us: us(0.50),
            p90_us: us(0.90),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: h.max() as f64 / 1000.0,
        }
    }

    /// The median of each percentile over several runs.
    pub(crate) fn median_of(runs: &[Percentiles]) -> Percentiles {
        let m = |f: fn(&Percentiles) -> f64| median(runs.iter().map(f)).unwrap_or(0.0);
        Percentiles {
            p50_us: m(|p| p.p50_us),
            p90_us: m(|p| p.p90_us),
            p99_us: m(|p| p.p99_us),
            p999_us: m(|p| p.p999_us),
            max_us: m(|p| p.max_us),
        }
    }

    /// Each percentile minus the baseline's.
    pub(crate) fn minus(&self, base: &Percentiles) -> Percentiles {
        Percentiles {
            p50_us: self.p50_us - base.p50_us,
            p90_us: self.p90_us - base.p90_us,
            p99_us: self.p99_us - base.p99_us,
            p999_us: self.p999_us - base.p999_us,
            max_us: self.max_us - base.max_us,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::<f64>::new()), None);
    }

    #[test]
    fn table_pads_columns() {
        let mut t = Table::new("T", &["a", "bbb"]);
        t.row(vec!["xxxx".into(), "y".into()]);
        let text = t.render();
        assert!(text.contains("| a    | bbb |"), "{text}");
        assert!(text.contains("| xxxx | y   |"), "{text}");
    }
}
