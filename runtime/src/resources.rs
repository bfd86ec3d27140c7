//! Resource demands and capacities: CPUs, memory and custom named
//! quantities, as in Ray.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The key for CPUs.
pub const CPU: &str = "CPU";
/// The key for memory, in bytes.
pub const MEMORY: &str = "memory";

/// A set of named quantities: a demand, a capacity, or what is left.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources(pub BTreeMap<String, f64>);

const EPSILON: f64 = 1e-9;

/// The most CPUs a node may offer: more than any machine has, room to
/// oversubscribe, and a bound that catches a typo such as `1e9`.
pub const MAX_CPUS: f64 = 65_536.0;
/// The most of a custom resource a node may offer.
pub const MAX_CUSTOM: f64 = 1e12;

/// Checks an amount a node would offer of resource `name`: finite, not
/// negative, and at most [`MAX_CPUS`] CPUs or [`MAX_CUSTOM`] of anything
/// else.
pub fn check_offer(name: &str, amount: f64) -> Result<(), String> {
    let max = if name == CPU { MAX_CPUS } else { MAX_CUSTOM };
    if !amount.is_finite() || amount < 0.0 {
        return Err(format!(
            "{name} must be a finite number, 0 or more; got {amount}"
        ));
    }
    if amount > max {
        return Err(format!(
            "{name} {amount} is more than the {max} a node may offer"
        ));
    }
    Ok(())
}

impl Resources {
    /// No resources.
    pub fn new() -> Self {
        Resources::default()
    }

    /// `n` CPUs.
    pub fn cpus(n: f64) -> Self {
        Resources::new().with(CPU, n)
    }

    /// Adds (or replaces) one quantity; zero removes it.
    pub fn with(mut self, name: &str, amount: f64) -> Self {
        self.set(name, amount);
        self
    }

    /// Sets one quantity; zero removes it.
    pub fn set(&mut self, name: &str, amount: f64) {
        if amount.abs() < EPSILON {
            self.0.remove(name);
        } else {
            self.0.insert(name.to_string(), amount);
        }
    }

    /// One quantity (zero when absent).
    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }

    /// Whether `demand` fits in `self`.
    pub fn fits(&self, demand: &Resources) -> bool {
        demand.0.iter().all(|(k, v)| self.get(k) + EPSILON >= *v)
    }

    /// Takes `demand` out of `self`.
    pub fn subtract(&mut self, demand: &Resources) {
        for (k, v) in &demand.0 {
            let left = self.get(k) - v;
            self.0.insert(k.clone(), left.max(0.0));
        }
    }

    /// Gives `demand` back to `self`, never above `cap`.
    pub fn add(&mut self, demand: &Resources, cap: &Resources) {
        for (k, v) in &demand.0 {
            let back = (self.get(k) + v).min(cap.get(k));
            self.0.insert(k.clone(), back);
        }
    }

    /// How utilized a node with `self` in total and `available` free would
    /// be once `demand` is taken: the largest used share of its CPU or of
    /// any resource asked for (Ray's critical-resource utilization).
    pub fn utilization_after(&self, available: &Resources, demand: &Resources) -> f64 {
        demand
            .0
            .keys()
            .map(String::as_str)
            .chain([CPU])
            .filter_map(|name| {
                let total = self.get(name);
                (total > EPSILON).then(|| {
                    let left = available.get(name) - demand.get(name);
                    ((total - left) / total).max(0.0)
                })
            })
            .fold(0.0, f64::max)
    }

    /// Parses a JSON object of custom resources, such as `{"GPU": 2}`.
    pub fn parse_json(text: &str) -> Result<Resources, String> {
        let map: BTreeMap<String, f64> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON object of numbers: {e}"))?;
        for (k, v) in &map {
            check_offer(k, *v)?;
        }
        Ok(Resources(map))
    }
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{k}: {v}")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_subtract_add() {
        let total = Resources::cpus(2.0).with("GPU", 1.0);
        let mut avail = total.clone();
        let demand = Resources::cpus(1.5);
        assert!(avail.fits(&demand));
        avail.subtract(&demand);
        assert!(!avail.fits(&demand));
        avail.add(&demand, &total);
        assert_eq!(avail, total);
        assert!(!total.fits(&Resources::new().with("TPU", 1.0)));
        assert!(Resources::parse_json("{\"GPU\": -1}").is_err());
        assert_eq!(
            Resources::parse_json("{\"GPU\": 2}").unwrap().get("GPU"),
            2.0
        );
    }
}
