//! Spans as a Chrome trace-event file (the JSON `chrome://tracing` and
//! Perfetto open): per worker process, each task or call as three
//! consecutive complete events, `submit` (caller to worker), `queue`
//! (waiting in the worker) and the run itself, named by function or
//! `Class.method`.

use super::recorder::Work;
use super::spans::Span;
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// Writes `s` as a JSON string (quoted, escaped).
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn event(out: &mut String, name: &str, prefix: &str, span: &Span, from_ns: u64, to_ns: u64) {
    let (cat, tid) = match span.work {
        Work::Task => ("task", 1),
        Work::ActorCall => ("actor_call", 2),
    };
    out.push_str("{\"name\":");
    if prefix.is_empty() {
        json_string(out, name);
    } else {
        json_string(out, &format!("{prefix}{name}"));
    }
    let ts = from_ns as f64 / 1e3;
    let dur = to_ns.saturating_sub(from_ns) as f64 / 1e3;
    let _ = writeln!(
        out,
        ",\"cat\":\"{cat}\",\"ph\":\"X\",\"ts\":{ts:.3},\"dur\":{dur:.3},\"pid\":{},\"tid\":{tid},\
         \"args\":{{\"task\":\"{}\",\"job\":\"{}\",\"ok\":{}}}}},",
        span.pid, span.task, span.job, span.ok
    );
}

/// The Chrome trace of `spans`.
pub fn chrome_trace(spans: &[Span]) -> String {
    let mut out = String::with_capacity(64 + spans.len() * 600);
    out.push_str("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n");
    let pids: BTreeSet<u32> = spans.iter().map(|s| s.pid).collect();
    for pid in &pids {
        let _ = writeln!(
            out,
            "{{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":{pid},\"args\":{{\"name\":\"worker {pid}\"}}}},"
        );
        for (tid, name) in [(1, "tasks"), (2, "actor calls")] {
            let _ = writeln!(
                out,
                "{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":{pid},\"tid\":{tid},\"args\":{{\"name\":\"{name}\"}}}},"
            );
        }
    }
    for span in spans {
        if span.submitted_ns > 0 && span.submitted_ns <= span.received_ns {
            event(
                &mut out,
                &span.name,
                "submit: ",
                span,
                span.submitted_ns,
                span.received_ns,
            );
        }
        event(
            &mut out,
            &span.name,
            "queue: ",
            span,
            span.received_ns,
            span.started_ns,
        );
        event(
            &mut out,
            &span.name,
            "",
            span,
            span.started_ns,
            span.ended_ns,
        );
    }
    // The last event's separator: JSON allows no trailing comma.
    if out.ends_with(",\n") {
        out.truncate(out.len() - 2);
        out.push('\n');
    }
    out.push_str("]}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{JobId, TaskId};

    #[test]
    fn the_trace_is_json_with_three_events_per_span() {
        let span = Span {
            task: TaskId::random(),
            job: JobId::random(),
            work: Work::ActorCall,
            name: "Counter.\"add\"".into(),
            pid: 42,
            submitted_ns: 1_000_000,
            received_ns: 1_500_000,
            started_ns: 2_000_000,
            ended_ns: 5_000_000,
            ok: true,
        };
        let trace = chrome_trace(&[span.clone(), span]);
        let parsed: serde_json::Value = serde_json::from_str(&trace).expect("valid JSON");
        let events = parsed["traceEvents"].as_array().expect("events");
        let complete: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(complete.len(), 6);
        assert_eq!(complete[2]["name"], "Counter.\"add\"");
        assert_eq!(complete[2]["ts"], 2000.0);
        assert_eq!(complete[2]["dur"], 3000.0);
        assert_eq!(complete[0]["name"], "submit: Counter.\"add\"");
        assert_eq!(complete[1]["dur"], 500.0);
        assert_eq!(
            chrome_trace(&[]).trim(),
            "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n]}"
        );
    }
}
