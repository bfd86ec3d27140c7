//! A scrape's worth of metrics as plain values ([`Family`]), and their
//! OpenMetrics text ([`render`], through `prometheus-client`).
//!
//! Daemons build their families at scrape time from the state they keep
//! anyway (the head's tables, a node's ledger and store), so nothing is
//! recorded twice and a scrape costs nothing between scrapes.

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// What kind of metric a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A count that only grows (rendered with a `_total` suffix).
    Counter,
    /// A distribution: cumulative buckets, a sum and a count.
    Histogram,
}

/// One sample's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// A gauge's or counter's value.
    Number(f64),
    /// A histogram: counts per bucket (the `+Inf` bucket's is what
    /// `count` has beyond them), the sum of the observations and their
    /// count.
    Histogram {
        /// `(upper bound, observations in this bucket alone)`, bounds
        /// increasing.
        buckets: Vec<(f64, u64)>,
        /// Sum of the observations.
        sum: f64,
        /// Number of observations.
        count: u64,
    },
}

/// Labels of one sample, as `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

/// A metric family: its name (without `braid_`'s counters' `_total`),
/// help text, kind and samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Family {
    /// The family's name, e.g. `braid_store_used_bytes`.
    pub name: String,
    /// One line on what it measures.
    pub help: String,
    /// Its kind.
    pub kind: Kind,
    /// Its samples.
    pub samples: Vec<(Labels, Value)>,
}

impl Family {
    /// An empty family.
    pub fn new(name: impl Into<String>, help: impl Into<String>, kind: Kind) -> Family {
        Family {
            name: name.into(),
            help: help.into(),
            kind,
            samples: Vec::new(),
        }
    }

    /// A family of one unlabelled sample.
    pub fn single(name: &str, help: &str, kind: Kind, value: f64) -> Family {
        Family::new(name, help, kind).with(&[], value)
    }

    /// Adds a sample with these labels.
    pub fn with(mut self, labels: &[(&str, &str)], value: f64) -> Family {
        self.push(labels, value);
        self
    }

    /// Adds a sample with these labels.
    pub fn push(&mut self, labels: &[(&str, &str)], value: f64) {
        self.samples.push((to_labels(labels), Value::Number(value)));
    }
}

/// Owned labels from borrowed pairs.
pub fn to_labels(labels: &[(&str, &str)]) -> Labels {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[derive(Debug)]
struct Families(Vec<Family>);

impl prometheus_client::collector::Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            if family.samples.is_empty() {
                continue;
            }
            let kind = match family.kind {
                Kind::Gauge => MetricType::Gauge,
                Kind::Counter => MetricType::Counter,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut metric = encoder.encode_descriptor(&family.name, &family.help, None, kind)?;
            for (labels, value) in &family.samples {
                let mut sample = metric.encode_family(labels)?;
                match (family.kind, value) {
                    (Kind::Counter, Value::Number(v)) => {
                        sample.encode_counter::<Labels, f64, f64>(v, None)?
                    }
                    (_, Value::Number(v)) => sample.encode_gauge(v)?,
                    (
                        _,
                        Value::Histogram {
                            buckets,
                            sum,
                            count,
                        },
                    ) => {
                        let mut all = buckets.clone();
                        let counted: u64 = buckets.iter().map(|(_, n)| n).sum();
                        all.push((f64::INFINITY, count.saturating_sub(counted)));
                        sample.encode_histogram::<Labels>(*sum, *count, &all, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// Renders families as OpenMetrics text, ending in `# EOF`.
pub fn render(families: Vec<Family>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(families)));
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        // Writing to a String cannot fail; a family the encoder refuses
        // would only drop that scrape's text.
        text = "# EOF\n".into();
    }
    text
}

/// Joins OpenMetrics texts of different families into one (one `# EOF`).
pub fn join(texts: &[&str]) -> String {
    let mut out = String::new();
    for text in texts {
        for line in text.lines() {
            if line != "# EOF" {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_kind_in_openmetrics_text() {
        let text = render(vec![
            Family::single("braid_x", "an x", Kind::Gauge, 2.5),
            Family::new("braid_calls", "calls", Kind::Counter).with(&[("name", "f")], 3.0),
            Family {
                name: "braid_wait_seconds".into(),
                help: "wait".into(),
                kind: Kind::Histogram,
                samples: vec![(
                    vec![],
                    Value::Histogram {
                        buckets: vec![(0.1, 1), (1.0, 1)],
                        sum: 1.5,
                        count: 3,
                    },
                )],
            },
        ]);
        assert!(text.contains("# TYPE braid_x gauge\nbraid_x 2.5"), "{text}");
        assert!(text.contains("braid_calls_total{name=\"f\"} 3"), "{text}");
        assert!(
            text.contains("braid_wait_seconds_bucket{le=\"0.1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("braid_wait_seconds_bucket{le=\"1.0\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("braid_wait_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(text.contains("braid_wait_seconds_count 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn joined_texts_end_once() {
        let a = render(vec![Family::single("a", "a", Kind::Gauge, 1.0)]);
        let b = render(vec![Family::single("b", "b", Kind::Gauge, 2.0)]);
        let joined = join(&[&a, &b]);
        assert_eq!(joined.matches("# EOF").count(), 1);
        assert!(joined.contains("a 1") && joined.contains("b 2"));
    }
}
