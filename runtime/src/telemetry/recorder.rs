//! What a process records about the tasks and actor calls it submits and
//! runs: counts by function or method name and histograms of queue wait
//! and run time (of the runs timed: at most [`TIMED_PER_SECOND`] a
//! second per process). Recording is
//! a few atomic adds into a fixed table of
//! [`MAX_NAMES`] names per kind (no lock, no allocation after a name's
//! first use; names past the table count as `other`). Every process
//! sends a [`Snapshot`] of it to its node ([`crate::wire::Message::Metrics`]),
//! which sums them over its processes for `/metrics`.

use super::family::{to_labels, Family, Kind, Value};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Runs a process times a second (their clock reads, histograms and
/// spans); the runs past them are only counted.
pub const TIMED_PER_SECOND: usize = 10_000;

/// Distinct names kept per kind of work (bounded cardinality).
pub const MAX_NAMES: usize = 64;

/// Upper bounds of the histograms' buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0,
];

/// Kinds of work recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Work {
    /// Remote function calls.
    Task,
    /// Actor method calls.
    ActorCall,
}

impl Work {
    fn index(self) -> usize {
        match self {
            Work::Task => 0,
            Work::ActorCall => 1,
        }
    }

    /// The metric name prefix of this kind.
    pub fn prefix(self) -> &'static str {
        match self {
            Work::Task => "braid_tasks",
            Work::ActorCall => "braid_actor_calls",
        }
    }
}

/// What happened to one task or call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Its caller submitted it.
    Submitted,
    /// It ran to an answer (its function may have returned an error value).
    Finished,
    /// It failed (a panic, an error, its worker died).
    Failed,
    /// Its caller submitted it again after its worker died.
    Retried,
}

const EVENTS: [(Event, &str, &str); 4] = [
    (Event::Submitted, "submitted", "submitted by a caller"),
    (Event::Finished, "finished", "run to an answer"),
    (
        Event::Failed,
        "failed",
        "failed (error, panic or lost worker)",
    ),
    (
        Event::Retried,
        "retried",
        "submitted again after a worker died",
    ),
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS.len()],
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

struct Slot {
    /// The name's hash with the low bit set (0: free).
    key: AtomicU64,
    name: OnceLock<Box<str>>,
    events: [AtomicU64; 4],
    queue: Histogram,
    run: Histogram,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            key: AtomicU64::new(0),
            name: OnceLock::new(),
            events: [const { AtomicU64::new(0) }; 4],
            queue: Histogram::new(),
            run: Histogram::new(),
        }
    }
}

/// One kind's names, and a last slot for names past them.
struct Table {
    slots: [Slot; MAX_NAMES + 1],
}

static TABLES: [Table; 2] = [const {
    Table {
        slots: [const { Slot::new() }; MAX_NAMES + 1],
    }
}; 2];

const OTHER: &str = "other";

/// The hash of `parts`, eight bytes at a time (a name is hashed on every
/// call; its slot still checks the name itself). Names are hashed by
/// their parts: a name is always given as the same parts (a function's
/// `[name]`, a method's `[class, method]`).
fn hash(parts: &[&str]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h: u64 = parts.len() as u64;
    for part in parts {
        let bytes = part.as_bytes();
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        h = (h.rotate_left(5) ^ u64::from_le_bytes(tail) ^ (bytes.len() as u64) << 56)
            .wrapping_mul(K);
    }
    // Mixes every bit into the low ones the table's index takes.
    h ^= h >> 31;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 29;
    h | 1
}

fn same_name(name: &str, parts: &[&str]) -> bool {
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            match rest.strip_prefix('.') {
                Some(r) => rest = r,
                None => return false,
            }
        }
        match rest.strip_prefix(part) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

/// The slot of the name `parts` joined by dots.
fn slot(work: Work, parts: &[&str]) -> &'static Slot {
    let table = &TABLES[work.index()];
    let key = hash(parts);
    let start = (key >> 1) as usize % MAX_NAMES;
    for probe in 0..MAX_NAMES {
        let slot = &table.slots[(start + probe) % MAX_NAMES];
        let mut seen = slot.key.load(Ordering::Acquire);
        if seen == 0 {
            seen = match slot
                .key
                .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let _ = slot.name.set(parts.join(".").into_boxed_str());
                    return slot;
                }
                Err(now) => now,
            };
        }
        if seen == key {
            match slot.name.get() {
                Some(name) if !same_name(name, parts) => continue,
                _ => return slot,
            }
        }
    }
    let other = &table.slots[MAX_NAMES];
    let _ = other.name.set(OTHER.into());
    other
}

/// Where one name's counts and times are kept.
#[derive(Clone, Copy)]
pub struct Counter(&'static Slot);

impl Counter {
    /// The counter of the task or call named by `parts` (joined by dots).
    pub fn of(work: Work, parts: &[&str]) -> Counter {
        Counter(slot(work, parts))
    }

    /// Counts one event (nothing while recording is off).
    pub fn count(self, event: Event) {
        if super::enabled() {
            self.0.events[event_index(event)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records one run that waited `queued` and ran for `ran`. Returns
    /// the name it is counted under (for its span).
    pub fn ran(self, queued: Duration, ran: Duration, ok: bool) -> &'static str {
        if super::enabled() {
            self.0.queue.observe(queued);
            self.0.run.observe(ran);
            self.0.events[if ok { 1 } else { 2 }].fetch_add(1, Ordering::Relaxed);
        }
        self.name()
    }

    /// The name counted under (`other` past the table).
    pub fn name(self) -> &'static str {
        self.0.name.get().map_or(OTHER, |n| n)
    }
}

/// The counters of one actor class's methods, or of a process's
/// functions, each found in the table once and kept here by the name it
/// was asked for: counting a call then costs a short string compare and
/// an atomic add. `N` names are kept (a name whose way another took is
/// looked up in the table each time).
pub struct Counters<const N: usize> {
    work: Work,
    class: Option<Box<str>>,
    ways: [OnceLock<(Box<str>, Counter)>; N],
}

/// The counters an actor client or host keeps of its class's methods.
pub type MethodCounters = Counters<8>;

static FUNCTIONS: Counters<64> = Counters {
    work: Work::Task,
    class: None,
    ways: [const { OnceLock::new() }; 64],
};

impl Counters<64> {
    /// This process's counters of remote functions, by their full path
    /// (counted under its last segment, [`short_name`]).
    pub fn functions() -> &'static Counters<64> {
        &FUNCTIONS
    }
}

impl<const N: usize> Counters<N> {
    /// The counters of the methods of actor class `class` (a full path).
    pub fn methods(class: &str) -> Counters<N> {
        Counters {
            work: Work::ActorCall,
            class: Some(short_name(class).into()),
            ways: [const { OnceLock::new() }; N],
        }
    }

    /// The counter of `name`: a method of the class, or a function's path.
    pub fn of(&self, name: &str) -> Counter {
        let way = &self.ways[way_of(name) % N];
        if let Some((kept, counter)) = way.get() {
            if **kept == *name {
                return *counter;
            }
        }
        let counter = Counter(match &self.class {
            Some(class) => slot(self.work, &[class, name]),
            None => slot(self.work, &[short_name(name)]),
        });
        let _ = way.set((name.into(), counter));
        counter
    }

    /// Counts one event of `name` (nothing, not even a lookup, while
    /// recording is off).
    pub fn count(&self, name: &str, event: Event) {
        if super::enabled() {
            self.of(name).count(event);
        }
    }
}

/// A name's way in a [`Counters`]: its length and last bytes, which tell
/// apart most names of one class.
fn way_of(name: &str) -> usize {
    let bytes = name.as_bytes();
    let tail = bytes.len().saturating_sub(2);
    bytes[tail..]
        .iter()
        .fold(bytes.len().wrapping_mul(31), |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(*b))
        })
}

fn event_index(event: Event) -> usize {
    match event {
        Event::Submitted => 0,
        Event::Finished => 1,
        Event::Failed => 2,
        Event::Retried => 3,
    }
}

/// The last segment of a Rust path (`a::b::f` → `f`): the name a task
/// or an actor class is counted and labelled under.
pub fn short_name(path: &str) -> &str {
    path.rsplit("::").next().unwrap_or(path)
}

/// A histogram's counts at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// Observations per bucket of [`BUCKETS`] (the last ones beyond them
    /// are `count` minus their sum).
    pub buckets: Vec<u64>,
    /// Sum of the observations, in nanoseconds.
    pub sum_ns: u64,
    /// Number of observations.
    pub count: u64,
}

impl HistogramSnapshot {
    fn add(&mut self, other: &HistogramSnapshot) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_ns += other.sum_ns;
        self.count += other.count;
    }

    fn value(&self) -> Value {
        Value::Histogram {
            buckets: BUCKETS
                .iter()
                .zip(&self.buckets)
                .map(|(b, n)| (*b, *n))
                .collect(),
            sum: self.sum_ns as f64 / 1e9,
            count: self.count,
        }
    }
}

/// One name's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameStats {
    /// Task or actor call.
    pub work: Work,
    /// The function's or method's name.
    pub name: String,
    /// Submitted, finished, failed, retried.
    pub events: [u64; 4],
    /// Time from arriving at the worker to starting.
    pub queue: HistogramSnapshot,
    /// Time running.
    pub run: HistogramSnapshot,
}

/// A process's figures at one moment (or a node's sum of them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Per kind and name.
    pub names: Vec<NameStats>,
    /// What the process published ([`super::published`]).
    #[serde(default)]
    pub published: Vec<Family>,
    /// Runs not recorded as spans (`spans::dropped`, which the process
    /// fills in when it sends the snapshot).
    #[serde(default)]
    pub spans_dropped: u64,
}

impl Snapshot {
    /// This process's figures now.
    pub fn now() -> Snapshot {
        let mut names = Vec::new();
        for work in [Work::Task, Work::ActorCall] {
            for slot in &TABLES[work.index()].slots {
                let Some(name) = slot.name.get() else {
                    continue;
                };
                names.push(NameStats {
                    work,
                    name: name.to_string(),
                    events: std::array::from_fn(|i| slot.events[i].load(Ordering::Relaxed)),
                    queue: slot.queue.snapshot(),
                    run: slot.run.snapshot(),
                });
            }
        }
        Snapshot {
            names,
            published: super::published::all(),
            spans_dropped: 0,
        }
    }

    /// Adds `other`'s counts to these, name by name (past
    /// [`MAX_NAMES`] names per kind, into `other`); its published
    /// families are not added (they are gauges of a live process).
    pub fn add(&mut self, other: &Snapshot) {
        self.spans_dropped += other.spans_dropped;
        for stats in &other.names {
            let found = self
                .names
                .iter()
                .position(|s| s.work == stats.work && s.name == stats.name);
            let index = match found {
                Some(i) => i,
                None => {
                    let kept = self.names.iter().filter(|s| s.work == stats.work).count();
                    let name = if kept >= MAX_NAMES {
                        OTHER.to_string()
                    } else {
                        stats.name.clone()
                    };
                    match self
                        .names
                        .iter()
                        .position(|s| s.work == stats.work && s.name == name)
                    {
                        Some(i) => i,
                        None => {
                            self.names.push(NameStats {
                                work: stats.work,
                                name,
                                events: [0; 4],
                                queue: HistogramSnapshot::default(),
                                run: HistogramSnapshot::default(),
                            });
                            self.names.len() - 1
                        }
                    }
                }
            };
            let mine = &mut self.names[index];
            for (a, b) in mine.events.iter_mut().zip(stats.events) {
                *a += b;
            }
            mine.queue.add(&stats.queue);
            mine.run.add(&stats.run);
        }
    }

    /// The figures as metric families (`braid_tasks_*`,
    /// `braid_actor_calls_*`), with a `name` label.
    pub fn families(&self) -> Vec<Family> {
        let mut out = vec![Family::single(
            "braid_spans_dropped",
            "Runs not recorded as timeline spans (past the spans a process keeps per second)",
            Kind::Counter,
            self.spans_dropped as f64,
        )];
        for work in [Work::Task, Work::ActorCall] {
            let what = match work {
                Work::Task => "Tasks",
                Work::ActorCall => "Actor calls",
            };
            let mine: Vec<&NameStats> = self.names.iter().filter(|s| s.work == work).collect();
            for (i, (_, suffix, help)) in EVENTS.iter().enumerate() {
                let mut family = Family::new(
                    format!("{}_{suffix}", work.prefix()),
                    format!("{what} {help}"),
                    Kind::Counter,
                );
                for stats in &mine {
                    family.push(&[("name", &stats.name)], stats.events[i] as f64);
                }
                out.push(family);
            }
            for (suffix, help, pick) in [
                (
                    "queue_seconds",
                    "waiting in their worker's queue",
                    (|s: &NameStats| &s.queue) as fn(&NameStats) -> &HistogramSnapshot,
                ),
                ("run_seconds", "running", |s: &NameStats| &s.run),
            ] {
                let mut family = Family::new(
                    format!("{}_{suffix}", work.prefix()),
                    format!(
                        "{what}' time {help} (runs timed: at most {} per process per second)",
                        TIMED_PER_SECOND
                    ),
                    Kind::Histogram,
                );
                for stats in &mine {
                    family
                        .samples
                        .push((to_labels(&[("name", &stats.name)]), pick(stats).value()));
                }
                out.push(family);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_name_and_sums_snapshots() {
        Counter::of(Work::ActorCall, &["RecorderTest", "add"]).count(Event::Submitted);
        Counter::of(Work::ActorCall, &["RecorderTest", "add"]).ran(
            Duration::from_micros(20),
            Duration::from_millis(2),
            true,
        );
        let snap = Snapshot::now();
        let stats = snap
            .names
            .iter()
            .find(|s| s.name == "RecorderTest.add")
            .cloned();
        let Some(stats) = stats else {
            panic!("no figures for RecorderTest.add in {snap:?}");
        };
        assert_eq!(stats.events, [1, 1, 0, 0]);
        assert_eq!(stats.run.count, 1);
        assert_eq!(stats.queue.buckets[1], 1, "20 µs falls in the 50 µs bucket");
        let mut sum = Snapshot::default();
        sum.add(&snap);
        sum.add(&snap);
        let doubled = sum.names.iter().find(|s| s.name == "RecorderTest.add");
        assert_eq!(doubled.map(|s| s.events), Some([2, 2, 0, 0]));
        let text = super::super::family::render(sum.families());
        assert!(
            text.contains("braid_actor_calls_finished_total{name=\"RecorderTest.add\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn names_past_the_table_count_as_other() {
        let names: Vec<String> = (0..MAX_NAMES + 8).map(|i| format!("f{i}")).collect();
        for name in &names {
            Counter::of(Work::Task, &["RecorderOverflow", name]).count(Event::Submitted);
        }
        let snap = Snapshot::now();
        let tasks = snap.names.iter().filter(|s| s.work == Work::Task).count();
        assert!(tasks <= MAX_NAMES + 1, "{tasks} task names kept");
        let counted: u64 = snap
            .names
            .iter()
            .filter(|s| {
                s.work == Work::Task && (s.name.starts_with("RecorderOverflow.") || s.name == OTHER)
            })
            .map(|s| s.events[0])
            .sum();
        assert!(counted >= names.len() as u64);
    }

    #[test]
    fn kept_counters_count_under_the_full_name_even_when_ways_collide() {
        let methods: Counters<1> = Counters::methods("tests::KeptCounters");
        // One way: every other name collides with the first one kept.
        for _ in 0..3 {
            methods.count("get", Event::Submitted);
            methods.count("put", Event::Submitted);
        }
        methods.of("put").ran(Duration::ZERO, Duration::ZERO, false);
        let snap = Snapshot::now();
        let events = |work: Work, name: &str| {
            snap.names
                .iter()
                .find(|s| s.work == work && s.name == name)
                .map(|s| s.events)
        };
        assert_eq!(
            events(Work::ActorCall, "KeptCounters.get"),
            Some([3, 0, 0, 0])
        );
        assert_eq!(
            events(Work::ActorCall, "KeptCounters.put"),
            Some([3, 0, 1, 0])
        );
        assert_eq!(methods.of("get").name(), "KeptCounters.get");
    }

    #[test]
    fn a_name_matches_its_parts() {
        assert!(same_name("A.b", &["A", "b"]));
        assert!(!same_name("A.bc", &["A", "b"]));
        assert!(!same_name("Ab", &["A", "b"]));
        // Hashed by parts: how a name splits into them counts.
        assert_eq!(hash(&["A", "b"]), hash(&["A", "b"]));
        assert_ne!(hash(&["A", "b"]), hash(&["Ab"]));
        assert_ne!(hash(&["A", "b"]), hash(&["A", "b", ""]));
        assert_ne!(hash(&["A", "b"]), hash(&["b", "A"]));
        let long = "a_method_name_longer_than_a_word";
        assert_ne!(hash(&["Class", long]), hash(&["Clas", long]));
    }
}
