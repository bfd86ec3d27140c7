//! How a worker reports a panic in a task or actor method: the message
//! and where it happened reach the caller in `Error::TaskError`, and the
//! worker's output (forwarded to the driver) shows the panic with only
//! the application's frames of its backtrace (when `RUST_BACKTRACE` asks
//! for one), not the runtime's and the standard library's around them.

use std::cell::RefCell;

thread_local! {
    /// Where the last panic on this thread happened.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs the worker's panic hook.
pub(crate) fn install() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        let message = payload_text(info.payload());
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let mut out = format!(
            "thread '{name}' panicked at {}:\n{message}\n",
            location.as_deref().unwrap_or("<unknown>")
        );
        if backtrace_wanted() {
            let trace = std::backtrace::Backtrace::force_capture().to_string();
            out.push_str("stack backtrace (the application's frames):\n");
            out.push_str(&application_frames(&trace));
        }
        eprint!("{out}");
        LOCATION.with(|l| *l.borrow_mut() = location);
    }));
}

/// The message of a caught panic, with where it happened when this thread
/// recorded it.
pub(crate) fn message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload_text(payload);
    match LOCATION.with(|l| l.borrow_mut().take()) {
        Some(at) => format!("{text} (at {at})"),
        None => text,
    }
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panicked".to_string()
    }
}

fn backtrace_wanted() -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0")
}

/// The frames of a printed backtrace between the panic machinery (above)
/// and the runtime that called the task (below).
fn application_frames(trace: &str) -> String {
    let mut frames: Vec<String> = Vec::new();
    for line in trace.lines() {
        let starts_frame = line
            .trim_start()
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        match frames.last_mut() {
            Some(frame) if !starts_frame => {
                frame.push('\n');
                frame.push_str(line);
            }
            _ => frames.push(line.to_string()),
        }
    }
    let symbol = |frame: &str| frame.lines().next().unwrap_or_default().to_string();
    let machinery = |s: &str| {
        [
            "panicking",
            "backtrace",
            "rust_begin_unwind",
            "braid::panics",
        ]
        .iter()
        .any(|m| s.contains(m))
    };
    let runtime = |s: &str| s.contains("__braid_invoke") || s.contains("braid::executor");
    // The runtime's first frame below the task, then the panic machinery's
    // last frame above it.
    let end = frames
        .iter()
        .position(|f| runtime(&symbol(f)))
        .unwrap_or(frames.len());
    let first = frames[..end]
        .iter()
        .rposition(|f| machinery(&symbol(f)))
        .map_or(0, |i| i + 1);
    let kept = &frames[first..end];
    let mut out = String::new();
    for frame in kept {
        out.push_str(frame);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_applications_frames_are_kept() {
        let trace = "   0: std::backtrace::Backtrace::force_capture
             at /rustc/library/std/src/backtrace.rs:1
   1: braid::panics::install::{{closure}}
   2: std::panicking::rust_panic_with_hook
   3: core::panicking::panic_fmt
   4: my_app::parse
             at ./src/main.rs:10:5
   5: my_app::work
             at ./src/main.rs:20:5
   6: my_app::work::__braid_invoke
   7: braid::executor::run_task::{{closure}}
   8: tokio::runtime::task::core::Core<T,S>::poll
   9: std::panicking::catch_unwind::do_call
";
        let kept = application_frames(trace);
        assert!(
            kept.contains("my_app::parse") && kept.contains("main.rs:20:5"),
            "{kept}"
        );
        assert!(
            !kept.contains("panicking") && !kept.contains("tokio"),
            "{kept}"
        );
        assert!(!kept.contains("__braid_invoke"), "{kept}");
    }
}
