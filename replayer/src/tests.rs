//! End to end: real programs recorded by the recorder, then replayed from their log. The
//! recorder's test program (`recorder/testprogs/rrctest.c`, `rrc_recorder::testprog`) is
//! compiled at test time with `cc`.
//! Root, no containers.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::path::Path;

use rrc_recorder::launch::{self, Command};
use rrc_recorder::{EventlogSink, Options};

use crate::{Plan, ReplayError, ReplaySummary, Replayer};

fn prog() -> &'static Path {
    rrc_recorder::testprog::path()
}

fn capture() -> (File, OwnedFd) {
    let f = tempfile::tempfile().expect("tempfile");
    let fd = OwnedFd::from(f.try_clone().expect("dup"));
    (f, fd)
}

fn read_back(mut f: File) -> String {
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_to_string(&mut s).expect("read");
    s
}

/// Records `args` of the test program: its log and what it printed.
fn record(args: &[&str]) -> (Vec<u8>, String) {
    let (f, fd) = capture();
    let cmd = Command::new(prog()).args(args).stdout(fd).no_aslr(true);
    let (_, sink) =
        launch::record_command(&cmd, EventlogSink::new(Vec::new(), "t"), Options::default())
            .expect("record");
    let log = sink.finish().expect("finish");
    (log, read_back(f))
}

/// Replays `log` on a fresh run of `args`: the result and what it printed.
fn replay(log: &[u8], args: &[&str]) -> (Result<ReplaySummary, ReplayError>, String) {
    let (f, fd) = capture();
    let plan = Plan::from_log(log, None).expect("plan");
    let cmd = Command::new(prog())
        .args(args)
        .stdout(fd)
        .trap_tsc(true)
        .no_aslr(true);
    let pid = launch::spawn_stopped(&cmd).expect("spawn");
    let mut r = Replayer::new(rrc_recorder::ptrace::Ptrace, plan, None);
    r.attach(pid).expect("attach");
    let result = r.run();
    (result, read_back(f))
}

fn replayed_same(args: &[&str]) -> ReplaySummary {
    let (log, recorded) = record(args);
    let (result, replayed) = replay(&log, args);
    let summary = result.unwrap_or_else(|e| panic!("replay of {args:?}: {e}"));
    assert_eq!(
        replayed, recorded,
        "replay of {args:?} printed something else"
    );
    assert!(summary.live_after.is_some(), "never went live: {summary:?}");
    summary
}

#[test]
fn random_bytes_are_the_recorded_ones() {
    // A second live run prints other bytes; the replay prints the recorded ones.
    let (log, recorded) = record(&["getrandom", "32"]);
    let (_, live) = record(&["getrandom", "32"]);
    assert_ne!(live, recorded, "two live runs drew the same random bytes");
    let (result, replayed) = replay(&log, &["getrandom", "32"]);
    let s = result.expect("replay");
    assert_eq!(replayed, recorded);
    assert!(s.injected >= 1, "{s:?}");
}

#[test]
fn clocks_read_the_recorded_time() {
    let s = replayed_same(&["clock", "8"]);
    assert!(s.applied.get("time").copied().unwrap_or(0) >= 10, "{s:?}");
}

#[test]
fn rdtsc_returns_the_recorded_counter() {
    let s = replayed_same(&["rdtsc", "4"]);
    assert!(s.applied.get("time").copied().unwrap_or(0) >= 5, "{s:?}");
}

#[test]
fn a_file_read_returns_what_was_read_when_recorded() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("input");
    std::fs::write(&path, "what the file held when recorded\n".repeat(50)).expect("write");
    let p = path.display().to_string();
    let (log, recorded) = record(&["read", &p, "100"]);
    // The file changes; the replay still reads what the recording read.
    std::fs::write(&path, "something else entirely\n").expect("write");
    let (result, replayed) = replay(&log, &["read", &p, "100"]);
    result.expect("replay");
    assert_eq!(replayed, recorded);
}

#[test]
fn threads_replay() {
    let s = replayed_same(&["threads"]);
    assert!(
        s.applied.get("thread-create").copied().unwrap_or(0) >= 2,
        "{s:?}"
    );
    assert!(s.executed > 0, "{s:?}");
}

#[test]
fn a_user_space_race_is_caught_as_a_divergence_not_replayed_wrong() {
    // Two threads on one contended mutex: whether a thread takes it in user space or waits
    // in futex depends on how far the other got between system calls, which the log cannot
    // hold (an untracked data race). A replay either reproduces the recorded futex order, and
    // prints what the recording printed, or says exactly where it parted; it never goes on
    // with another order, and never hangs (a replay that stops making progress is declared
    // stalled, a divergence).
    let (log, recorded) = record(&["mutex", "20000"]);
    let (result, replayed) = replay(&log, &["mutex", "20000"]);
    match result {
        Ok(s) => {
            assert_eq!(replayed, recorded);
            assert!(s.executed > 0, "{s:?}");
        }
        // At a futex the recorded order did not see, or stalled: a thread blocked for real in
        // a futex no other thread may wake yet (its turn has not come).
        Err(ReplayError::Diverged(d)) => {
            let text = d.to_string();
            assert!(
                text.contains("futex")
                    || text.contains("sched_yield")
                    || text.contains("did not get there"),
                "a divergence elsewhere than the lock: {d}"
            );
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_fork_and_its_child_replay() {
    let s = replayed_same(&["fork"]);
    assert_eq!(s.applied.get("process-fork").copied(), Some(1), "{s:?}");
}

#[test]
fn another_program_diverges_and_says_where() {
    let (log, _) = record(&["getrandom", "16"]);
    let (result, _) = replay(&log, &["clock", "2"]);
    match result {
        Err(ReplayError::Diverged(d)) => {
            assert!(d.seq > 0);
            let text = d.to_string();
            assert!(text.contains("replay diverged at record #"), "{text}");
        }
        other => panic!("a different program did not diverge: {other:?}"),
    }
}
