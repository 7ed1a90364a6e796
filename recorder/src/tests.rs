//! End-to-end tests: real programs (`testprogs/rrctest.c`, compiled with `cc` at test time, and
//! the host's shell and coreutils) recorded through the `--exec` launcher. Root, no containers.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::event::{CreateKind, Event, ExitKind, SyscallRecord, VecSink};
use crate::launch::{record_command, Command};
use crate::recorder::{check_order, writes_concat, Options, Summary};

/// The test program, compiled once per source version.
fn prog() -> &'static Path {
    crate::testprog::path()
}

struct Run {
    events: Vec<Event>,
    summary: Summary,
    raw_stdout: Vec<u8>,
    stdout: String,
}

impl Run {
    fn syscalls(&self, name: &str) -> Vec<&SyscallRecord> {
        let nr = crate::syscalls::by_name(name).expect("traced name").nr;
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Syscall(s) if s.nr == u64::from(nr) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn created(&self, kind: CreateKind) -> Vec<i32> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::ThreadCreated { child, kind: k, .. } if *k == kind => Some(*child),
                _ => None,
            })
            .collect()
    }
}

fn capture_file() -> (File, OwnedFd) {
    let f = tempfile::tempfile().expect("tempfile");
    let fd = OwnedFd::from(f.try_clone().expect("dup"));
    (f, fd)
}

fn read_back(mut f: File) -> Vec<u8> {
    let mut s = Vec::new();
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_to_end(&mut s).expect("read stdout");
    s
}

fn record(cmd: Command, opts: Options) -> Run {
    let (f, fd) = capture_file();
    let (summary, sink) =
        record_command(&cmd.stdout(fd), VecSink::default(), opts).expect("recording");
    let raw_stdout = read_back(f);
    let run = Run {
        events: sink.events,
        summary,
        stdout: String::from_utf8_lossy(&raw_stdout).into_owned(),
        raw_stdout,
    };
    if let Err(e) = check_order(&run.events) {
        panic!("order: {e}\n{:#?}", run.events);
    }
    run
}

fn record_prog(args: &[&str]) -> Run {
    record(Command::new(prog()).args(args), Options::default())
}

fn hex(b: &[u8]) -> String {
    crate::event::to_hex(b)
}

fn pattern(n: usize) -> Vec<u8> {
    let mut x: u32 = 12345;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect()
}

#[test]
fn read_records_the_file_contents() {
    let mut f = tempfile::NamedTempFile::new().expect("tempfile");
    let content = pattern(10_000);
    f.write_all(&content).expect("write");
    let path = f.path().to_str().expect("utf8 path");
    let run = record_prog(&["read", path, "4096"]);
    assert_eq!(run.summary.root_exit, Some(ExitKind::Exited(0)));
    assert_eq!(run.raw_stdout, content, "output unchanged");
    let reads: Vec<&SyscallRecord> = run
        .syscalls("read")
        .into_iter()
        .filter(|s| s.args[0] == 100)
        .collect();
    assert_eq!(
        reads.iter().map(|s| s.ret).collect::<Vec<_>>(),
        vec![Some(4096), Some(4096), Some(1808), Some(0)]
    );
    let recorded: Vec<u8> = reads
        .iter()
        .flat_map(|s| writes_concat(&s.writes))
        .collect();
    assert_eq!(recorded, content, "recorded bytes are the file's");
    assert!(reads
        .iter()
        .all(|s| !s.incomplete && s.writes.iter().all(|w| w.addr == s.args[1])));
}

#[test]
fn getrandom_bytes_are_what_the_program_printed() {
    let run = record_prog(&["getrandom", "32"]);
    let printed = run.stdout.trim();
    assert_eq!(printed.len(), 64);
    let rec = run.syscalls("getrandom");
    let hit = rec
        .iter()
        .find(|s| s.args[1] == 32)
        .expect("getrandom(32) recorded");
    assert_eq!(hit.ret, Some(32));
    assert_eq!(hex(&writes_concat(&hit.writes)), printed);
}

fn timespecs(run: &Run, clk: u64) -> Vec<(i64, i64)> {
    run.syscalls("clock_gettime")
        .into_iter()
        .filter(|s| s.args[0] == clk && s.ret == Some(0))
        .map(|s| {
            let d = writes_concat(&s.writes);
            assert_eq!(d.len(), 16);
            let sec = i64::from_ne_bytes(d[..8].try_into().expect("8 bytes"));
            let nsec = i64::from_ne_bytes(d[8..].try_into().expect("8 bytes"));
            (sec, nsec)
        })
        .collect()
}

/// The next `n` lines of `rrctest clock`'s output, "sec nsec" each.
fn printed_timespecs(lines: &mut std::str::Lines<'_>, n: usize) -> Vec<(i64, i64)> {
    lines
        .take(n)
        .map(|l| {
            let (a, b) = l.split_once(' ').expect("sec nsec");
            (a.parse().expect("sec"), b.parse().expect("nsec"))
        })
        .collect()
}

#[test]
fn vdso_clock_reads_are_recorded() {
    let run = record_prog(&["clock", "5"]);
    let patched: Vec<&Event> = run
        .events
        .iter()
        .filter(|e| matches!(e, Event::VdsoPatched { .. }))
        .collect();
    assert!(patched.len() >= 2, "patched at attach and at exec");
    if let Some(Event::VdsoPatched { symbols, .. }) = patched.last() {
        let names: Vec<&str> = symbols
            .iter()
            .flat_map(|s| s.names.iter().map(String::as_str))
            .collect();
        for want in ["__vdso_clock_gettime", "__vdso_gettimeofday", "__vdso_time"] {
            assert!(names.contains(&want), "{want} patched: {names:?}");
        }
    }
    let mut lines = run.stdout.lines();
    let printed = printed_timespecs(&mut lines, 5);
    let recorded = timespecs(&run, libc::CLOCK_MONOTONIC as u64);
    assert!(
        recorded.windows(5).any(|w| w == printed.as_slice()),
        "printed {printed:?} not among recorded {recorded:?}"
    );
    // gettimeofday and time, also through the vDSO.
    let tv_line = lines.next().expect("tv line");
    let tv = run.syscalls("gettimeofday");
    let last = tv.last().expect("gettimeofday recorded");
    let d = writes_concat(&last.writes);
    let sec = i64::from_ne_bytes(d[..8].try_into().expect("8 bytes"));
    let usec = i64::from_ne_bytes(d[8..16].try_into().expect("8 bytes"));
    assert_eq!(tv_line, format!("tv {sec} {usec}"));
    let time_line = lines.next().expect("time line");
    let t = run.syscalls("time");
    assert_eq!(
        time_line,
        format!(
            "time {}",
            t.last().and_then(|s| s.ret).expect("time recorded")
        )
    );
}

#[test]
fn forked_child_is_followed() {
    let run = record_prog(&["fork"]);
    let children = run.created(CreateKind::Process);
    assert_eq!(children.len(), 1, "{:#?}", run.events);
    let child = children[0];
    let mut lines = run.stdout.lines();
    let child_hex = lines.next().expect("child's line");
    assert_eq!(lines.next(), Some("child exited 7"));
    let rnd = run
        .syscalls("getrandom")
        .into_iter()
        .find(|s| s.tid == child && s.args[1] == 8)
        .expect("child's getrandom recorded");
    assert_eq!(hex(&writes_concat(&rnd.writes)), child_hex);
    assert!(run.events.iter().any(|e| matches!(
        e,
        Event::ThreadExited { tid, how: ExitKind::Exited(7) } if *tid == child
    )));
    // The parent's wait4 recorded the child's status word.
    let w = run
        .syscalls("wait4")
        .into_iter()
        .find(|s| s.ret == Some(i64::from(child)))
        .expect("wait4 recorded");
    let status = writes_concat(&w.writes);
    assert_eq!(status[..4], (7i32 << 8).to_ne_bytes());
    assert_eq!(run.summary.root_exit, Some(ExitKind::Exited(0)));
}

#[test]
fn both_threads_are_recorded() {
    let run = record_prog(&["threads"]);
    let threads = run.created(CreateKind::Thread);
    assert_eq!(threads.len(), 2, "{:#?}", run.events);
    let printed: HashSet<&str> = run.stdout.lines().collect();
    for t in &threads {
        let rnd = run
            .syscalls("getrandom")
            .into_iter()
            .find(|s| s.tid == *t)
            .expect("thread's getrandom");
        assert!(printed.contains(hex(&writes_concat(&rnd.writes)).as_str()));
        let zero = run
            .syscalls("read")
            .into_iter()
            .find(|s| s.tid == *t && s.ret == Some(3))
            .expect("thread's read of /dev/zero");
        assert_eq!(writes_concat(&zero.writes), vec![0, 0, 0]);
        assert!(run
            .events
            .iter()
            .any(|e| matches!(e, Event::ThreadExited { tid, .. } if tid == t)));
    }
}

#[test]
fn exec_is_followed_and_the_new_vdso_patched() {
    let p = prog().to_str().expect("utf8");
    let run = record_prog(&["exec", p, "clock", "2"]);
    let execs: Vec<usize> = run
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Event::Exec { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(execs.len(), 2, "the launcher's exec and the program's");
    let after = &run.events[execs[1]..];
    assert!(matches!(after.get(1), Some(Event::VdsoPatched { .. })));
    let clocks = after
        .iter()
        .filter(|e| matches!(e, Event::Syscall(s) if s.nr == 228))
        .count();
    assert!(clocks >= 2, "clock_gettime recorded after the second exec");
    assert_eq!(run.stdout.lines().count(), 4);
}

#[test]
fn rdtsc_is_emulated_and_recorded() {
    let run = record_prog(&["rdtsc", "3"]);
    let all: Vec<(u64, Option<u32>)> = run
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Rdtsc { value, aux, .. } => Some((*value, *aux)),
            _ => None,
        })
        .collect();
    // ld.so reads the TSC too (startup timing): the program's own are the last four.
    assert!(all.len() >= 4, "{all:?}");
    let rd = &all[all.len() - 4..];
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 4);
    let want: Vec<String> = rd.iter().map(|(v, _)| v.to_string()).collect();
    assert_eq!(want.len(), 4, "three rdtsc and one rdtscp: {rd:?}");
    assert_eq!(&lines[..3], &want[..3]);
    let (v, aux) = rd[3];
    assert_eq!(lines[3], format!("p {v} {}", aux.expect("rdtscp aux")));
    assert!(rd[..3].iter().all(|(_, a)| a.is_none()));
    assert!(all.windows(2).all(|w| w[0].0 <= w[1].0), "monotonic");
}

#[test]
fn signals_are_recorded_with_the_handler_end() {
    let run = record_prog(&["signal"]);
    assert_eq!(run.stdout.trim(), format!("got {}", libc::SIGUSR1));
    let i = run
        .events
        .iter()
        .position(|e| matches!(e, Event::Signal { signo, .. } if *signo == libc::SIGUSR1))
        .expect("SIGUSR1 recorded");
    assert!(run.events[i..]
        .iter()
        .any(|e| matches!(e, Event::Syscall(s) if s.nr == 15)));
}

#[test]
fn shell_pipeline_output_is_unchanged_by_recording() {
    let mut f = tempfile::NamedTempFile::new().expect("tempfile");
    f.write_all(&pattern(300)).expect("write");
    let script = format!(
        "for i in 1 2 3; do echo line $i; done | cat; head -c 64 {} | od -An -tx1; date +%Y >/dev/null; exit 3",
        f.path().display()
    );
    let plain = std::process::Command::new("/bin/sh")
        .args(["-c", &script])
        .output()
        .expect("sh");
    let run = record(
        Command::new("/bin/sh").args(["-c", &script]),
        Options::default(),
    );
    assert_eq!(run.raw_stdout, plain.stdout);
    assert_eq!(plain.status.code(), Some(3));
    assert_eq!(run.summary.root_exit, Some(ExitKind::Exited(3)));
    assert!(run.created(CreateKind::Process).len() >= 3);
}

#[test]
fn futex_wakes_precede_the_waits_they_end() {
    let run = record_prog(&["mutex", "2000"]);
    assert_eq!(run.stdout.trim(), "4000");
    assert_eq!(run.syscalls("sched_yield").len(), 250);
    const WAIT: u64 = 0;
    const WAKE: u64 = 1;
    let mut woken = 0;
    for (i, e) in run.events.iter().enumerate() {
        let Event::Syscall(s) = e else { continue };
        if s.nr != 202 || s.args[1] & 0x7f != WAIT || s.ret != Some(0) {
            continue;
        }
        woken += 1;
        let found = run.events[..i].iter().any(|p| {
            matches!(p, Event::SyscallEntry { tid, nr: 202, args, .. }
                if *tid != s.tid && args[0] == s.args[0] && args[1] & 0x7f == WAKE)
        });
        assert!(found, "wait at event {i} has no earlier wake");
    }
    assert!(woken > 0, "the mutex was never contended");
}

/// Starts `rrctest spin <ms>` (four threads spinning for `ms` milliseconds) with `stdout`, and
/// returns once all four run (or after about a second).
fn spawn_spinners(ms: &str, stdout: std::process::Stdio) -> std::process::Child {
    let child = std::process::Command::new(prog())
        .args(["spin", ms])
        .stdout(stdout)
        .spawn()
        .expect("spawn");
    let pid = child.id() as i32;
    for _ in 0..200 {
        if crate::procfs::task_ids(pid).map(|t| t.len()).unwrap_or(0) == 4 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child
}

#[test]
fn attach_to_a_running_multithreaded_process() {
    // Attach once all four threads run (they spin for 400 ms).
    let mut child = spawn_spinners("400", std::process::Stdio::piped());
    let mut out = child.stdout.take().expect("stdout");
    let pid = child.id() as i32;
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut rec = crate::Recorder::new(
        crate::ptrace::Ptrace,
        VecSink::default(),
        Options::default(),
    );
    rec.attach(pid).expect("attach");
    let summary = rec.run().expect("run");
    let events = rec.into_sink().events;
    check_order(&events).expect("order");
    let attached = events
        .iter()
        .filter(|e| matches!(e, Event::Attached { .. }))
        .count();
    let created = events
        .iter()
        .filter(|e| matches!(e, Event::ThreadCreated { .. }))
        .count();
    assert_eq!(attached + created, 4, "{events:#?}");
    assert!(attached >= 1);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::VdsoPatched { .. })));
    let exits = events
        .iter()
        .filter(|e| matches!(e, Event::ThreadExited { .. }))
        .count();
    assert_eq!(exits, 4);
    assert_eq!(summary.root_exit, Some(ExitKind::Exited(0)));
    let mut s = String::new();
    out.read_to_string(&mut s).expect("read");
    assert_eq!(s, "spun\n");
    // The kernel reported the exit to us (tracer and parent): nothing left to reap.
    drop(child);
}

fn prog_ns(args: &[&str]) -> f64 {
    let out = std::process::Command::new(prog())
        .args(args)
        .output()
        .expect("run");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("ns")
}

/// Measures a recorded 1-byte read against an untraced one and against a minimal C tracer doing
/// the same ptrace work (the mechanism's floor), all in the same run. Prints the figures (run
/// with `--nocapture`); README.md quotes them.
#[test]
fn cost_of_a_recorded_read() {
    let n = "20000";
    let base = prog_ns(&["readloop", n]);
    let floor = prog_ns(&["mintrace", n, "0"]);
    let floor_full = prog_ns(&["mintrace", n, "1"]);
    let traced = |cpu: Option<usize>| -> f64 {
        let mut cmd = Command::new(prog()).args(["readloop", n]);
        if let Some(c) = cpu {
            cmd = cmd.pin_cpu(c);
        }
        let run = record(cmd, Options::default());
        assert!(run.syscalls("read").len() >= 20_000);
        run.stdout.trim().parse().expect("ns")
    };
    let pinned = std::thread::spawn(move || traced(Some(0)))
        .join()
        .expect("thread");
    let free = std::thread::spawn(move || traced(None))
        .join()
        .expect("thread");
    eprintln!(
        "1-byte read, ns: untraced {base:.0}; minimal C tracer (RET_TRACE + exit stop) \
         {floor:.0}, same + GET_SYSCALL_INFO x2 + process_vm_readv {floor_full:.0}; \
         rrc-recorder (debug build) pinned with its tracee {pinned:.0} ({:.2}x the C floor), \
         unpinned {free:.0}",
        pinned / floor_full
    );
    assert!(pinned > base && free > base && floor > base);
}

// ---- Through the event log: record with `EventlogSink`, decode, verify. ----

use crate::eventlog::{check_log, EventlogSink, LogCheck};
use rrc_eventlog::{Event as LogEvent, EventRecord, Time};

struct LogRun {
    check: LogCheck,
    summary: Summary,
    raw_stdout: Vec<u8>,
    stdout: String,
}

impl LogRun {
    fn events(&self) -> impl Iterator<Item = &EventRecord> {
        self.check.records.iter().filter_map(|r| r.as_event())
    }

    fn times(&self) -> Vec<Time> {
        self.events()
            .filter_map(|e| match &e.event {
                LogEvent::Time(t) => Some(*t),
                _ => None,
            })
            .collect()
    }

    /// `(args, ret, data)` of the syscall results with number `nr`.
    fn results(&self, nr: u64) -> Vec<(&[u64], i64, Vec<u8>)> {
        self.events()
            .filter_map(|e| match &e.event {
                LogEvent::SyscallResult {
                    nr: n,
                    args,
                    ret,
                    writes,
                } if *n == nr => Some((
                    args.as_slice(),
                    *ret,
                    writes
                        .iter()
                        .flat_map(|w| w.bytes.iter().copied())
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    }
}

/// Decodes and verifies `log`; panics with the problems unless it is clean.
fn checked(log: &[u8]) -> LogCheck {
    let check = check_log(log);
    assert!(
        check.is_ok(),
        "log not consistent: {:#?}\n{check}",
        check.problems()
    );
    check
}

/// Records `cmd` into an event log (in memory), then decodes and verifies it.
fn record_log(cmd: Command) -> LogRun {
    let (f, fd) = capture_file();
    let sink = EventlogSink::new(Vec::new(), "rrc-recorder-test");
    let (summary, sink) =
        record_command(&cmd.stdout(fd), sink, Options::default()).expect("recording");
    assert_eq!(sink.stats().unknown_threads, 0, "{:?}", sink.stats());
    let log = sink.finish().expect("finish the log");
    let raw_stdout = read_back(f);
    LogRun {
        check: checked(&log),
        summary,
        stdout: String::from_utf8_lossy(&raw_stdout).into_owned(),
        raw_stdout,
    }
}

fn record_log_prog(args: &[&str]) -> LogRun {
    record_log(Command::new(prog()).args(args))
}

#[test]
fn eventlog_clock_reads_equal_what_the_program_printed() {
    let run = record_log_prog(&["clock", "5"]);
    let times = run.times();
    let mono: Vec<(i64, i64)> = times
        .iter()
        .filter_map(|t| match *t {
            Time::ClockGettime {
                clock: libc::CLOCK_MONOTONIC,
                sec,
                nsec,
            } => Some((sec, nsec)),
            _ => None,
        })
        .collect();
    let mut lines = run.stdout.lines();
    let printed = printed_timespecs(&mut lines, 5);
    assert!(
        mono.windows(5).any(|w| w == printed.as_slice()),
        "printed {printed:?} not among the logged {mono:?}"
    );
    let tv = times
        .iter()
        .rev()
        .find_map(|t| match *t {
            Time::Gettimeofday { sec, usec } => Some(format!("tv {sec} {usec}")),
            _ => None,
        })
        .expect("gettimeofday logged as Time");
    assert_eq!(lines.next(), Some(tv.as_str()));
    let time = times
        .iter()
        .rev()
        .find_map(|t| match *t {
            Time::Time { sec } => Some(format!("time {sec}")),
            _ => None,
        })
        .expect("time logged as Time");
    assert_eq!(lines.next(), Some(time.as_str()));
}

#[test]
fn eventlog_getrandom_bytes_equal_what_the_program_printed() {
    let run = record_log_prog(&["getrandom", "32"]);
    let printed = run.stdout.trim();
    let hit = run
        .results(318)
        .into_iter()
        .find(|(args, _, _)| args.get(1) == Some(&32))
        .expect("getrandom(32) logged");
    assert_eq!(hit.1, 32);
    assert_eq!(hex(&hit.2), printed);
}

#[test]
fn eventlog_rdtsc_values_equal_what_the_program_printed() {
    let run = record_log_prog(&["rdtsc", "3"]);
    let tsc: Vec<String> = run
        .times()
        .iter()
        .filter_map(|t| match *t {
            Time::Rdtsc { tsc } => Some(tsc.to_string()),
            Time::Rdtscp { tsc, aux } => Some(format!("p {tsc} {aux}")),
            _ => None,
        })
        .collect();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(tsc.len() >= 4, "{tsc:?}");
    assert_eq!(lines, tsc[tsc.len() - 4..].to_vec());
}

/// Every other test program (threads, fork, exec, signals, a contended mutex, a shell
/// pipeline) gives a log that decodes and verifies cleanly (`record_log` checks).
#[test]
fn eventlog_of_every_test_program_verifies() {
    let p = prog().to_str().expect("utf8");
    for args in [
        &["threads"][..],
        &["fork"],
        &["signal"],
        &["exec", p, "getrandom", "8"],
        &["mutex", "500"],
    ] {
        let run = record_log_prog(args);
        assert_eq!(run.summary.root_exit, Some(ExitKind::Exited(0)), "{args:?}");
        let kinds = &run.check.report.kinds;
        match args[0] {
            "threads" => {
                assert_eq!(kinds.get("thread-create"), Some(&2));
                // pthread_create (clone3 in recent glibc, clone before): the real flags.
                const CLONE_VM: u64 = 0x100;
                const CLONE_THREAD: u64 = 0x10000;
                assert!(run.events().all(|e| match e.event {
                    LogEvent::ThreadCreate { flags, .. } =>
                        flags & (CLONE_VM | CLONE_THREAD) == CLONE_VM | CLONE_THREAD,
                    _ => true,
                }));
            }
            "fork" => {
                assert_eq!(kinds.get("process-fork"), Some(&1));
                assert!(run.events().all(|e| match e.event {
                    LogEvent::ProcessFork { flags, .. } => flags & 0xff == libc::SIGCHLD as u64,
                    _ => true,
                }));
            }
            "signal" => assert!(kinds.contains_key("signal")),
            "exec" => {
                // The launcher's exec and the program's, each with the path it named.
                let paths: Vec<Vec<u8>> = run
                    .events()
                    .filter_map(|e| match &e.event {
                        LogEvent::Exec { path } => Some(path.clone()),
                        _ => None,
                    })
                    .collect();
                assert_eq!(paths, vec![p.as_bytes().to_vec(), p.as_bytes().to_vec()]);
            }
            _ => assert!(kinds.get("sync-order").is_some_and(|&n| n > 0)),
        }
    }
    let run = record_log(Command::new("/bin/sh").args([
        "-c",
        "for i in 1 2 3; do echo $i; done | cat; head -c 16 /dev/urandom | od -An -tx1",
    ]));
    assert_eq!(run.raw_stdout.iter().filter(|&&b| b == b'\n').count(), 4);
    assert!(run
        .check
        .report
        .kinds
        .get("process-fork")
        .is_some_and(|&n| n >= 3));
}

#[test]
fn eventlog_of_an_attached_process_starts_with_its_threads_alive() {
    let mut child = spawn_spinners("300", std::process::Stdio::null());
    let pid = child.id() as i32;
    let mut rec = crate::Recorder::new(
        crate::ptrace::Ptrace,
        EventlogSink::new(Vec::new(), "attached"),
        Options::default(),
    );
    rec.attach(pid).expect("attach");
    rec.run().expect("run");
    let log = rec.into_sink().finish().expect("finish");
    let check = checked(&log);
    let live = match &check.records[0] {
        rrc_eventlog::Record::SegmentStart(s) => s.live.clone(),
        other => panic!("{other:?}"),
    };
    let created = check
        .report
        .kinds
        .get("thread-create")
        .copied()
        .unwrap_or(0);
    assert_eq!(live.len() as u64 + created, 4, "{live:?}");
    assert!(live.contains(&rrc_eventlog::Thread::main(pid as u32)));
    assert_eq!(check.report.kinds.get("thread-exit"), Some(&4));
    drop(child.wait());
}

/// A free TCP port on 127.0.0.1 (bound and released: the server binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn urandom(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("/dev/urandom");
    buf
}

/// Connects `n` times, in order (so the server accepts them in this order), retrying until
/// the server listens.
fn connect_all(port: u16, n: usize) -> Vec<std::net::TcpStream> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    (0..n)
        .map(|_| loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => {
                    let t = Some(std::time::Duration::from_secs(20));
                    s.set_read_timeout(t).expect("timeout");
                    s.set_write_timeout(t).expect("timeout");
                    break s;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("connect to the recorded server: {e}"),
            }
        })
        .collect()
}

/// Sends `data` in chunks of varying size, checking each chunk's echo, then ends its side
/// and waits for the server to close.
fn exchange(mut s: std::net::TcpStream, data: &[u8]) {
    const SIZES: [usize; 7] = [1, 700, 4000, 1500, 13, 9000, 2048];
    let mut off = 0;
    for i in 0.. {
        if off == data.len() {
            break;
        }
        let n = SIZES[i % SIZES.len()].min(data.len() - off);
        s.write_all(&data[off..off + n]).expect("send");
        let mut back = vec![0u8; n];
        s.read_exact(&mut back).expect("echo");
        assert!(back == data[off..off + n], "echo differs at byte {off}");
        off += n;
    }
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("server close");
    assert!(rest.is_empty());
}

/// Records `rrctest tcpserver` serving connections that send `sizes` random bytes each; the
/// application's received streams, rebuilt from the log alone, must be exactly what each
/// connection sent.
fn tcp_recorded(sizes: &[usize], threads: bool) {
    let port = free_port();
    let payloads: Vec<Vec<u8>> = sizes.iter().map(|&n| urandom(n)).collect();
    let max = sizes.iter().copied().max().unwrap_or(0);
    let mut args = vec![
        "tcpserver".to_string(),
        port.to_string(),
        sizes.len().to_string(),
        max.to_string(),
    ];
    if threads {
        args.push("threads".into());
    }
    let cmd = Command::new(prog()).args(args);
    let recorder = std::thread::spawn(move || record_log(cmd));
    let client = std::panic::catch_unwind(|| {
        let conns = connect_all(port, payloads.len());
        if threads {
            std::thread::scope(|sc| {
                for (s, p) in conns.into_iter().zip(&payloads) {
                    sc.spawn(move || exchange(s, p));
                }
            });
        } else {
            for (s, p) in conns.into_iter().zip(&payloads) {
                exchange(s, p);
            }
        }
    });
    if client.is_err() {
        // Let the server finish (each missing connection ends at once) before failing.
        for s in connect_all(port, payloads.len()) {
            drop(s);
        }
    }
    let run = recorder.join().expect("recording");
    if let Err(e) = client {
        std::panic::resume_unwind(e);
    }
    assert_eq!(run.summary.root_exit, Some(ExitKind::Exited(0)));
    let want: String = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("conn {i} {n}\n"))
        .collect();
    assert_eq!(run.stdout, want);

    let mut accepted: Vec<_> = run.check.streams.accepted().collect();
    accepted.sort_by_key(|s| s.accepted_at);
    assert_eq!(
        accepted.len(),
        sizes.len(),
        "one stream per accepted connection"
    );
    for (i, (stream, sent)) in accepted.iter().zip(&payloads).enumerate() {
        assert_eq!(stream.data.len(), sent.len(), "connection {i}: length");
        assert!(
            stream.data == *sent,
            "connection {i}: the log's bytes differ from what the client sent"
        );
        // The longest connection is served to NBYTES; the others see the client's end.
        assert_eq!(
            stream.eof,
            sent.len() < max,
            "connection {i}: end of stream"
        );
    }
    // Every read flavour was used on the connections: read, recvfrom, readv, recvmsg.
    for nr in [0, 45, 19, 47] {
        let on_conns = run
            .results(nr)
            .iter()
            .filter(|(args, ret, _)| {
                *ret > 0
                    && accepted
                        .iter()
                        .any(|s| args.first() == Some(&(s.fd as u64)))
            })
            .count();
        assert!(on_conns > 0, "no syscall {nr} on the connections");
    }
    let kinds = &run.check.report.kinds;
    if threads {
        assert_eq!(kinds.get("thread-create"), Some(&(sizes.len() as u64)));
    }
}

#[test]
fn eventlog_tcp_streams_rebuild_what_each_client_sent() {
    tcp_recorded(&[40_000, 7, 65_537], false);
}

#[test]
fn eventlog_tcp_streams_rebuild_with_a_thread_per_connection() {
    tcp_recorded(&[50_000, 50_000, 30_000, 1], true);
}

/// A freezer cgroup of cgroup v1 for one test, removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let (v1, _) = crate::freezer::parse_mountinfo(&info);
        let root = v1.expect("this platform mounts the cgroup v1 freezer (PLATFORM.md)");
        let dir = root.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        TestCgroup(dir)
    }

    fn add(&self, pid: i32) {
        std::fs::write(self.0.join("tasks"), pid.to_string()).expect("join the cgroup");
    }

    fn state(&self) -> String {
        std::fs::read_to_string(self.0.join("freezer.state"))
            .expect("freezer.state")
            .trim()
            .to_string()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn tracer_pid(tid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn parking_for_checkpoints_leaves_a_running_program_correct() {
    use crate::control::{Command as Ctl, Control, Reply};
    use std::sync::Arc;
    use std::time::Duration;

    let cg = TestCgroup::new("rrc-recorder-park");
    let (f, fd) = capture_file();
    // Two threads taking turns on a mutex: futex calls (traced) all the way through.
    let cmd = Command::new(prog()).args(["mutex", "400000"]).stdout(fd);
    let pid = crate::launch::spawn_stopped(&cmd).expect("spawn");
    cg.add(pid);
    let control = Arc::new(Control::default());
    let mut rec = crate::Recorder::new(
        crate::ptrace::Ptrace,
        EventlogSink::new(Vec::new(), "parked"),
        Options::default(),
    )
    .with_control(control.clone());
    rec.attach(pid).expect("attach");
    let c = control.clone();
    let cg_dir = cg.0.clone();
    let driver = std::thread::spawn(move || {
        let mut cycles = Vec::new();
        for epoch in 1..=5u64 {
            std::thread::sleep(Duration::from_millis(40));
            match c.call(Ctl::Park { epoch }, Duration::from_secs(10)) {
                Reply::Parked(cut) => {
                    // Parked: frozen, and no thread is traced (CRIU could seize them now).
                    let state =
                        std::fs::read_to_string(cg_dir.join("freezer.state")).unwrap_or_default();
                    let tids = crate::procfs::task_ids(pid).unwrap_or_default();
                    let traced: Vec<i32> = tids
                        .iter()
                        .copied()
                        .filter(|&t| tracer_pid(t).unwrap_or(0) != 0)
                        .collect();
                    std::thread::sleep(Duration::from_millis(30));
                    let resumed = c.call(Ctl::Resume, Duration::from_secs(10));
                    cycles.push((epoch, cut, state.trim().to_string(), traced, resumed));
                }
                Reply::Error(e) if e.contains("ended") => break,
                other => panic!("park {epoch}: {other:?}"),
            }
        }
        cycles
    });
    let summary = rec.run().expect("run");
    let cycles = driver.join().expect("driver");
    let log = rec.into_sink().finish().expect("finish");
    let out = String::from_utf8_lossy(&read_back(f)).into_owned();
    assert_eq!(summary.root_exit, Some(ExitKind::Exited(0)), "{out}");
    // Every increment of both threads happened: no futex call ever failed untraced.
    assert_eq!(out.trim(), "800000");
    assert!(
        cycles.len() >= 3,
        "only {} park cycles: {cycles:?}",
        cycles.len()
    );
    for (epoch, _, state, traced, resumed) in &cycles {
        assert_eq!(state, "FROZEN", "epoch {epoch}");
        assert!(traced.is_empty(), "epoch {epoch}: still traced {traced:?}");
        assert!(
            matches!(resumed, Reply::Resumed { threads } if *threads >= 1),
            "epoch {epoch}: {resumed:?}"
        );
    }
    assert_eq!(cg.state(), "THAWED");
    // The log is whole and cut where the recorder said.
    let check = checked(&log);
    let starts: Vec<(u64, u64)> = check
        .records
        .iter()
        .filter_map(|r| match r {
            rrc_eventlog::Record::SegmentStart(s) => Some((s.epoch, s.base_seq)),
            _ => None,
        })
        .collect();
    let expect: Vec<(u64, u64)> = std::iter::once((0, 1))
        .chain(cycles.iter().map(|(e, cut, ..)| (*e, cut.seq)))
        .collect();
    assert_eq!(starts, expect);
    for (_, cut, ..) in &cycles {
        let at = usize::try_from(cut.offset).expect("offset");
        assert_eq!(&log[at..at + 8], b"RRCEVLOG", "a segment header at the cut");
    }
}

#[test]
fn the_code_of_a_recorded_program_is_scanned_into_its_log() {
    use crate::scan::{spawn_scanner, ProcessList};
    use crate::stream::{scan_report, StreamSink};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().expect("tmp");
    let position = Arc::new(
        crate::position::SharedPosition::create(&dir.path().join("pos")).expect("position"),
    );
    let path = dir.path().join("log");
    let mut sink = StreamSink::new(File::create(&path).expect("log"), "scan", position);
    let list = Arc::new(ProcessList::default());
    let stop = Arc::new(AtomicBool::new(false));
    let scanner =
        spawn_scanner(list.clone(), scan_report(sink.log()), stop.clone()).expect("scanner");
    // Four threads spinning for 2 s: the scanner looks at a process asynchronously, and on a
    // loaded machine (the other tests) it may take a while to get there.
    let cmd = Command::new(prog()).args(["spin", "2000"]);
    let pid = crate::launch::spawn_stopped(&cmd).expect("spawn");
    {
        let mut rec = crate::Recorder::new(crate::ptrace::Ptrace, &mut sink, Options::default())
            .with_process_list(list.clone());
        rec.attach(pid).expect("attach");
        rec.run().expect("run");
    }
    stop.store(true, Ordering::SeqCst);
    list.wake();
    scanner.join().expect("scanner");
    let log = std::fs::read(&path).expect("read");
    let check = checked(&log);
    let sites: Vec<(rrc_eventlog::Unrecordable, u64)> = check
        .records
        .iter()
        .filter_map(|r| match r {
            rrc_eventlog::Record::Event(e) => match &e.event {
                rrc_eventlog::Event::Unrecordable { what, ip } => {
                    assert_eq!(e.thread.tgid, pid as u32, "a record of the scanned process");
                    Some((*what, *ip))
                }
                _ => None,
            },
            _ => None,
        })
        .collect();
    // glibc's dynamic loader and libc read the CPU's features with cpuid.
    assert!(
        sites
            .iter()
            .any(|(w, _)| *w == rrc_eventlog::Unrecordable::Cpuid),
        "no cpuid site logged: {sites:?}"
    );
    assert_eq!(sink.stats().unrecordable_sites, sites.len() as u64);
}
