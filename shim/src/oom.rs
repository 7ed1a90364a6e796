//! OOM events on cgroup v1: an eventfd registered on the container's `memory.oom_control`.
//! (cgroup v2 hosts get no OOM events from this shim yet.)

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

use containerd_shim::event::Event;
use containerd_shim::protos::events::task::TaskOOM;

use crate::task::EventSender;

/// The memory cgroup directory of `pid` on a cgroup v1 host.
fn memory_cgroup_dir(pid: u32) -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    })?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (root, mount_point) = mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let fstype = post.next()?;
        let opts = post.nth(1)?;
        if fstype != "cgroup" || !opts.split(',').any(|o| o == "memory") {
            return None;
        }
        let f: Vec<&str> = pre.split_whitespace().collect();
        Some((f.get(3)?.to_string(), f.get(4)?.to_string()))
    })?;
    let rel = rel.strip_prefix(root.as_str()).unwrap_or(&rel);
    Some(Path::new(&mount_point).join(rel.trim_start_matches('/')))
}

fn register(dir: &Path) -> std::io::Result<File> {
    let control = File::open(dir.join("memory.oom_control"))?;
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: efd is a fresh descriptor owned by nothing else.
    let efd = unsafe { File::from_raw_fd(efd) };
    let mut ec = OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.event_control"))?;
    // One write(2): the kernel parses each write on its own, and `write!` on a File would issue
    // one write per formatted piece (the first, a lone "<efd>", fails with EINVAL).
    let line = format!("{} {}", efd.as_raw_fd(), control.as_raw_fd());
    ec.write_all(line.as_bytes())?;
    Ok(efd)
}

/// Publishes a TaskOOM event for `id` each time its memory cgroup reports an OOM, until the
/// cgroup goes away. Does nothing on hosts without a cgroup v1 memory controller.
pub fn watch(id: &str, pid: u32, events: EventSender) {
    let Some(dir) = memory_cgroup_dir(pid) else {
        tracing::debug!("no cgroup v1 memory controller for {id}: no OOM events");
        return;
    };
    let mut efd = match register(&dir) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("cannot watch {} for OOM: {e}", dir.display());
            return;
        }
    };
    let id = id.to_string();
    // A plain thread: the runtime never waits for it at shutdown.
    std::thread::spawn(move || {
        let mut buf = [0u8; 8];
        // The eventfd also fires when the cgroup is removed: stop then.
        while efd.read_exact(&mut buf).is_ok() && dir.join("memory.oom_control").exists() {
            tracing::info!("container {id} hit its memory limit (OOM)");
            let ev = TaskOOM {
                container_id: id.clone(),
                ..Default::default()
            };
            let topic = ev.topic();
            if events.blocking_send((topic, Box::new(ev))).is_err() {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_memory_cgroup_when_v1() {
        // On a cgroup v1 host (these machines) our own memory cgroup directory exists.
        if !Path::new("/sys/fs/cgroup/memory").exists() {
            return;
        }
        let dir = memory_cgroup_dir(std::process::id()).expect("memory cgroup");
        assert!(dir.join("memory.oom_control").exists(), "{}", dir.display());
    }
}
