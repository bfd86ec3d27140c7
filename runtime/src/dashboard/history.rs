//! The past of the series the dashboard draws over time (learning curves,
//! serving latency, model lag, operator rates, backpressure), sampled by
//! the head every [`EVERY`] for the last [`KEEP`] samples, so a page
//! opened now shows the last ten minutes, not only what it saw itself.

use super::ClusterView;
use crate::telemetry::family::Value as Sample;
use axum::Json;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the head samples.
pub const EVERY: Duration = Duration::from_secs(1);
/// Samples kept per series (ten minutes).
pub const KEEP: usize = 600;

/// Whether the dashboard draws family `name` over time.
pub fn wanted(name: &str) -> bool {
    name.starts_with("braid_learning_")
        || name.starts_with("braid_serving_latency")
        || name.ends_with("_per_second")
        || name == "braid_stream_backpressure_ratio"
}

type Key = (String, String, Vec<(String, String)>);

/// Sampled series: (family, node, labels) → (Unix ms, value).
#[derive(Debug, Default)]
pub struct History {
    series: Mutex<BTreeMap<Key, VecDeque<(u64, f64)>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl History {
    /// Samples `view` every [`EVERY`] until the history is dropped.
    pub fn sample(history: Weak<History>, view: Arc<dyn ClusterView>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let by_node = view.series().await;
                let Some(history) = history.upgrade() else {
                    return;
                };
                history.record(now_ms(), by_node);
            }
        });
    }

    /// Records one sampling of every node's families at `at` (Unix ms);
    /// series no node reported for [`KEEP`] samples are dropped.
    pub fn record(&self, at: u64, by_node: Vec<(String, Vec<crate::telemetry::Family>)>) {
        let mut series = self.series.lock();
        for (node, families) in by_node {
            for family in families.into_iter().filter(|f| wanted(&f.name)) {
                for (labels, value) in family.samples {
                    let Sample::Number(v) = value else { continue };
                    let points = series
                        .entry((family.name.clone(), node.clone(), labels))
                        .or_default();
                    points.push_back((at, v));
                    if points.len() > KEEP {
                        points.pop_front();
                    }
                }
            }
        }
        let oldest = at.saturating_sub(EVERY.as_millis() as u64 * KEEP as u64);
        series.retain(|_, points| points.back().is_some_and(|(t, _)| *t >= oldest));
    }

    /// `/api/history?name=N`: every series of family `N`, as `{node,
    /// labels, points: [[unix_ms, value], ...]}`.
    pub fn query(&self, name: &str) -> Json<Value> {
        let series = self.series.lock();
        let out: Vec<Value> = series
            .iter()
            .filter(|((family, _, _), _)| family == name)
            .map(|((_, node, labels), points)| {
                let labels: serde_json::Map<String, Value> = labels
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                json!({
                    "node": node,
                    "labels": labels,
                    "points": points.iter().map(|(t, v)| json!([t, v])).collect::<Vec<_>>(),
                })
            })
            .collect();
        Json(Value::Array(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{Family, Kind};

    #[test]
    fn keeps_the_wanted_series_and_forgets_the_silent() {
        let history = History::default();
        let auc = |v: f64| {
            vec![(
                "node".to_string(),
                vec![
                    Family::new("braid_learning_auc", "auc", Kind::Gauge).with(&[("job", "j")], v),
                    Family::new("braid_cluster_nodes", "nodes", Kind::Gauge).with(&[], 1.0),
                ],
            )]
        };
        history.record(1_000, auc(0.7));
        history.record(2_000, auc(0.8));
        let answer = history.query("braid_learning_auc").0;
        assert_eq!(answer[0]["points"], json!([[1000, 0.7], [2000, 0.8]]));
        assert_eq!(answer[0]["labels"]["job"], "j");
        assert_eq!(history.query("braid_cluster_nodes").0, json!([]));
        history.record(2_000 + 1_000 * KEEP as u64 + 1_000, Vec::new());
        assert_eq!(history.query("braid_learning_auc").0, json!([]));
    }
}
