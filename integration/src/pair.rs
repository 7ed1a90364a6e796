//! A replicated server (redis by default; memcached and lighttpd too) on a test bed, in passive
//! or hybrid mode, for the failover tests, the recording tests, the demo and the benchmark: a
//! backup shim on `backup`, the primary on `primary`, the container's network
//! namespace on each side (`svc`, `svcb`), clients on `client`. Killing the primary cuts
//! `svc`'s link first (nothing more leaves), then SIGKILLs its shim and container.

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::{image, netns_pids, wait_for, Host, TestBed, RRC_RUNTIME};

/// The replicated container's id (the same on both sides: the pair's identity).
pub const ID: &str = "redis-ft";
/// redis's port.
pub const PORT: u16 = 6379;
/// How long new client connections need before a failover may keep them: CRIU cannot
/// checkpoint a half-open connection (the kernel's request socket), so a connection whose
/// handshake completed after the last committed checkpoint is reset by the restored kernel.
/// The SYN-ACK waits one epoch, then one more epoch must commit: three epochs of the default 1 s.
pub const CONNECTIONS_SETTLE: Duration = Duration::from_secs(3);

/// A server the pair replicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// redis (mostly single-threaded), on [`PORT`].
    Redis,
    /// memcached with 4 worker threads, on 11211.
    Memcached,
    /// lighttpd serving static files, on 80.
    Lighttpd,
}

impl Workload {
    /// The server's TCP port.
    pub fn port(self) -> u16 {
        match self {
            Workload::Redis => PORT,
            Workload::Memcached => 11211,
            Workload::Lighttpd => 80,
        }
    }

    /// The command line given to `ctr run` after the image and id, for memcached and lighttpd
    /// (redis's depends on the pair's options: see [`Pair::run_args`]). Both servers stay root:
    /// CRIU reads a process's resource limits (`prlimit`), which needs CAP_SYS_RESOURCE for a
    /// process of another user, and this platform's bounding set lacks it, so a server that
    /// switched to an unprivileged user cannot be checkpointed here.
    pub fn command(self) -> Vec<String> {
        match self {
            Workload::Redis => Vec::new(),
            Workload::Memcached => [
                "/usr/bin/memcached",
                "-u",
                "root",
                "-t",
                "4",
                "-m",
                "64",
                "-U",
                "0",
            ]
            .map(String::from)
            .to_vec(),
            Workload::Lighttpd => [
                "/bin/sh",
                "-c",
                "sed -e /server.username/d -e /server.groupname/d /etc/lighttpd/lighttpd.conf \
                 > /tmp/lighttpd.conf && exec /usr/sbin/lighttpd -D -f /tmp/lighttpd.conf",
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    /// The local image's name.
    pub fn image(self) -> &'static str {
        match self {
            Workload::Redis => "redis",
            Workload::Memcached => "memcached",
            Workload::Lighttpd => "lighttpd",
        }
    }
}

/// A replicated server on a test bed: hosts `client`, `primary`, `backup` (each of the last two
/// with its own containerd), and the container's network namespace on each side: `svc`
/// (198.18.0.13, the service address) and `svcb` (on the same switch, no address until a
/// failover moves it there).
pub struct Pair {
    /// The test bed.
    pub bed: TestBed,
    /// The key file both sides name.
    pub key: PathBuf,
    /// redis keeps an append-only file (in the container's writable layer).
    pub aof: bool,
    /// The server.
    pub workload: Workload,
    /// `io.containerd.rrc.mode` on both sides (None: the default, passive).
    pub mode: Option<String>,
    /// More annotations for both sides (`KEY=VALUE`).
    pub annotations: Vec<String>,
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Pair {
    /// Builds the bed and starts both containerds.
    pub fn new() -> Result<Pair> {
        let mut bed = TestBed::new(&["client", "primary", "backup", "svc", "svcb"])?;
        bed.host_mut("primary").start_containerd("")?;
        bed.host_mut("backup").start_containerd("")?;
        // The backup side's namespace: on the switch, no address until a failover.
        ip(&[
            "-n",
            bed.host("svcb").netns(),
            "addr",
            "flush",
            "dev",
            "eth0",
        ])?;
        let key = bed.dir().join("pair.key");
        let mut bytes = [0u8; 32];
        fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        fs::write(&key, bytes)?;
        Ok(Pair {
            bed,
            key,
            aof: false,
            workload: Workload::Redis,
            mode: None,
            annotations: Vec::new(),
        })
    }

    /// A host of the bed.
    pub fn host(&self, name: &str) -> &Host {
        self.bed.host(name)
    }

    /// The service address (the server on the container's address).
    pub fn service(&self) -> SocketAddr {
        SocketAddr::new(self.host("svc").ip().into(), self.workload.port())
    }

    /// The `ctr run` arguments of one side.
    pub fn run_args(&self, role: &[String], netns: &Host) -> Vec<String> {
        let mut args: Vec<String> = ["run", "-d", "--runtime", RRC_RUNTIME]
            .map(String::from)
            .to_vec();
        for a in role {
            args.push("--annotation".into());
            args.push(a.clone());
        }
        if let Some(mode) = &self.mode {
            args.push("--annotation".into());
            args.push(format!("io.containerd.rrc.mode={mode}"));
        }
        for a in &self.annotations {
            args.push("--annotation".into());
            args.push(a.clone());
        }
        args.push("--annotation".into());
        args.push(format!(
            "io.containerd.rrc.auth-key-file={}",
            self.key.display()
        ));
        args.push("--with-ns".into());
        args.push(format!("network:{}", netns.netns_path().display()));
        args.push(image(self.workload.image()));
        args.push(ID.into());
        if self.workload != Workload::Redis {
            args.extend(self.workload.command());
            return args;
        }
        args.extend(
            [
                "/usr/bin/redis-server",
                "--bind",
                "0.0.0.0",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--dir",
                "/data",
            ]
            .map(String::from),
        );
        let aof: &[&str] = if self.aof {
            &[
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--enable-debug-command",
                "yes",
            ]
        } else {
            &["--appendonly", "no"]
        };
        args.extend(aof.iter().map(|a| a.to_string()));
        args
    }

    /// Starts the backup side (role backup, listening on the backup host).
    pub fn start_backup(&self) -> Result<()> {
        let backup = self.host("backup");
        let args = self.run_args(
            &[
                "io.containerd.rrc.role=backup".into(),
                format!("io.containerd.rrc.listen={}:7070", backup.ip()),
            ],
            self.host("svcb"),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        backup.ctr_ok(&args)?;
        Ok(())
    }

    /// Starts the primary side (role primary, peer = the backup host).
    pub fn start_primary(&self) -> Result<()> {
        let primary = self.host("primary");
        let args = self.run_args(
            &[
                "io.containerd.rrc.role=primary".into(),
                format!("io.containerd.rrc.peer={}:7070", self.host("backup").ip()),
            ],
            self.host("svc"),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        primary.ctr_ok(&args)?;
        Ok(())
    }

    /// Starts backup and primary, and waits until the primary is protected and its server
    /// accepts connections from the client host.
    pub fn start(&self) -> Result<()> {
        self.start_backup()?;
        self.start_primary()?;
        wait_state(
            self.host("primary"),
            &["protected"],
            Duration::from_secs(30),
        )?;
        self.wait_serving()
    }

    /// Waits until the server accepts a connection from the client host.
    pub fn wait_serving(&self) -> Result<()> {
        let netns = self.host("client").netns_path();
        let addr = self.service();
        wait_for(Duration::from_secs(30), || {
            let netns = netns.clone();
            std::thread::spawn(move || crate::checker::connect_in(&netns, addr).map(drop))
                .join()
                .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
        })
        .with_context(|| self.host("primary").containerd_log_tail())
    }

    /// Kills the primary host's part: the link first (nothing more leaves), then the shim and
    /// the container.
    pub fn kill_primary(&self) -> Result<()> {
        self.kill_side("primary", "svc")
    }

    /// Kills one side: `netns`'s link first, then the shim and the container on `host`.
    pub fn kill_side(&self, host: &str, netns: &str) -> Result<()> {
        let side = self.host(host);
        ip(&[
            "-n",
            self.host(netns).netns(),
            "link",
            "set",
            "eth0",
            "down",
        ])?;
        let bundle = side.bundle_dir(ID);
        for file in ["shim.pid", "init.pid"] {
            let text =
                fs::read_to_string(bundle.join(file)).with_context(|| format!("read {file}"))?;
            let pid: i32 = text
                .trim()
                .parse()
                .with_context(|| format!("{file}: {text:?}"))?;
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        Ok(())
    }

    /// Removes both sides' containers and puts the network back as it was, for the next round.
    pub fn reset(&self) -> Result<()> {
        for h in ["primary", "backup"] {
            let host = self.host(h);
            let _ = host.ctr(&["task", "kill", "-s", "SIGKILL", ID]);
            wait_for(Duration::from_secs(20), || {
                let out = host.ctr(&["task", "rm", "-f", ID])?;
                let err = String::from_utf8_lossy(&out.stderr);
                ensure!(
                    out.status.success() || err.contains("not found"),
                    "task rm: {err}"
                );
                Ok(())
            })?;
            let _ = host.ctr(&["container", "rm", ID]);
            // The shim exits once its last task is deleted.
            wait_for(Duration::from_secs(10), || {
                let left: Vec<i32> = netns_pids(host.netns())
                    .into_iter()
                    .filter(|p| {
                        fs::read_to_string(format!("/proc/{p}/comm"))
                            .is_ok_and(|c| c.starts_with("containerd-shim"))
                    })
                    .collect();
                let ps: Vec<String> = left
                    .iter()
                    .map(|p| {
                        let stat =
                            fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                        let cmd = fs::read_to_string(format!("/proc/{p}/cmdline"))
                            .unwrap_or_default()
                            .replace('\0', " ");
                        format!("{stat} | {cmd}")
                    })
                    .collect();
                ensure!(left.is_empty(), "shims still running on {h}: {ps:?}");
                Ok(())
            })
            .with_context(|| host.containerd_log_tail())?;
        }
        // A killed side leaves its hold and gate rules behind (a rebooted host would not).
        for side in ["svc", "svcb"] {
            let netns = self.host(side).netns().to_string();
            for chain in ["INPUT", "OUTPUT"] {
                let _ = Command::new("ip")
                    .args(["netns", "exec", &netns, "iptables", "-w", "-F", chain])
                    .output();
            }
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        }
        // The service address back on the primary side only (a fenced primary removed it).
        let cidr = format!("{}/15", self.host("svc").ip());
        ip(&[
            "-n",
            self.host("svc").netns(),
            "addr",
            "replace",
            &cidr,
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            self.host("svcb").netns(),
            "addr",
            "flush",
            "dev",
            "eth0",
        ])?;
        ip(&["-n", self.host("client").netns(), "neigh", "flush", "all"])?;
        Ok(())
    }
}

/// Hybrid mode: what the recorder of container [`ID`] on `host` publishes in its position file
/// (the layout of `rrc_recorder::position`): log bytes written, state, the recorder's pid.
pub fn recorder_position(host: &Host) -> Result<(u64, u64, u64)> {
    let path = host.bundle_dir(ID).join("rrc-log-position");
    let bytes = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    let word = |i: usize| -> Result<u64> {
        bytes
            .get(i * 8..i * 8 + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .with_context(|| format!("{} is too short", path.display()))
    };
    Ok((word(0)?, word(1)?, word(2)?))
}

/// The status file of container [`ID`] on `host`.
pub fn status(host: &Host) -> Result<Value> {
    let p = host.bundle_dir(ID).join("rrc-status.json");
    let text = fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", p.display()))
}

/// Waits until the status of [`ID`] on `host` is one of `states`; returns it.
pub fn wait_state(host: &Host, states: &[&str], timeout: Duration) -> Result<Value> {
    wait_for(timeout, || {
        let s = status(host)?;
        let state = s["state"].as_str().unwrap_or_default().to_string();
        ensure!(
            states.contains(&state.as_str()),
            "{} is {state} ({}), waiting for {states:?}",
            host.name(),
            s["detail"]
        );
        Ok(s)
    })
    .with_context(|| host.containerd_log_tail())
}

/// SIGKILLs every process of ours (shim daemon and standby) on `host`.
pub fn kill_shims(host: &Host) {
    for p in netns_pids(host.netns()) {
        if fs::read_to_string(format!("/proc/{p}/comm"))
            .is_ok_and(|c| c.starts_with("containerd-shim"))
        {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

/// `iptables -w ARGS` in a test host's network namespace.
pub fn iptables(host: &Host, args: &[&str]) -> Result<()> {
    let out = host.command("iptables").arg("-w").args(args).output()?;
    ensure!(
        out.status.success(),
        "iptables {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
