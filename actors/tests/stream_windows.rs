//! Window operator: hand-computed cases, brute-force reference models for
//! every window kind, and snapshot/restore equivalence.

use std::collections::BTreeSet;

use braid_actors::stream::operator::{EventTime, Operator};
use braid_actors::stream::window::{
    Aggregator, Reduce, WindowOperator, WindowResult, WindowSpec, WindowSpecError,
};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
struct Sum;

impl Aggregator<u32> for Sum {
    type Acc = u64;
    type Out = u64;

    fn create(&self) -> u64 {
        0
    }

    fn add(&self, acc: &mut u64, value: &u32) {
        *acc += u64::from(*value);
    }

    fn result(&self, acc: &u64) -> u64 {
        *acc
    }
}

fn sum_op(spec: WindowSpec) -> WindowOperator<u8, u32, Sum> {
    WindowOperator::new(spec, Sum)
}

fn max_u32(a: &u32, b: &u32) -> u32 {
    *a.max(b)
}

#[derive(Debug, Clone)]
enum Event {
    Record {
        key: u8,
        time: Option<EventTime>,
        value: u32,
    },
    Watermark(EventTime),
}

type Output<R> = Vec<(WindowResult<u8, R>, Option<EventTime>)>;

fn feed<A: Aggregator<u32>>(
    op: &mut WindowOperator<u8, u32, A>,
    events: &[Event],
    out: &mut Output<A::Out>,
) {
    for event in events {
        match *event {
            Event::Record { key, time, value } => op.process((key, value), time, out),
            Event::Watermark(w) => op.on_watermark(w, out),
        }
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

fn run_all<A: Aggregator<u32>>(
    op: &mut WindowOperator<u8, u32, A>,
    events: &[Event],
) -> Output<A::Out> {
    let mut out = Vec::new();
    feed(op, events, &mut out);
    op.on_end(&mut out).unwrap_or_else(|e| panic!("{e}"));
    out
}

fn rec(key: u8, time: EventTime, value: u32) -> Event {
    Event::Record {
        key,
        time: Some(time),
        value,
    }
}

fn res<R>(key: u8, start: i64, end: i64, value: R) -> WindowResult<u8, R> {
    WindowResult {
        key,
        start,
        end,
        value,
    }
}

/// What a reference model produced: the output, late and untimed counts.
struct Expected {
    out: Output<u64>,
    late: u64,
    untimed: u64,
}

/// `(size, slide)` of a time spec.
fn time_geometry(spec: WindowSpec) -> (i64, i64) {
    match spec {
        WindowSpec::TumblingTime { size } => (size, size),
        WindowSpec::SlidingTime { size, slide } => (size, slide),
        _ => unreachable!("not a time spec"),
    }
}

/// Every window `[start, end)` with start a multiple of `slide` and
/// length `size` that contains `t`, by scanning candidate starts.
fn windows_containing(t: i64, size: i64, slide: i64) -> Vec<(i64, i64)> {
    let first = (t - size).div_euclid(slide) * slide;
    let mut windows = Vec::new();
    let mut start = first;
    while start <= t {
        if start <= t && t < start + size {
            windows.push((start, start + size));
        }
        start += slide;
    }
    windows
}

/// A record accepted by the time-window reference: key, value and the
/// windows `(start, end)` it joined.
type Joined = (u8, u64, Vec<(i64, i64)>);

/// Time windows, brute force: keep every accepted record with the windows
/// it joined; a window's value is recomputed from scratch over all records
/// that joined it whenever it fires.
fn reference_time(
    spec: WindowSpec,
    lateness: i64,
    events: &[Event],
    combine: fn(u64, u64) -> u64,
) -> Expected {
    let (size, slide) = time_geometry(spec);
    let mut accepted: Vec<Joined> = Vec::new();
    let mut wm = i64::MIN;
    let mut exp = Expected {
        out: Vec::new(),
        late: 0,
        untimed: 0,
    };
    let value_of = |accepted: &[Joined], key: u8, w: (i64, i64)| {
        accepted
            .iter()
            .filter(|(k, _, ws)| *k == key && ws.contains(&w))
            .map(|(_, v, _)| *v)
            .reduce(combine)
            .unwrap_or_else(|| unreachable!("fired an empty window"))
    };
    let fire = |accepted: &[Joined], out: &mut Output<u64>, due: &dyn Fn(i64) -> bool| {
        let mut windows = BTreeSet::new();
        for (k, _, ws) in accepted {
            for &(s, e) in ws {
                if due(e) {
                    windows.insert((e, s, *k));
                }
            }
        }
        for (e, s, k) in windows {
            out.push((res(k, s, e, value_of(accepted, k, (s, e))), Some(e - 1)));
        }
    };
    for event in events {
        match *event {
            Event::Record { time: None, .. } => exp.untimed += 1,
            Event::Record {
                key,
                time: Some(t),
                value,
            } => {
                let live: Vec<(i64, i64)> = windows_containing(t, size, slide)
                    .into_iter()
                    .filter(|&(_, e)| e + lateness > wm)
                    .collect();
                if live.is_empty() {
                    if t + lateness < wm {
                        exp.late += 1;
                    }
                    continue;
                }
                accepted.push((key, u64::from(value), live.clone()));
                for (s, e) in live {
                    if e <= wm {
                        let v = value_of(&accepted, key, (s, e));
                        exp.out.push((res(key, s, e, v), Some(e - 1)));
                    }
                }
            }
            Event::Watermark(w) => {
                if w > wm {
                    fire(&accepted, &mut exp.out, &|e: i64| wm < e && e <= w);
                    wm = w;
                }
            }
        }
    }
    fire(&accepted, &mut exp.out, &|e: i64| e > wm);
    exp
}

/// Count windows, by index arithmetic over each key's full history.
fn reference_count(spec: WindowSpec, events: &[Event], combine: fn(u64, u64) -> u64) -> Expected {
    let (size, slide) = match spec {
        WindowSpec::TumblingCount { size } => (size as usize, size as usize),
        WindowSpec::SlidingCount { size, slide } => (size as usize, slide as usize),
        _ => unreachable!("not a count spec"),
    };
    let mut history: Vec<Vec<u64>> = vec![Vec::new(); 256];
    let mut exp = Expected {
        out: Vec::new(),
        late: 0,
        untimed: 0,
    };
    for event in events {
        if let Event::Record { key, time, value } = *event {
            let values = &mut history[usize::from(key)];
            values.push(u64::from(value));
            let n = values.len();
            if n % slide == 0 {
                let first = n.saturating_sub(size);
                let v = values[first..n]
                    .iter()
                    .copied()
                    .reduce(combine)
                    .unwrap_or_else(|| unreachable!("empty count window"));
                let r = res(key, first as i64 + 1, n as i64 + 1, v);
                exp.out.push((r, time));
            }
        }
    }
    exp
}

fn reference(
    spec: WindowSpec,
    lateness: i64,
    events: &[Event],
    combine: fn(u64, u64) -> u64,
) -> Expected {
    match spec {
        WindowSpec::TumblingCount { .. } | WindowSpec::SlidingCount { .. } => {
            reference_count(spec, events, combine)
        }
        WindowSpec::TumblingTime { .. } | WindowSpec::SlidingTime { .. } => {
            reference_time(spec, lateness, events, combine)
        }
    }
}

/// Runs the operator with a sum and with `Reduce(max)` and compares both
/// with the reference model.
fn check_against_reference(
    spec: WindowSpec,
    lateness: i64,
    events: &[Event],
) -> Result<(), TestCaseError> {
    let mut op = sum_op(spec).allowed_lateness(lateness);
    let out = run_all(&mut op, events);
    let exp = reference(spec, lateness, events, |a, b| a + b);
    prop_assert_eq!(&out, &exp.out);
    prop_assert_eq!(op.late_records(), exp.late);
    prop_assert_eq!(op.untimed_records(), exp.untimed);

    let mut op = WindowOperator::new(spec, Reduce(max_u32)).allowed_lateness(lateness);
    let out: Output<u64> = run_all(&mut op, events)
        .into_iter()
        .map(|(r, t)| (res(r.key, r.start, r.end, u64::from(r.value)), t))
        .collect();
    let exp = reference(spec, lateness, events, u64::max);
    prop_assert_eq!(&out, &exp.out);
    prop_assert_eq!(op.late_records(), exp.late);
    prop_assert_eq!(op.untimed_records(), exp.untimed);
    Ok(())
}

/// Records with times in 0..1000 that mostly follow a drifting clock with
/// bounded disorder, occasionally behind the watermark or untimed,
/// interleaved with non-decreasing watermarks trailing the clock.
fn events() -> impl Strategy<Value = Vec<Event>> {
    let step = (0u8..10, 0u8..5, 0i64..13, -60i64..40, 0u32..1000, 0u8..20);
    prop::collection::vec(step, 0..150).prop_map(|steps| {
        let mut clock = 0i64;
        let mut last_wm = i64::MIN;
        let mut events = Vec::new();
        for (kind, key, advance, jitter, value, untimed) in steps {
            if kind < 2 {
                let w = (clock - 4 * advance).max(last_wm);
                last_wm = w;
                events.push(Event::Watermark(w));
            } else {
                clock = (clock + advance).min(999);
                let time = (untimed != 0).then(|| (clock + jitter).clamp(0, 999));
                events.push(Event::Record { key, time, value });
            }
        }
        events
    })
}

fn lateness() -> impl Strategy<Value = i64> {
    prop_oneof![Just(0i64), 1i64..100]
}

fn spec() -> impl Strategy<Value = WindowSpec> {
    prop_oneof![
        (1u64..6).prop_map(|size| WindowSpec::TumblingCount { size }),
        (1u64..6, 1u64..6).prop_map(|(size, slide)| WindowSpec::SlidingCount { size, slide }),
        (1i64..200).prop_map(|size| WindowSpec::TumblingTime { size }),
        (1i64..200, 1i64..100).prop_map(|(size, slide)| WindowSpec::SlidingTime { size, slide }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn tumbling_count_matches_reference(size in 1u64..8, events in events()) {
        check_against_reference(WindowSpec::TumblingCount { size }, 0, &events)?;
    }

    #[test]
    fn sliding_count_matches_reference(size in 1u64..8, slide in 1u64..8, events in events()) {
        check_against_reference(WindowSpec::SlidingCount { size, slide }, 0, &events)?;
    }

    #[test]
    fn tumbling_time_matches_reference(
        size in 1i64..200,
        lateness in lateness(),
        events in events(),
    ) {
        check_against_reference(WindowSpec::TumblingTime { size }, lateness, &events)?;
    }

    #[test]
    fn sliding_time_matches_reference(
        size in 1i64..200,
        slide in 1i64..100,
        lateness in lateness(),
        events in events(),
    ) {
        check_against_reference(WindowSpec::SlidingTime { size, slide }, lateness, &events)?;
    }

    #[test]
    fn restore_then_suffix_equals_uninterrupted_run(
        spec in spec(),
        lateness in lateness(),
        events in events(),
        split in any::<prop::sample::Index>(),
    ) {
        let fresh = || sum_op(spec).allowed_lateness(lateness);
        let mut whole = fresh();
        let expected = run_all(&mut whole, &events);

        let split = split.index(events.len() + 1);
        let (prefix, suffix) = events.split_at(split);
        let mut first = fresh();
        let mut out = Vec::new();
        feed(&mut first, prefix, &mut out);
        let snapshot = first.snapshot();

        let mut continued = out.clone();
        feed(&mut first, suffix, &mut continued);
        first.on_end(&mut continued).unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!(&continued, &expected);

        let bytes = snapshot
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .encode()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut second = fresh();
        second.restore(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        feed(&mut second, suffix, &mut out);
        second.on_end(&mut out).unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!(&out, &expected);
        prop_assert_eq!(second.late_records(), whole.late_records());
        prop_assert_eq!(second.untimed_records(), whole.untimed_records());
    }
}

#[test]
fn tumbling_time_fires_on_watermark_ordered_by_end_start_key() {
    let mut op = sum_op(WindowSpec::TumblingTime { size: 10 });
    let mut out = Vec::new();
    feed(
        &mut op,
        &[
            rec(2, 1, 1),
            rec(1, 5, 2),
            rec(2, 9, 3),
            rec(1, 12, 4),
            rec(1, 25, 5),
        ],
        &mut out,
    );
    assert!(out.is_empty());
    op.on_watermark(9, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.is_empty(), "window [0, 10) may still receive time 9");
    op.on_watermark(10, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out,
        vec![(res(1, 0, 10, 2), Some(9)), (res(2, 0, 10, 4), Some(9))]
    );
    out.clear();
    op.on_watermark(30, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out,
        vec![(res(1, 10, 20, 4), Some(19)), (res(1, 20, 30, 5), Some(29))]
    );
    out.clear();
    op.on_end(&mut out).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.is_empty());
}

#[test]
fn negative_times_align_to_multiples_of_size() {
    let mut op = sum_op(WindowSpec::TumblingTime { size: 10 });
    let out = run_all(&mut op, &[rec(0, -3, 7), rec(0, -10, 1), rec(0, 0, 2)]);
    assert_eq!(
        out,
        vec![(res(0, -10, 0, 8), Some(-1)), (res(0, 0, 10, 2), Some(9))]
    );
}

#[test]
fn late_record_is_counted_and_dropped() {
    let mut op = sum_op(WindowSpec::TumblingTime { size: 10 });
    let mut out = Vec::new();
    feed(
        &mut op,
        &[
            rec(0, 4, 1),
            Event::Watermark(10),
            rec(0, 3, 100),
            rec(0, 9, 100),
            rec(0, 10, 5),
        ],
        &mut out,
    );
    assert_eq!(op.late_records(), 2);
    op.on_end(&mut out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out,
        vec![(res(0, 0, 10, 1), Some(9)), (res(0, 10, 20, 5), Some(19))]
    );
}

#[test]
fn allowed_lateness_refires_updated_window_until_it_expires() {
    let mut op = sum_op(WindowSpec::TumblingTime { size: 10 }).allowed_lateness(5);
    let mut out = Vec::new();
    feed(
        &mut op,
        &[
            rec(0, 4, 1),
            Event::Watermark(12),
            rec(0, 8, 2),
            Event::Watermark(15),
            rec(0, 9, 100),
        ],
        &mut out,
    );
    assert_eq!(
        out,
        vec![(res(0, 0, 10, 1), Some(9)), (res(0, 0, 10, 3), Some(9))]
    );
    assert_eq!(op.late_records(), 1);
}

#[test]
fn untimed_records_are_counted_and_dropped_by_time_windows() {
    let mut op = sum_op(WindowSpec::TumblingTime { size: 10 });
    let mut out = Vec::new();
    op.process((0, 5), None, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    op.process((0, 6), Some(1), &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    op.on_end(&mut out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out, vec![(res(0, 0, 10, 6), Some(9))]);
    assert_eq!(op.untimed_records(), 1);
    assert_eq!(op.late_records(), 0);
}

#[test]
fn sliding_time_record_lands_in_several_windows() {
    let mut op = sum_op(WindowSpec::SlidingTime {
        size: 30,
        slide: 10,
    });
    let mut out = Vec::new();
    op.process((0, 1), Some(25), &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    op.process((0, 10), Some(31), &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    op.on_watermark(30, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out, vec![(res(0, 0, 30, 1), Some(29))]);
    op.on_end(&mut out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out,
        vec![
            (res(0, 0, 30, 1), Some(29)),
            (res(0, 10, 40, 11), Some(39)),
            (res(0, 20, 50, 11), Some(49)),
            (res(0, 30, 60, 10), Some(59)),
        ]
    );
}

#[test]
fn sliding_time_with_gaps_drops_records_between_windows() {
    let mut op = sum_op(WindowSpec::SlidingTime { size: 5, slide: 10 });
    let out = run_all(&mut op, &[rec(0, 3, 1), rec(0, 7, 2), rec(0, 12, 4)]);
    assert_eq!(
        out,
        vec![(res(0, 0, 5, 1), Some(4)), (res(0, 10, 15, 4), Some(14))]
    );
    assert_eq!(op.late_records(), 0);
}

#[test]
fn tumbling_count_fires_at_the_nth_record_of_each_key() {
    let mut op = sum_op(WindowSpec::TumblingCount { size: 3 });
    let mut out = Vec::new();
    feed(
        &mut op,
        &[
            rec(0, 100, 1),
            rec(1, 0, 10),
            rec(0, 50, 2),
            Event::Watermark(1_000),
            rec(1, 0, 20),
        ],
        &mut out,
    );
    assert!(out.is_empty(), "count windows ignore watermarks");
    op.process((0, 3), None, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out, vec![(res(0, 1, 4, 6), None)]);
    op.process((0, 4), Some(7), &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    op.process((0, 5), Some(8), &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    op.process((0, 6), Some(9), &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out,
        vec![(res(0, 1, 4, 6), None), (res(0, 4, 7, 15), Some(9))]
    );
    let before_end = out.len();
    op.on_end(&mut out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.len(), before_end, "incomplete count windows never fire");
}

#[test]
fn sliding_count_covers_the_last_size_records() {
    let mut op = sum_op(WindowSpec::SlidingCount { size: 3, slide: 2 });
    let events: Vec<Event> = (1..=6).map(|v| rec(0, 0, v)).collect();
    let out = run_all(&mut op, &events);
    assert_eq!(
        out,
        vec![
            (res(0, 1, 3, 3), Some(0)),
            (res(0, 2, 5, 9), Some(0)),
            (res(0, 4, 7, 15), Some(0)),
        ]
    );
}

#[test]
fn reduce_combines_values_pairwise() {
    let mut op = WindowOperator::new(WindowSpec::TumblingCount { size: 3 }, Reduce(max_u32));
    let out = run_all(&mut op, &[rec(4, 0, 5), rec(4, 0, 9), rec(4, 0, 2)]);
    assert_eq!(out, vec![(res(4, 1, 4, 9), Some(0))]);
}

#[test]
fn restore_rejects_a_snapshot_of_another_configuration() {
    let mut op = sum_op(WindowSpec::TumblingTime { size: 10 });
    let bytes = match op.snapshot().map(|s| s.encode()) {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => panic!("encode: {e}"),
        Err(e) => panic!("snapshot: {e}"),
    };
    let mut other = sum_op(WindowSpec::TumblingTime { size: 20 });
    assert!(other.restore(&bytes).is_err());
    let mut other = sum_op(WindowSpec::TumblingTime { size: 10 }).allowed_lateness(1);
    assert!(other.restore(&bytes).is_err());
    let mut same = sum_op(WindowSpec::TumblingTime { size: 10 });
    assert!(same.restore(&bytes).is_ok());
    assert!(same.restore(b"not a snapshot").is_err());
}

#[test]
fn invalid_specs_are_rejected() {
    let zero_size = WindowSpec::TumblingTime { size: 0 };
    assert_eq!(
        WindowOperator::<u8, u32, Sum>::try_new(zero_size, Sum).err(),
        Some(WindowSpecError::Size(zero_size))
    );
    let zero_slide = WindowSpec::SlidingCount { size: 2, slide: 0 };
    assert_eq!(
        WindowOperator::<u8, u32, Sum>::try_new(zero_slide, Sum).err(),
        Some(WindowSpecError::Slide(zero_slide))
    );
    assert!(WindowSpec::SlidingTime { size: 5, slide: 10 }
        .validate()
        .is_ok());
}
