//! The few `/proc` facts the recorder needs, with their parsers kept pure for tests.

use std::io;

use crate::event::Tid;

/// What `/proc/TID/status` says about a thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Thread group id.
    pub tgid: Tid,
    /// Id in the innermost pid namespace (last `NSpid` field).
    pub ns_tid: Option<i32>,
    /// In job-control stop (`State: T`).
    pub stopped: bool,
}

/// Parses the text of `/proc/TID/status`.
pub fn parse_status(text: &str) -> Option<Status> {
    let mut st = Status::default();
    let mut tgid = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "State" => st.stopped = value.starts_with('T'),
            "Tgid" => tgid = value.parse().ok(),
            "NSpid" => st.ns_tid = value.split_whitespace().last().and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
    st.tgid = tgid?;
    Some(st)
}

/// `/proc/TID/status`, parsed.
pub fn status(tid: Tid) -> io::Result<Status> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    parse_status(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{tid}/status has no Tgid"),
        )
    })
}

/// The thread ids of process `pid` (`/proc/PID/task`), sorted.
pub fn task_ids(pid: Tid) -> io::Result<Vec<Tid>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(tid);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// `/proc/PID/maps`.
pub fn maps(pid: Tid) -> io::Result<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
}

/// The target of `/proc/PID/exe`.
pub fn exe(pid: Tid) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let text = "Name:\tsh\nUmask:\t0022\nState:\tT (stopped)\nTgid:\t4242\nNgid:\t0\n\
                    Pid:\t4243\nPPid:\t1\nNSpid:\t4243\t7\n";
        assert_eq!(
            parse_status(text),
            Some(Status {
                tgid: 4242,
                ns_tid: Some(7),
                stopped: true
            })
        );
        assert_eq!(parse_status("State:\tS (sleeping)\n"), None);
        let me = status(std::process::id() as Tid).expect("own status");
        assert_eq!(me.tgid, std::process::id() as Tid);
        assert!(!me.stopped);
        assert!(task_ids(std::process::id() as Tid)
            .expect("tasks")
            .contains(&me.tgid));
    }
}
