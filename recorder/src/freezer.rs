//! The cgroup freezer of a traced process: how the recorder keeps a container from running while
//! it steps aside for a checkpoint (see [`crate::recorder`], "Parking for a checkpoint").
//!
//! A task has one tracer, and CRIU must seize the container's tasks to dump them. The recorder
//! therefore stops every thread in a ptrace-stop, freezes the container's cgroup (a task in a
//! ptrace-stop counts as frozen at once), and only then detaches: the tasks drop from the
//! ptrace-stop into the freezer without running an instruction. CRIU, finding the cgroup
//! frozen, seizes them, dumps, freezes the cgroup again before it lets them go, and leaves it
//! frozen. The recorder re-seizes every task and thaws. At no point does a task run untraced,
//! which matters: a system call the container's seccomp filter traces fails with ENOSYS when
//! no tracer is attached.
//!
//! Both hierarchies are handled: cgroup v1's `freezer.state` (what runc uses on these
//! machines) and cgroup v2's `cgroup.freeze` / `cgroup.events`. The path is found from
//! `/proc/PID/cgroup` and the mount table; the parsers are pure so they are unit-tested.
//!
//! Nothing here reads a clock through the vDSO: it runs on the tracing thread, which runs with
//! `PR_TSC_SIGSEGV` (see [`crate::recorder::Options::trap_rdtsc`]).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::event::Tid;

/// How long a freeze may take before it is given up.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// A cgroup's freezer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Freezer {
    /// cgroup v1: the directory holding `freezer.state`.
    V1(PathBuf),
    /// cgroup v2: the directory holding `cgroup.freeze` and `cgroup.events`.
    V2(PathBuf),
}

/// Why a freezer could not be found or used.
#[derive(Debug, thiserror::Error)]
pub enum FreezerError {
    /// `/proc/PID/cgroup` or the mount table could not be read.
    #[error("reading {what}: {err}")]
    Read {
        /// The file.
        what: String,
        /// Why.
        err: io::Error,
    },
    /// The process is in no freezer cgroup that is mounted here.
    #[error("process {pid} is in no freezable cgroup (no cgroup v1 freezer or cgroup v2 mount found for it)")]
    NotFound {
        /// The process.
        pid: Tid,
    },
    /// The process is in the root cgroup, which cannot be frozen.
    #[error("process {pid} is in the root cgroup, which cannot be frozen")]
    Root {
        /// The process.
        pid: Tid,
    },
    /// Writing or reading the freezer's state failed.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        err: io::Error,
    },
    /// The cgroup did not reach the state in time.
    #[error("{path} did not become {want} within {FREEZE_TIMEOUT:?} (last read: {last:?})")]
    Timeout {
        /// The file polled.
        path: String,
        /// The state waited for.
        want: &'static str,
        /// What it said last.
        last: String,
    },
}

/// The cgroup (relative to its hierarchy's root) of the v1 `freezer` controller, and the
/// cgroup v2 path, from the text of `/proc/PID/cgroup`.
pub fn parse_proc_cgroup(text: &str) -> (Option<String>, Option<String>) {
    let (mut v1, mut v2) = (None, None);
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "freezer") {
            v1 = Some(path.to_string());
        }
    }
    (v1, v2)
}

/// The mount points of the v1 freezer hierarchy and of cgroup2, from the text of
/// `/proc/self/mountinfo` (the hierarchy's root must be `/`, as on the host).
pub fn parse_mountinfo(text: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let (mut v1, mut v2) = (None, None);
    for line in text.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let (Some(root), Some(mount)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        if *root != "/" {
            continue;
        }
        let mut r = right.split(' ');
        let (fstype, _source, sup) = (r.next(), r.next(), r.next().unwrap_or(""));
        match fstype {
            Some("cgroup") if sup.split(',').any(|o| o == "freezer") => {
                v1.get_or_insert_with(|| PathBuf::from(unescape(mount)));
            }
            Some("cgroup2") => {
                v2.get_or_insert_with(|| PathBuf::from(unescape(mount)));
            }
            _ => {}
        }
    }
    (v1, v2)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read(path: &str) -> Result<String, FreezerError> {
    std::fs::read_to_string(path).map_err(|err| FreezerError::Read {
        what: path.to_string(),
        err,
    })
}

/// The freezer of process `pid`'s cgroup: cgroup v1's freezer if it is mounted, else v2.
pub fn of_process(pid: Tid) -> Result<Freezer, FreezerError> {
    let (c1, c2) = parse_proc_cgroup(&read(&format!("/proc/{pid}/cgroup"))?);
    let (m1, m2) = parse_mountinfo(&read("/proc/self/mountinfo")?);
    let pick =
        |mount: Option<PathBuf>, rel: Option<String>| -> Option<Result<PathBuf, FreezerError>> {
            let (mount, rel) = (mount?, rel?);
            let rel = rel.trim_start_matches('/');
            if rel.is_empty() {
                return Some(Err(FreezerError::Root { pid }));
            }
            Some(Ok(mount.join(rel)))
        };
    if let Some(p) = pick(m1, c1) {
        return p.map(Freezer::V1);
    }
    if let Some(p) = pick(m2, c2) {
        return p.map(Freezer::V2);
    }
    Err(FreezerError::NotFound { pid })
}

impl Freezer {
    fn files(&self) -> (PathBuf, PathBuf) {
        match self {
            Freezer::V1(d) => (d.join("freezer.state"), d.join("freezer.state")),
            Freezer::V2(d) => (d.join("cgroup.freeze"), d.join("cgroup.events")),
        }
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        match self {
            Freezer::V1(d) | Freezer::V2(d) => d,
        }
    }

    /// Freezes (`true`) or thaws the cgroup and, for a freeze, waits until every task in it is
    /// frozen (at most [`FREEZE_TIMEOUT`]; a freeze that times out is undone).
    pub fn set(&self, frozen: bool) -> Result<(), FreezerError> {
        let (control, state) = self.files();
        let (on, off, want) = match self {
            Freezer::V1(_) => ("FROZEN", "THAWED", "FROZEN"),
            Freezer::V2(_) => ("1", "0", "frozen 1"),
        };
        let write = |v: &str| {
            std::fs::write(&control, v).map_err(|err| FreezerError::Io {
                path: control.display().to_string(),
                err,
            })
        };
        if !frozen {
            return write(off);
        }
        write(on)?;
        let step = Duration::from_micros(100);
        let tries = (FREEZE_TIMEOUT.as_micros() / step.as_micros()).max(1);
        let mut last = String::new();
        for i in 0..tries {
            last = std::fs::read_to_string(&state).map_err(|err| FreezerError::Io {
                path: state.display().to_string(),
                err,
            })?;
            let done = match self {
                Freezer::V1(_) => last.trim() == want,
                Freezer::V2(_) => last.lines().any(|l| l.trim() == want),
            };
            if done {
                return Ok(());
            }
            // cgroup v1 can stay FREEZING; asking again now and then helps (as CRIU does).
            if matches!(self, Freezer::V1(_)) && i % 500 == 499 {
                write(on)?;
            }
            std::thread::sleep(step);
        }
        let _ = write(off);
        Err(FreezerError::Timeout {
            path: state.display().to_string(),
            want,
            last: last.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v1_freezer_and_the_v2_path() {
        let text = "12:freezer:/default/redis\n11:cpu,cpuacct:/default/redis\n0::/system\n";
        assert_eq!(
            parse_proc_cgroup(text),
            (Some("/default/redis".into()), Some("/system".into()))
        );
        assert_eq!(
            parse_proc_cgroup("0::/only/v2\n"),
            (None, Some("/only/v2".into()))
        );
        assert_eq!(parse_proc_cgroup("garbage\n3:memory:/m\n"), (None, None));
    }

    #[test]
    fn finds_the_mounts() {
        let text = "\
30 25 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755\n\
35 30 0:31 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,freezer\n\
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
40 30 0:35 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
41 30 0:36 /inner /elsewhere rw - cgroup cgroup rw,freezer\n";
        assert_eq!(
            parse_mountinfo(text),
            (
                Some(PathBuf::from("/sys/fs/cgroup/freezer")),
                Some(PathBuf::from("/sys/fs/cgroup/unified"))
            )
        );
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(parse_mountinfo("nonsense\n"), (None, None));
    }

    #[test]
    fn this_process_has_a_freezer_or_says_why_not() {
        // The test runner may sit in the root cgroup (not freezable) or in a child one.
        match of_process(std::process::id() as Tid) {
            Ok(f) => assert!(f.dir().is_absolute()),
            Err(FreezerError::Root { .. } | FreezerError::NotFound { .. }) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
}
