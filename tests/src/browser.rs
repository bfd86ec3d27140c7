//! Headless Chromium for the dashboard's tests and benchmarks: finding the
//! binary (Debian's `chromium`, which `.ci/run` installs), loading a page
//! and reading what the dashboard wrote into it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Chromium binary: `BRAID_CHROMIUM`, else `chromium` or
/// `chromium-browser` on `PATH`.
///
/// # Panics
/// If there is none, saying how to get one: a test needing it must not
/// pass without it.
pub fn chromium() -> PathBuf {
    if let Ok(path) = std::env::var("BRAID_CHROMIUM") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|dir| [dir.join("chromium"), dir.join("chromium-browser")])
            .find(|p| p.is_file())
    });
    match found {
        Some(path) => path,
        None => panic!(
            "no `chromium` binary on PATH: install Debian's chromium package \
             (apt-get install chromium; .ci/run does) or set BRAID_CHROMIUM"
        ),
    }
}

/// Loads `url` in headless Chromium with profile directory `profile` and
/// `extra` flags (`--dump-dom`, `--screenshot=…`), giving the page 4 s of
/// virtual time; returns what Chromium printed.
///
/// # Panics
/// If Chromium cannot run or fails.
pub fn load(profile: &Path, url: &str, extra: &[&str]) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("run chromium: {e}"));
    assert!(
        out.status.success(),
        "chromium failed on {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The milliseconds from navigation to the dashboard's first view drawn
/// with its data, as the page wrote them into its DOM.
pub fn first_view_ms(dom: &str) -> Option<u64> {
    dom.split("id=\"load-ms\" data-done=\"1\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .and_then(|ms| ms.trim().parse().ok())
}
