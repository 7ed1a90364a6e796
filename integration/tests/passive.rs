//! Passive mode end to end, on real containerd, runc, CRIU and redis: a backup shim waits on
//! the test host "backup", the primary runs redis on "primary", a checker on "client" keeps
//! connections open and streams acknowledged writes; the primary is killed (its shim and its
//! container SIGKILLed, its link cut) at random points, and the backup must take over with every
//! acknowledged write present and no connection broken.
//!
//! The container's network namespace is a test host of its own: "svc" on the primary side
//! (198.18.0.13), "svcb" on the backup side (an interface on the same switch, no address, its
//! own MAC): on failover the backup shim moves the address there and announces it.
//!
//! `RRC_INJECTIONS=N` sets the number of primary kills (default 20). Run as root after
//! `make build`: `cargo test -p rrc-integration --test passive -- --nocapture`.

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rrc_integration::checker::{verify, Checker};
use rrc_integration::{
    image, integration_unavailable, netns_pids, wait_for, Host, TestBed, RRC_RUNTIME,
};
use serde_json::Value;

/// The tests use the same test hosts' names and ports; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const ID: &str = "redis-ft";
const PORT: u16 = 6379;
/// Three epochs of the default 1 s: see [`inject`].
const CONNECTIONS_SETTLE: Duration = Duration::from_secs(3);

struct Pair {
    bed: TestBed,
    key: PathBuf,
    /// redis keeps an append-only file (in the container's writable layer).
    aof: bool,
}

fn ip(args: &[&str]) -> Result<()> {
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
    fn new() -> Result<Pair> {
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
        })
    }

    fn host(&self, name: &str) -> &Host {
        self.bed.host(name)
    }

    fn service(&self) -> SocketAddr {
        SocketAddr::new(self.host("svc").ip().into(), PORT)
    }

    fn run_args(&self, role: &[String], netns: &Host) -> Vec<String> {
        let mut args: Vec<String> = ["run", "-d", "--runtime", RRC_RUNTIME]
            .map(String::from)
            .to_vec();
        for a in role {
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
        args.push(image("redis"));
        args.push(ID.into());
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

    fn start_backup(&self) -> Result<()> {
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

    fn start_primary(&self) -> Result<()> {
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

    /// Starts backup and primary, and waits until the primary is protected.
    fn start(&self) -> Result<()> {
        self.start_backup()?;
        self.start_primary()?;
        wait_state(
            self.host("primary"),
            &["protected"],
            Duration::from_secs(30),
        )?;
        Ok(())
    }

    /// Kills the primary host's part: the link first (nothing more leaves), then the shim and
    /// the container.
    fn kill_primary(&self) -> Result<()> {
        let primary = self.host("primary");
        ip(&[
            "-n",
            self.host("svc").netns(),
            "link",
            "set",
            "eth0",
            "down",
        ])?;
        let bundle = primary.bundle_dir(ID);
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
    fn reset(&self) -> Result<()> {
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
        let svc = self.host("svc").netns().to_string();
        let _ = Command::new("ip")
            .args(["netns", "exec", &svc, "iptables", "-w", "-F", "OUTPUT"])
            .output();
        ip(&["-n", &svc, "link", "set", "eth0", "up"])?;
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

/// The status file of container [`ID`] on `host`.
fn status(host: &Host) -> Result<Value> {
    let p = host.bundle_dir(ID).join("rrc-status.json");
    let text = fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", p.display()))
}

fn wait_state(host: &Host, states: &[&str], timeout: Duration) -> Result<Value> {
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

/// Recovery figures of one injection.
#[derive(Debug)]
struct Recovery {
    after: Duration,
    detection_ms: f64,
    restore_ms: f64,
    network_ms: f64,
    max_stall: Duration,
    acknowledged: u64,
}

fn inject(pair: &Pair, after: Duration) -> Result<Recovery> {
    pair.start()?;
    if let Some(secs) = std::env::var("RRC_DEBUG_PAUSE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        eprintln!("DEBUG pause {secs}s: bed {}", pair.bed.dir().display());
        std::thread::sleep(Duration::from_secs(secs));
    }
    let client = pair.host("client");
    let checker = Checker::start(&client.netns_path(), pair.service(), 4);
    // CRIU cannot checkpoint a half-open connection (the kernel's request socket): a connection
    // whose handshake completed after the last committed checkpoint is reset by the restored
    // kernel. Wait until the checker's connections are in a committed checkpoint (their
    // SYN-ACK waits one epoch, then one more epoch must commit), then kill at a random point.
    std::thread::sleep(CONNECTIONS_SETTLE);
    std::thread::sleep(after);
    pair.kill_primary()?;
    let killed = Instant::now();
    let st = wait_state(
        pair.host("backup"),
        &["live", "failed"],
        Duration::from_secs(30),
    )?;
    ensure!(st["state"] == "live", "failover failed: {}", st["detail"]);
    // The new primary serves the same connections for a while.
    std::thread::sleep(Duration::from_millis(1500));
    let report = checker.stop();
    let broken = report.broken();
    ensure!(broken.is_empty(), "connections broke: {broken:?}");
    let problems = verify(&client.netns_path(), pair.service(), &report)?;
    ensure!(
        problems.is_empty(),
        "acknowledged writes lost: {problems:?}"
    );
    let f = st["failovers"]
        .as_array()
        .and_then(|a| a.last())
        .ok_or_else(|| anyhow!("no failover recorded: {st}"))?;
    let num = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
    let _ = killed;
    Ok(Recovery {
        after,
        detection_ms: num("detection_ms"),
        restore_ms: num("restore_ms"),
        network_ms: num("network_ms"),
        max_stall: report.max_stall(),
        acknowledged: report.acknowledged(),
    })
}

fn injections() -> usize {
    std::env::var("RRC_INJECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// A pseudo-random delay in [300, 2800) ms (xorshift; the seed is printed).
fn delays(n: usize, seed: u64) -> Vec<Duration> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Duration::from_millis(300 + x % 2500)
        })
        .collect()
}

#[test]
fn failover_keeps_connections_and_acknowledged_writes() -> Result<()> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pair = Pair::new()?;
    let n = injections();
    let seed = std::env::var("RRC_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        });
    eprintln!("passive failover: {n} injections, RRC_SEED={seed}");
    let mut results = Vec::new();
    for (i, after) in delays(n, seed).into_iter().enumerate() {
        let r = inject(&pair, after)
            .with_context(|| format!("injection {i} (kill after {after:?}, RRC_SEED={seed})"));
        let reset = pair.reset();
        let r = r?;
        reset?;
        eprintln!(
            "injection {i}: killed after {:?}; detection {:.0} ms, restore {:.0} ms, network {:.0} ms; longest client stall {:?}; {} writes acknowledged, none lost",
            r.after, r.detection_ms, r.restore_ms, r.network_ms, r.max_stall, r.acknowledged
        );
        results.push(r);
    }
    let mut stalls: Vec<Duration> = results.iter().map(|r| r.max_stall).collect();
    stalls.sort();
    let mut restores: Vec<f64> = results.iter().map(|r| r.restore_ms).collect();
    restores.sort_by(f64::total_cmp);
    if let (Some(s), Some(r)) = (
        stalls.get(stalls.len() / 2),
        restores.get(restores.len() / 2),
    ) {
        eprintln!("passive failover: {n}/{n} recovered; median longest client stall {s:?}, median restore {r:.0} ms");
    }
    Ok(())
}

/// SIGKILLs every process of ours (shim daemon and standby) on `host`.
fn kill_shims(host: &Host) {
    for p in netns_pids(host.netns()) {
        if fs::read_to_string(format!("/proc/{p}/comm"))
            .is_ok_and(|c| c.starts_with("containerd-shim"))
        {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

#[test]
fn backup_loss_leaves_the_primary_serving_and_it_pairs_again() -> Result<()> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pair = Pair::new()?;
    pair.start()?;
    let client = pair.host("client");
    let checker = Checker::start(&client.netns_path(), pair.service(), 4);
    std::thread::sleep(CONNECTIONS_SETTLE);

    // The backup dies: the primary keeps serving, unprotected, and says so.
    let backup = pair.host("backup");
    kill_shims(backup);
    let lost = Instant::now();
    let st = wait_state(
        pair.host("primary"),
        &["unprotected"],
        Duration::from_secs(10),
    )?;
    eprintln!(
        "backup killed: primary unprotected after {:?} ({})",
        lost.elapsed(),
        st["detail"]
    );
    // containerd notices the dead shim and cleans its task up.
    let rm = backup.ctr(&["task", "rm", "-f", ID])?;
    let err = String::from_utf8_lossy(&rm.stderr);
    ensure!(
        rm.status.success() || err.contains("not found"),
        "task rm on the backup: {err}"
    );
    backup.ctr_ok(&["container", "rm", ID])?;
    std::thread::sleep(Duration::from_secs(1));

    // A new backup: the primary pairs again with a full checkpoint and is protected.
    pair.start_backup()?;
    let repaired = Instant::now();
    wait_state(
        pair.host("primary"),
        &["protected"],
        Duration::from_secs(30),
    )?;
    eprintln!(
        "new backup: primary protected again after {:?}",
        repaired.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));

    // And a primary failure is survived.
    pair.kill_primary()?;
    let st = wait_state(backup, &["live", "failed"], Duration::from_secs(30))?;
    ensure!(st["state"] == "live", "failover failed: {}", st["detail"]);
    std::thread::sleep(Duration::from_millis(1500));
    let report = checker.stop();
    ensure!(
        report.broken().is_empty(),
        "connections broke: {:?}",
        report.broken()
    );
    let problems = verify(&client.netns_path(), pair.service(), &report)?;
    ensure!(
        problems.is_empty(),
        "acknowledged writes lost: {problems:?}"
    );
    eprintln!(
        "after backup loss, re-pairing and a primary kill: {} writes acknowledged, none lost, no connection broken",
        report.acknowledged()
    );
    pair.reset()
}

#[test]
fn a_backup_with_another_key_is_refused_and_the_primary_keeps_serving() -> Result<()> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut pair = Pair::new()?;
    pair.start_backup()?;
    // The primary holds another key.
    let other = pair.bed.dir().join("other.key");
    fs::write(&other, [7u8; 32])?;
    pair.key = other;
    pair.start_primary()?;
    let st = wait_state(
        pair.host("primary"),
        &["waiting-for-backup"],
        Duration::from_secs(20),
    )?;
    let detail = st["detail"].as_str().unwrap_or_default().to_string();
    ensure!(
        detail.contains("authentication failed") || detail.contains("refused"),
        "the primary's status does not say why it is not paired: {detail}"
    );
    // Nothing reached the backup's store, and the container serves (unprotected).
    std::thread::sleep(Duration::from_secs(2));
    let b = status(pair.host("backup"))?;
    ensure!(
        b["state"] == "standby" && b["checkpoints"] == 0,
        "the backup took something from a primary with the wrong key: {b}"
    );
    let log = fs::read_to_string(pair.host("backup").containerd_log())?;
    ensure!(
        log.contains("refused a primary") && log.contains("authentication failed"),
        "the backup's log does not name the refusal"
    );
    let client = pair.host("client");
    let checker = Checker::start(&client.netns_path(), pair.service(), 2);
    std::thread::sleep(Duration::from_secs(1));
    let report = checker.stop();
    ensure!(
        report.acknowledged() > 100 && report.broken().is_empty(),
        "the unpaired primary does not serve: {report:?}"
    );
    eprintln!(
        "wrong key: refused on both sides ({detail}); primary served {} writes",
        report.acknowledged()
    );
    pair.reset()
}

#[test]
fn the_writable_layer_travels_with_each_checkpoint() -> Result<()> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut pair = Pair::new()?;
    // redis appends every write to /data/appendonlydir/* (fsync always): its files must match
    // its memory at every checkpoint, or the restore fails (CRIU checks open files' sizes) or
    // the file lacks writes.
    pair.aof = true;
    pair.start()?;
    let client = pair.host("client");
    let checker = Checker::start(&client.netns_path(), pair.service(), 2);
    std::thread::sleep(CONNECTIONS_SETTLE);
    let st = status(pair.host("primary"))?;
    let fs_bytes = st["last_checkpoint"]["fs_delta_bytes"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        fs_bytes > 0,
        "the last checkpoint carried no writable-layer delta: {st}"
    );
    std::thread::sleep(Duration::from_millis(700));
    pair.kill_primary()?;
    let st = wait_state(
        pair.host("backup"),
        &["live", "failed"],
        Duration::from_secs(30),
    )?;
    ensure!(st["state"] == "live", "failover failed: {}", st["detail"]);
    std::thread::sleep(Duration::from_millis(1500));
    let report = checker.stop();
    ensure!(
        report.broken().is_empty(),
        "connections broke: {:?}",
        report.broken()
    );
    let problems = verify(&client.netns_path(), pair.service(), &report)?;
    ensure!(
        problems.is_empty(),
        "acknowledged writes lost: {problems:?}"
    );
    // Reload the data set from the append-only file the backup's rootfs holds now.
    let out = client
        .command("redis-cli")
        .args(["-h", &pair.host("svc").ip().to_string(), "DEBUG", "LOADAOF"])
        .output()?;
    let reply = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.status.success() && reply == "OK",
        "DEBUG LOADAOF: {reply}"
    );
    let problems = verify(&client.netns_path(), pair.service(), &report)?;
    ensure!(
        problems.is_empty(),
        "the append-only file after failover lacks acknowledged writes: {problems:?}"
    );
    eprintln!(
        "writable layer: last delta before the kill {fs_bytes} bytes; after failover and a reload from the AOF, all {} acknowledged writes present",
        report.acknowledged()
    );
    pair.reset()
}
