//! What braid leaves on disk, and who removes it: a driver's scratch
//! directory (its node removes it when the driver dies, however it dies),
//! a session whose daemons died (the next `braid start` or `braid stop`
//! cleans it), what `braid stop` removes and the logs it keeps (within a
//! size budget), and the per-user directory, which must be private to
//! the user. Every test runs under its own `BRAID_TMPDIR`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{alive, comm, ppid, wait_until, walk, Braid, CHILD_VAR};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a node may take to notice a driver is gone and clean up.
const NOTICE: Duration = Duration::from_secs(15);

/// Entry point of the child drivers the tests start.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(CHILD_VAR) else {
        return;
    };
    match role.as_str() {
        // Joins the cluster at BRAID_ADDRESS (or starts an embedded one),
        // fills its scratch directory, says where it is, then waits: a
        // line `exit` makes it exit without shutting the runtime down.
        "scratch" => {
            let rt = braid::init_blocking().unwrap();
            let scratch = rt.scratch_dir().unwrap();
            std::fs::write(scratch.join("checkpoint.bin"), vec![7u8; 1 << 20]).unwrap();
            println!("SCRATCH={}", scratch.display());
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            if line.trim() == "exit" {
                std::process::exit(0);
            }
            drop(rt);
        }
        // Starts an embedded cluster and reports the refusal, if any.
        "init" => match braid::init_blocking() {
            Err(braid::Error::UnsafeDirectory {
                path, owner, mode, ..
            }) => println!("REFUSED={} {owner} {mode:o}", path.display()),
            Err(e) => println!("failed {e}"),
            Ok(_) => println!("started"),
        },
        _ => {}
    }
    std::process::exit(0);
}

/// The session directory a scratch directory belongs to.
fn session_of(scratch: &Path) -> PathBuf {
    let jobs = scratch.parent().unwrap();
    assert_eq!(
        jobs.file_name().unwrap(),
        "scratch",
        "{}",
        scratch.display()
    );
    jobs.parent().unwrap().to_path_buf()
}

#[test]
fn a_drivers_scratch_dir_is_removed_when_it_dies_however_it_dies() {
    let braid = Braid::new();
    let address = braid.start_head();
    for how in ["SIGKILL", "exit without shutdown"] {
        let mut driver = braid.child("scratch", Some(&address));
        let scratch = PathBuf::from(driver.line("SCRATCH="));
        assert!(scratch.join("checkpoint.bin").is_file());
        let meta = std::fs::metadata(&scratch).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700, "{}", scratch.display());
        assert!(
            session_of(&scratch).starts_with(braid.user_dir()),
            "{} is not in a session of {}",
            scratch.display(),
            braid.user_dir().display()
        );
        if how == "SIGKILL" {
            braid.kill_child(driver.pid);
        } else {
            assert!(braid.release_child(driver.pid, "exit").success());
        }
        assert!(
            wait_until(NOTICE, || !scratch.exists()),
            "{} is still there {NOTICE:?} after its driver's {how}",
            scratch.display()
        );
    }
    // The cluster itself is untouched.
    assert_eq!(braid.status()["nodes"].as_array().unwrap().len(), 1);
}

#[test]
fn a_session_whose_head_died_is_cleaned_by_the_next_start() {
    let braid = Braid::new();
    // A driver with an embedded cluster: its head dies first, then it does.
    let mut driver = braid.child("scratch", None);
    let scratch = PathBuf::from(driver.line("SCRATCH="));
    let session = session_of(&scratch);
    let daemons = braid.daemons();
    let head = daemons
        .iter()
        .find(|(pid, name)| name == "braid-head" && ppid(*pid) == Some(driver.pid))
        .map(|(pid, _)| *pid)
        .expect("the driver's embedded head");
    braid.reap_later(head);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(head as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    assert!(wait_until(NOTICE, || !alive(head)));
    braid.kill_child(driver.pid);
    // Its node exits with the driver; then nothing holds the session.
    braid.wait_no_daemons(NOTICE);
    // (The node removed the driver's scratch directory on its way out.)
    assert!(
        session.join("sockets").is_dir(),
        "the leftover this test is about: {} holds {:?}",
        session.display(),
        walk(&session)
    );

    braid.start_head();
    assert!(
        !session.exists(),
        "{} survived `braid start`",
        session.display()
    );
    let name = session.file_name().unwrap();
    let kept = braid.user_dir().join("logs").join(name);
    assert!(
        kept.join("daemons.log").is_file(),
        "the dead session's logs are not kept in {}",
        kept.display()
    );
    // The new cluster's session is live, and stays.
    let live = braid.sessions();
    assert_eq!(live.len(), 1, "{live:?}");
    assert!(live[0].join("session.lock").is_file());
}

#[test]
fn braid_stop_removes_sockets_locks_and_scratch_and_keeps_logs() {
    let braid = Braid::new();
    let address = braid.start_head();
    let mut driver = braid.child("scratch", Some(&address));
    let scratch = PathBuf::from(driver.line("SCRATCH="));
    let session = session_of(&scratch);
    let sockets = walk(&session)
        .into_iter()
        .filter(|(_, m)| m.file_type().is_socket())
        .count();
    assert!(
        sockets >= 3,
        "node.sock, store.sock and the driver's socket"
    );

    let out = braid.ok(&["stop"]);
    assert!(out.contains("Cleaned up 1 session directory"), "{out}");
    braid.kill_child(driver.pid);
    assert_eq!(braid.daemons(), Vec::new());

    assert!(
        !session.exists(),
        "{} survived `braid stop`",
        session.display()
    );
    for (path, meta) in walk(braid.dir.path()) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !meta.file_type().is_socket(),
            "socket left: {}",
            path.display()
        );
        assert!(name != "session.lock", "lock left: {}", path.display());
        assert!(name != "scratch", "scratch left: {}", path.display());
        assert!(
            !name.starts_with("cluster-"),
            "token file left: {}",
            path.display()
        );
    }
    let kept = braid
        .user_dir()
        .join("logs")
        .join(session.file_name().unwrap());
    for log in ["head.log", "node-1.log"] {
        assert!(
            kept.join(log).is_file(),
            "{log} not kept in {}",
            kept.display()
        );
    }
    assert_eq!(
        std::fs::metadata(braid.user_dir().join("logs"))
            .unwrap()
            .mode()
            & 0o777,
        0o700
    );
}

/// A session directory as a dead session leaves it: a lock file nobody
/// holds, and a (sparse) log of `log_bytes`.
fn dead_session(user: &Path, stamp: u64, log_bytes: u64) -> PathBuf {
    let dir = user.join(format!("session-{stamp}-1-0"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("session.lock"), b"").unwrap();
    std::fs::create_dir(dir.join("sockets")).unwrap();
    let log = std::fs::File::create(dir.join("head.log")).unwrap();
    log.set_len(log_bytes).unwrap();
    dir
}

#[test]
fn ended_sessions_logs_are_kept_newest_first_within_the_budget_and_live_ones_untouched() {
    let braid = Braid::new();
    let user = braid.user_dir();
    std::fs::create_dir(&user).unwrap();
    std::fs::set_permissions(&user, std::fs::Permissions::from_mode(0o700)).unwrap();
    let budget = braid::session::LOG_BUDGET;
    // Three dead sessions whose logs are 40% of the budget each: the two
    // newest fit, the oldest does not.
    let third = budget * 2 / 5;
    for stamp in [1000, 2000, 3000] {
        dead_session(&user, stamp, third);
    }
    // A live session: this test holds its lock, as a daemon would.
    let live = user.join("session-4000-1-0");
    std::fs::create_dir(&live).unwrap();
    let _held = braid::session::SessionLock::hold(&live).unwrap();

    let out = braid.ok(&["stop"]);
    assert!(out.contains("Cleaned up 3 session directories"), "{out}");
    let logs = user.join("logs");
    assert!(logs.join("session-3000-1-0/head.log").is_file());
    assert!(logs.join("session-2000-1-0/head.log").is_file());
    assert!(!logs.join("session-1000-1-0").exists(), "over the budget");
    assert_eq!(braid.sessions(), vec![live.clone()]);

    // A newest session bigger than the whole budget is still kept.
    dead_session(&user, 5000, budget + 1);
    braid.ok(&["stop"]);
    assert!(logs.join("session-5000-1-0/head.log").is_file());
    assert!(!logs.join("session-3000-1-0").exists());
    assert!(
        live.join("session.lock").is_file(),
        "a live session was touched"
    );
}

#[test]
fn a_user_dir_not_private_to_the_user_is_refused_by_name() {
    let braid = Braid::new();
    let user = braid.user_dir();
    std::fs::create_dir(&user).unwrap();

    std::fs::set_permissions(&user, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = braid.run(&["start", "--head", "--port", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&user.display().to_string()) && stderr.contains("mode 0777"),
        "{stderr}"
    );
    assert_eq!(braid.daemons(), Vec::new());

    std::fs::set_permissions(&user, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&user, Some(65534), None).unwrap();
    let out = braid.run(&["start", "--head", "--port", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&user.display().to_string()) && stderr.contains("uid 65534"),
        "{stderr}"
    );
    // An embedded cluster refuses it too, with a typed error.
    let mut driver = braid.child("init", None);
    let refused = driver.line("REFUSED=");
    assert_eq!(refused, format!("{} 65534 700", user.display()));
    assert_eq!(braid.daemons(), Vec::new());
    assert!(
        std::fs::read_dir(&user).unwrap().next().is_none(),
        "nothing written"
    );
    std::os::unix::fs::chown(&user, Some(rustix::process::getuid().as_raw()), None).unwrap();
}

#[test]
fn a_missing_user_dir_is_created_private() {
    let braid = Braid::new();
    assert!(!braid.user_dir().exists());
    braid.start_head();
    let meta = std::fs::symlink_metadata(braid.user_dir()).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.mode() & 0o7777, 0o700);
    assert_eq!(meta.uid(), rustix::process::getuid().as_raw());
    let daemons = braid.daemons();
    assert!(daemons.iter().any(|(pid, _)| comm(*pid) == "braid-head"));
}
