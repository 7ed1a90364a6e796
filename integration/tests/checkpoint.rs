//! Checkpoint and restore of a live redis container with `rrc-checkpoint` (runc + CRIU 4.2), on
//! real containerd, runc and CRIU: the primitive the passive mode is built on, measured.
//!
//! The redis container runs under `io.containerd.rrc.v2` on the test host "primary", in its *own*
//! network namespace, the test host "svc" (198.18.0.13): a namespace given by path is external to
//! CRIU's dump, so on failover the container's address moves with it. "svc-b" is that namespace's
//! twin on the backup side: the same address and MAC, link down until the failover. A client on
//! "client" keeps one TCP connection open and sends INCRs over it the whole time.
//!
//! `checkpoint_failover_keeps_the_client_connection` takes dumps with `--leave-running` of an idle
//! redis and of one holding about 50 MB, with both CRIU network-lock methods, and prints CRIU's
//! freezing and frozen times, the dump's wall time and the image size of each. Then it does what a
//! passive-mode failover does: holds the container's outputs, takes the last dump, "kills the
//! primary host" (SIGKILL to the container's init, svc's link down), restores on the backup side
//! into svc-b, and lets the held outputs go. The client's connection survives and its counter
//! continues without a gap or a repeat: every reply it got was produced before the dump (the
//! replies produced after the hold are in the dump's socket send queue, or their requests are
//! retransmitted to the restored redis). Without the hold, the client sees replies the restored
//! redis knows nothing of, the two ends' TCP sequence numbers no longer agree, and the connection
//! dies after the restore (tried by hand: "the connection was closed"): holding outputs until
//! their checkpoint is safe is what makes the restore transparent.
//!
//! `damaged_images_and_failed_dumps_are_refused` checks the refusals: a truncated, missing or
//! corrupted pages file and a missing marker are refused by `restore` before runc runs (nothing
//! starts), the intact copy then restores; a container whose standard streams are containerd's
//! FIFOs cannot be dumped (CRIU's own error lines are in the error) and keeps running.
//!
//! Run as root: `cargo build && cargo test -p rrc-integration --test checkpoint -- --nocapture`
//! (`RRC_CRIU_BIN=/path/to/criu` to use another CRIU than the one on `PATH`).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rrc_checkpoint::{
    resolve_binary, CheckpointError, Checkpointer, DumpOptions, DumpReport, ManifestError,
    NetworkLock, RestoreOptions, RestoreReport, CRIU_CONFIG_ANNOTATION,
};
use rrc_integration::{
    image, integration_unavailable, netns_pids, output_with_timeout, wait_for, Host, TestBed,
    RRC_RUNTIME,
};

/// The tests measure; they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const COUNTER: &str = "rrc:counter";
/// Dumps per configuration (network-lock method × data size).
const DUMPS: usize = 5;

/// Skips (or, with `RRC_REQUIRE_INTEGRATION=1`, fails) when the test bed or CRIU is missing.
/// Returns the CRIU binary.
fn prerequisites() -> Option<PathBuf> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    // $RRC_CRIU_BIN picks another CRIU (to measure a patched one); otherwise CRIU from PATH or
    // where setup.sh installs it.
    let criu = match std::env::var_os("RRC_CRIU_BIN").filter(|p| !p.is_empty()) {
        Some(p) => resolve_binary(Path::new(&p)),
        None => resolve_binary(Path::new("criu"))
            .or_else(|| resolve_binary(Path::new("/usr/local/sbin/criu"))),
    };
    if criu.is_none() {
        let why = "CRIU is not installed (integration/setup.sh builds it into /usr/local/sbin)";
        if std::env::var("RRC_REQUIRE_INTEGRATION").as_deref() == Ok("1") {
            panic!("integration tests required (RRC_REQUIRE_INTEGRATION=1) but cannot run: {why}");
        }
        eprintln!("SKIPPED: {why}");
    }
    criu
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Runs a command that must succeed within 30 s; returns its stdout.
fn run(cmd: &mut Command) -> Result<String> {
    let out = output_with_timeout(cmd.stdin(Stdio::null()), Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NETNS args...`.
fn ip_in(host: &Host, args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(["-n", host.netns()]).args(args))
}

/// `iptables -w args...` inside a host's network namespace.
fn iptables_in(host: &Host, args: &[&str]) -> Result<String> {
    run(host.command("iptables").arg("-w").args(args))
}

/// `redis-cli -h IP args...` from `client`; fails unless redis answered without an error.
fn redis_ok(client: &Host, ip: &str, args: &[&str]) -> Result<String> {
    let mut c = client.command("redis-cli");
    c.args(["-h", ip]).args(args).stdin(Stdio::null());
    let out: Output = output_with_timeout(&mut c, Duration::from_secs(20))?;
    let reply = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.status.success() && !reply.starts_with("ERR") && !reply.contains("Could not connect"),
        "redis-cli {}: {reply} / {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(reply)
}

/// The MAC address of `eth0` in a host's network namespace.
fn mac_of(host: &Host) -> Result<String> {
    let json = ip_in(host, &["-j", "link", "show", "eth0"])?;
    let v: serde_json::Value = serde_json::from_str(&json).context("ip -j link")?;
    v.get(0)
        .and_then(|l| l.get("address"))
        .and_then(|a| a.as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no MAC in {json}"))
}

/// Turns `twin` into a copy of `of`'s network identity (address and MAC on `eth0`), link down:
/// the container's network namespace as the backup side prepares it.
fn make_twin(twin: &Host, of: &Host) -> Result<()> {
    let mac = mac_of(of)?;
    let addr = format!("{}/15", of.ip());
    ip_in(twin, &["link", "set", "eth0", "down"])?;
    ip_in(twin, &["addr", "flush", "dev", "eth0"])?;
    ip_in(twin, &["link", "set", "eth0", "address", &mac])?;
    ip_in(twin, &["addr", "add", &addr, "dev", "eth0"])?;
    Ok(())
}

/// Starts redis as container `id` under rrc's shim on `primary`, in `netns`'s network namespace,
/// its output through pipes (`--log-uri file://`: the shim then gives the container pipes, which
/// CRIU can dump; containerd's FIFOs it cannot), with the CRIU configuration file named by
/// [`CRIU_CONFIG_ANNOTATION`]. Waits until it answers `client`.
fn start_redis(primary: &Host, netns: &Host, client: &Host, id: &str) -> Result<()> {
    let log = format!(
        "file://{}",
        primary.dir().join(format!("{id}.log")).display()
    );
    let annotation = format!(
        "{CRIU_CONFIG_ANNOTATION}={}",
        primary.dir().join(format!("{id}.criu.conf")).display()
    );
    let net = format!("network:{}", netns.netns_path().display());
    let redis = image("redis");
    let args = [
        "run",
        "-d",
        "--runtime",
        RRC_RUNTIME,
        "--log-uri",
        &log,
        "--annotation",
        &annotation,
        "--with-ns",
        &net,
        &redis,
        id,
        "/usr/bin/redis-server",
        "--bind",
        "0.0.0.0",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        "/data",
        "--enable-debug-command",
        "yes",
    ];
    primary.ctr_ok(&args)?;
    let ip = netns.ip().to_string();
    wait_for(Duration::from_secs(20), || {
        let reply = redis_ok(client, &ip, &["PING"])?;
        ensure!(reply == "PONG", "PING: {reply}");
        Ok(())
    })
    .with_context(|| {
        format!(
            "redis {id} never answered\n{}",
            primary.containerd_log_tail()
        )
    })
}

/// A copy of the primary's bundle spec for a restore on the backup side: same rootfs (the
/// primary's, still mounted: both "hosts" are this machine), the network namespace `netns`, a
/// cgroup of the backup host's, and a CRIU configuration file of the backup's.
fn backup_bundle(
    primary: &Host,
    id: &str,
    backup: &Host,
    new_id: &str,
    netns: &Host,
) -> Result<PathBuf> {
    let src = primary.bundle_dir(id);
    let text = fs::read(src.join("config.json")).context("read the primary's config.json")?;
    let mut spec: serde_json::Value = serde_json::from_slice(&text).context("parse config.json")?;
    let rootfs = src.join("rootfs");
    spec["root"]["path"] = rootfs.display().to_string().into();
    spec["linux"]["cgroupsPath"] = format!("/{}/{new_id}", backup.namespace()).into();
    let namespaces = spec["linux"]["namespaces"]
        .as_array_mut()
        .context("spec has no namespaces")?;
    let net = namespaces
        .iter_mut()
        .find(|n| n["type"] == "network")
        .context("spec has no network namespace")?;
    net["path"] = netns.netns_path().display().to_string().into();
    let conf = backup.dir().join(format!("{new_id}.criu.conf"));
    spec["annotations"][CRIU_CONFIG_ANNOTATION] = conf.display().to_string().into();
    let bundle = backup.dir().join("bundles").join(new_id);
    fs::create_dir_all(&bundle).with_context(|| format!("create {}", bundle.display()))?;
    fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )
    .context("write the backup bundle's config.json")?;
    Ok(bundle)
}

/// The pid in a containerd bundle's `init.pid`.
fn init_pid(host: &Host, id: &str) -> Result<i32> {
    let p = host.bundle_dir(id).join("init.pid");
    let text = fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("bad pid {text:?}"))
}

fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Runs `runc --root ROOT args...`.
fn runc(root: &Path, args: &[&str]) -> Result<String> {
    run(Command::new("runc").arg("--root").arg(root).args(args))
}

/// Kills and deletes a container restored outside containerd, on drop.
struct Restored {
    root: PathBuf,
    id: String,
    drains: Vec<JoinHandle<Vec<u8>>>,
}

impl Restored {
    fn new(root: &Path, id: &str, report: &mut RestoreReport) -> Restored {
        let mut drains = Vec::new();
        if let Some(stdio) = report.stdio.take() {
            // The restored redis writes its log into these pipes; keep them drained.
            for fd in [stdio.stdout, stdio.stderr] {
                drains.push(std::thread::spawn(move || {
                    // Read to the end (a full pipe would block redis), keep the first MiB.
                    let mut f = fs::File::from(fd);
                    let (mut kept, mut chunk) = (Vec::new(), [0u8; 8192]);
                    while let Ok(n) = f.read(&mut chunk) {
                        if n == 0 {
                            break;
                        }
                        if kept.len() < 1 << 20 {
                            kept.extend_from_slice(chunk.get(..n).unwrap_or_default());
                        }
                    }
                    kept
                }));
            }
        }
        Restored {
            root: root.to_path_buf(),
            id: id.to_string(),
            drains,
        }
    }

    fn kill_and_delete(&mut self) -> Result<()> {
        if !self.root.join(&self.id).exists() {
            return Ok(());
        }
        let _ = runc(&self.root, &["kill", &self.id, "KILL"]);
        wait_for(Duration::from_secs(20), || {
            runc(&self.root, &["delete", "--force", &self.id]).map(|_| ())
        })?;
        // The pipes close when the last process holding them is gone; do not wait forever.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.drains.iter().any(|d| !d.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for d in self.drains.drain(..) {
            if d.is_finished() {
                let _ = d.join();
            }
        }
        Ok(())
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Err(e) = self.kill_and_delete() {
            eprintln!("cleanup of restored container {}: {e:#}", self.id);
        }
    }
}

#[derive(Default)]
struct ClientState {
    /// The last counter value the client got a reply with.
    last: u64,
    /// The longest time between two replies.
    max_stall: Duration,
    error: Option<String>,
}

/// One TCP connection from the client host to redis, sending INCRs one at a time (a bash holding
/// `/dev/tcp/IP/6379`, relaying our requests and its replies), checking that every reply is the
/// previous one plus one.
struct IncrClient {
    child: Child,
    state: Arc<Mutex<ClientState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl IncrClient {
    fn start(client: &Host, ip: &str) -> Result<IncrClient> {
        let mut child = client.open_tcp_relay(ip, 6379)?;
        let mut to = child.stdin.take().context("client stdin")?;
        let mut from = BufReader::new(child.stdout.take().context("client stdout")?);
        let state = Arc::new(Mutex::new(ClientState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut last_reply = Instant::now();
            let mut line = String::new();
            let fail = |why: String| {
                if let Ok(mut s) = st.lock() {
                    s.error.get_or_insert(why);
                }
            };
            while !stp.load(Ordering::Relaxed) {
                if let Err(e) = to
                    .write_all(format!("INCR {COUNTER}\r\n").as_bytes())
                    .and_then(|()| to.flush())
                {
                    return fail(format!("send: {e}"));
                }
                line.clear();
                match from.read_line(&mut line) {
                    Ok(0) => return fail("the connection was closed".into()),
                    Ok(_) => {}
                    Err(e) => return fail(format!("receive: {e}")),
                }
                let Some(n) = line
                    .trim()
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<u64>().ok())
                else {
                    return fail(format!("unexpected reply {line:?}"));
                };
                let now = Instant::now();
                let Ok(mut s) = st.lock() else { return };
                if n != s.last + 1 {
                    let why = format!("counter went from {} to {n}", s.last);
                    s.error.get_or_insert(why);
                    return;
                }
                s.last = n;
                s.max_stall = s.max_stall.max(now - last_reply);
                last_reply = now;
                drop(s);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Ok(IncrClient {
            child,
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn last(&self) -> Result<u64> {
        let s = self
            .state
            .lock()
            .map_err(|_| anyhow!("client state poisoned"))?;
        if let Some(e) = &s.error {
            bail!("the client connection failed: {e}");
        }
        Ok(s.last)
    }

    fn max_stall(&self) -> Duration {
        self.state.lock().map(|s| s.max_stall).unwrap_or_default()
    }

    fn reset_max_stall(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.max_stall = Duration::ZERO;
        }
    }

    /// Waits until the counter the client saw reaches `value`.
    fn wait_for(&self, value: u64, timeout: Duration) -> Result<u64> {
        wait_for(timeout, || {
            let last = self.last()?;
            ensure!(
                last >= value,
                "the client is at {last}, waiting for {value}"
            );
            Ok(last)
        })
    }

    /// Stops the client; returns the last counter value it saw.
    fn stop(&mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        // Give the thread a moment to leave on its own (it checks after each reply).
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.last()
    }

    fn kill(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for IncrClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.kill();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One measured dump.
struct Sample {
    data: &'static str,
    lock: NetworkLock,
    freezing: Duration,
    frozen: Duration,
    wall: Duration,
    seal: Duration,
    bytes: u64,
    pages: u64,
    /// The longest gap between two replies the client saw around this dump (the network lock
    /// drops its packets; TCP retransmits after at least 200 ms).
    stall: Option<Duration>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v.get(n / 2).copied().unwrap_or(f64::NAN),
        n => {
            (v.get(n / 2 - 1).copied().unwrap_or(f64::NAN)
                + v.get(n / 2).copied().unwrap_or(f64::NAN))
                / 2.0
        }
    }
}

fn sample(data: &'static str, lock: NetworkLock, r: &DumpReport) -> Result<Sample> {
    let stats = r.stats.ok_or_else(|| {
        anyhow!(
            "CRIU wrote no readable stats-dump in {}",
            r.work_dir.display()
        )
    })?;
    Ok(Sample {
        data,
        lock,
        freezing: stats.freezing,
        frozen: stats.frozen,
        wall: r.wall,
        seal: r.seal,
        bytes: r.image_bytes,
        pages: stats.pages_written,
        stall: None,
    })
}

fn print_sample(n: usize, s: &Sample) {
    eprintln!(
        "[dump] {:<5} lock={:<8} #{n}: freezing {:>7.1} ms  frozen {:>6.1} ms  paused<= {:>6.1} ms  runc wall {:>6.1} ms  seal {:>5.1} ms  image {:>6.1} MiB ({} pages){}",
        s.data,
        s.lock.as_str(),
        ms(s.freezing),
        ms(s.frozen),
        ms(s.freezing + s.frozen),
        ms(s.wall),
        ms(s.seal),
        mib(s.bytes),
        s.pages,
        s.stall
            .map(|d| format!("  client stall {:.0} ms", ms(d)))
            .unwrap_or_default()
    );
}

fn print_medians(samples: &[Sample]) {
    eprintln!("[dump] medians over {DUMPS} dumps each:");
    eprintln!(
        "[dump] data  lock      freezing ms  frozen ms  paused<= ms  runc wall ms  image MiB  client stall ms"
    );
    for data in ["idle", "50MB"] {
        for lock in [NetworkLock::Nftables, NetworkLock::Iptables] {
            let of: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.data == data && s.lock == lock)
                .collect();
            if of.is_empty() {
                continue;
            }
            let m = |f: &dyn Fn(&Sample) -> f64| median(of.iter().map(|s| f(s)).collect());
            eprintln!(
                "[dump] {data:<5} {:<8}  {:>11.1}  {:>9.1}  {:>11.1}  {:>12.1}  {:>9.1}  {:>15.0}",
                lock.as_str(),
                m(&|s| ms(s.freezing)),
                m(&|s| ms(s.frozen)),
                m(&|s| ms(s.freezing + s.frozen)),
                m(&|s| ms(s.wall)),
                m(&|s| mib(s.bytes)),
                m(&|s| s.stall.map(ms).unwrap_or(f64::NAN)),
            );
        }
    }
}

/// Removes an image directory and its work directory.
fn remove_dump(r: &DumpReport) {
    let _ = fs::remove_dir_all(&r.image_dir);
    let _ = fs::remove_dir_all(&r.work_dir);
}

/// `DUMPS` dumps with each network-lock method (alternating), while the client runs; each dump
/// must leave the client's connection working.
fn measure(
    rt: &tokio::runtime::Runtime,
    ckpt: &Checkpointer,
    id: &str,
    dir: &Path,
    data: &'static str,
    client: &IncrClient,
    samples: &mut Vec<Sample>,
) -> Result<()> {
    for i in 0..DUMPS {
        for lock in [NetworkLock::Nftables, NetworkLock::Iptables] {
            client.reset_max_stall();
            let before = client.last()?;
            let img = dir.join(format!("img-{data}-{}-{i}", lock.as_str()));
            let opts = DumpOptions {
                network_lock: Some(lock),
                ..DumpOptions::default()
            };
            let report = rt
                .block_on(ckpt.dump(id, &img, &opts))
                .with_context(|| format!("dump {data} #{i} with {lock} lock"))?;
            let mut s = sample(data, lock, &report)?;
            remove_dump(&report);
            // The connection survived the dump and goes on.
            client
                .wait_for(before + 20, Duration::from_secs(20))
                .with_context(|| format!("the client after dump {data} #{i} ({lock} lock)"))?;
            s.stall = Some(client.max_stall());
            print_sample(i, &s);
            samples.push(s);
        }
    }
    Ok(())
}

/// The five test hosts of a failover: client, primary (with containerd), backup, and the
/// service's network namespace "svc" with its twin "svc-b" ready to take over its address.
fn failover_bed() -> Result<TestBed> {
    let mut bed = TestBed::new(&["client", "primary", "backup", "svc", "svc-b"])?;
    bed.host_mut("primary").start_containerd("")?;
    make_twin(bed.host("svc-b"), bed.host("svc"))?;
    Ok(bed)
}

#[test]
fn checkpoint_failover_keeps_the_client_connection() -> Result<()> {
    let Some(criu) = prerequisites() else {
        return Ok(());
    };
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let bed = failover_bed()?;
    let (client, primary, backup) = (bed.host("client"), bed.host("primary"), bed.host("backup"));
    let (svc, svc_b) = (bed.host("svc"), bed.host("svc-b"));
    let ip = svc.ip().to_string();
    let rt = runtime()?;
    let id = "redis1";

    start_redis(primary, svc, client, id)?;
    ensure!(
        redis_ok(client, &ip, &["SET", "k", "v"])? == "OK",
        "SET k v"
    );
    let mut conn = IncrClient::start(client, &ip)?;
    conn.wait_for(50, Duration::from_secs(20))?;

    // --- Measurements: dumps with --leave-running while the client runs.
    let ckpt = Checkpointer::new(primary.runc_root()).criu_binary(&criu);
    let images = backup.dir().join("images");
    let mut samples = Vec::new();
    measure(&rt, &ckpt, id, &images, "idle", &conn, &mut samples)?;
    let reply = redis_ok(client, &ip, &["DEBUG", "POPULATE", "500000", "rrc:data"])?;
    ensure!(reply == "OK", "DEBUG POPULATE: {reply}");
    let info = redis_ok(client, &ip, &["INFO", "memory"])?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory_human:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    eprintln!("[dump] redis now holds 500000 keys, used_memory {used}");
    measure(&rt, &ckpt, id, &images, "50MB", &conn, &mut samples)?;
    print_medians(&samples);

    // --- Failover. The primary holds the container's outputs from here on (what rrc's output
    // hold does from the start of an epoch until its checkpoint is committed at the backup).
    iptables_in(svc, &["-I", "OUTPUT", "1", "-j", "DROP"])?;
    let held_at = conn.last()?;
    let opts = DumpOptions {
        network_lock: Some(NetworkLock::Nftables),
        ..DumpOptions::default()
    };
    let last_dump = rt
        .block_on(ckpt.dump(id, &images.join("img-final"), &opts))
        .context("the last dump")?;
    let s = sample("50MB", NetworkLock::Nftables, &last_dump)?;
    print_sample(DUMPS, &s);

    // The primary host dies: the container's processes are killed (not through containerd) and
    // its network namespace goes silent.
    let pid = init_pid(primary, id)?;
    let died = Instant::now();
    kill(Pid::from_raw(pid), Signal::SIGKILL).context("kill the container's init")?;
    ip_in(svc, &["link", "set", "eth0", "down"])?;
    wait_for(Duration::from_secs(20), || {
        ensure!(!alive(pid), "the container's init {pid} still runs");
        Ok(())
    })?;
    conn.reset_max_stall();

    // The backup takes over: the twin namespace comes up with incoming traffic blocked until the
    // restore is done (an unanswered packet would draw a RST from the twin's kernel).
    iptables_in(svc_b, &["-I", "INPUT", "1", "-j", "DROP"])?;
    ip_in(svc_b, &["link", "set", "eth0", "up"])?;
    let new_id = "redis1-b";
    let bundle = backup_bundle(primary, id, backup, new_id, svc_b)?;
    let backup_ckpt = Checkpointer::new(backup.runc_root()).criu_binary(&criu);
    let mut report = rt
        .block_on(backup_ckpt.restore(
            new_id,
            &bundle,
            &last_dump.image_dir,
            RestoreOptions {
                network_lock: Some(NetworkLock::Nftables),
                ..RestoreOptions::default()
            },
        ))
        .context("restore on the backup side")?;
    let mut restored = Restored::new(&backup.runc_root(), new_id, &mut report);
    iptables_in(svc_b, &["-D", "INPUT", "1"])?;
    let up = died.elapsed();
    let stats = report.stats.context("no restore stats")?;
    eprintln!(
        "[restore] verify {:.1} ms, runc restore wall {:.1} ms (CRIU restore {:.1} ms, {} pages), pid {}; primary death to restored and unblocked: {:.1} ms",
        ms(report.verify),
        ms(report.wall),
        ms(stats.restore),
        stats.pages_restored.unwrap_or(0),
        report.pid,
        ms(up)
    );
    ensure!(
        alive(report.pid),
        "the restored init {} is not running",
        report.pid
    );

    // The client's connection goes on: the counter continues from where the client was, without
    // a gap or a repeat (IncrClient checks every reply).
    let after = conn
        .wait_for(held_at + 100, Duration::from_secs(30))
        .context("the client after the failover")?;
    eprintln!(
        "[restore] client was at {held_at} when outputs were held; now at {after}; longest stall {:.0} ms",
        ms(conn.max_stall())
    );
    let got = redis_ok(client, &ip, &["GET", "k"])?;
    ensure!(got == "v", "GET k after the restore: {got:?}");
    let keys = redis_ok(client, &ip, &["DBSIZE"])?;
    ensure!(keys == "500002", "DBSIZE after the restore: {keys}");

    // The restored container can be checkpointed again (its standard streams are pipes).
    let again = rt
        .block_on(backup_ckpt.dump(new_id, &images.join("img-again"), &opts))
        .context("dump of the restored container")?;
    print_sample(0, &sample("50MB", NetworkLock::Nftables, &again)?);
    remove_dump(&again);

    let last = conn.stop()?;
    let counter = redis_ok(client, &ip, &["GET", COUNTER])?;
    ensure!(
        counter == last.to_string(),
        "counter {counter}, but the client's last reply was {last}"
    );

    // Clean up: the restored container, then the primary's (stopped) task.
    restored.kill_and_delete()?;
    let leftovers = netns_pids(svc_b.netns());
    ensure!(
        leftovers.is_empty(),
        "processes left in svc-b: {leftovers:?}"
    );
    primary.ctr_ok(&["tasks", "delete", id])?;
    primary.ctr_ok(&["containers", "delete", id])?;
    remove_dump(&last_dump);
    Ok(())
}

/// Copies the files of an image directory.
fn copy_images(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// The largest `pages-*.img` of an image directory.
fn pages_file(dir: &Path) -> Result<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("pages-") && name.ends_with(".img") {
            let len = e.metadata()?.len();
            if best.as_ref().is_none_or(|(l, _)| len > *l) {
                best = Some((len, e.path()));
            }
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| anyhow!("no pages file in {}", dir.display()))
}

#[test]
fn damaged_images_and_failed_dumps_are_refused() -> Result<()> {
    let Some(criu) = prerequisites() else {
        return Ok(());
    };
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let bed = failover_bed()?;
    let (client, primary, backup) = (bed.host("client"), bed.host("primary"), bed.host("backup"));
    let (svc, svc_b) = (bed.host("svc"), bed.host("svc-b"));
    let rt = runtime()?;
    let id = "redis1";
    start_redis(primary, svc, client, id)?;
    redis_ok(client, &svc.ip().to_string(), &["SET", "k", "v"])?;

    let ckpt = Checkpointer::new(primary.runc_root()).criu_binary(&criu);
    let images = backup.dir().join("images");
    let good = images.join("good");
    let dump = rt
        .block_on(ckpt.dump(id, &good, &DumpOptions::default()))
        .context("dump")?;
    eprintln!(
        "[refuse] dumped {:.1} MiB in {} files",
        mib(dump.image_bytes),
        dump.files
    );

    // A second dump into the same directory is refused.
    let e = rt
        .block_on(ckpt.dump(id, &good, &DumpOptions::default()))
        .expect_err("a dump into a non-empty directory");
    ensure!(matches!(e, CheckpointError::ImageDirNotEmpty(_)), "{e}");

    let new_id = "redis1-b";
    let bundle = backup_bundle(primary, id, backup, new_id, svc_b)?;
    let backup_root = backup.runc_root();
    let backup_ckpt = Checkpointer::new(&backup_root).criu_binary(&criu);
    let pages_name = pages_file(&good)?
        .file_name()
        .map(|n| n.to_owned())
        .context("pages file name")?;

    type Damage = fn(&Path) -> Result<()>;
    let damages: [(&str, Damage); 4] = [
        ("truncated", |p| {
            let len = fs::metadata(p)?.len();
            fs::OpenOptions::new()
                .write(true)
                .open(p)?
                .set_len(len / 2)?;
            Ok(())
        }),
        ("missing", |p| Ok(fs::remove_file(p)?)),
        ("flipped", |p| {
            let mut b = fs::read(p)?;
            let mid = b.len() / 2;
            let byte = b.get_mut(mid).context("empty pages file")?;
            *byte ^= 0x40;
            Ok(fs::write(p, b)?)
        }),
        ("unsealed", |p| {
            let dir = p.parent().context("no parent")?;
            Ok(fs::remove_file(dir.join(rrc_checkpoint::MARKER))?)
        }),
    ];
    for (what, damage) in damages {
        let dir = images.join(what);
        copy_images(&good, &dir)?;
        damage(&dir.join(&pages_name))?;
        let e = rt
            .block_on(backup_ckpt.restore(new_id, &bundle, &dir, RestoreOptions::default()))
            .expect_err("a damaged image directory");
        eprintln!("[refuse] {what}: {e}");
        let ok = match (what, &e) {
            ("truncated", CheckpointError::Image(ManifestError::Size { file, .. })) => {
                *file == pages_name.to_string_lossy()
            }
            ("missing", CheckpointError::Image(ManifestError::Missing { file, .. })) => {
                *file == pages_name.to_string_lossy()
            }
            ("flipped", CheckpointError::Image(ManifestError::Checksum { file, .. })) => {
                *file == pages_name.to_string_lossy()
            }
            ("unsealed", CheckpointError::Image(ManifestError::Unsealed { .. })) => true,
            _ => false,
        };
        ensure!(ok, "{what}: unexpected error {e:?}");
        // Nothing was started.
        ensure!(
            !backup_root.join(new_id).exists(),
            "{what}: runc state exists for {new_id}"
        );
        let pids = netns_pids(svc_b.netns());
        ensure!(pids.is_empty(), "{what}: processes in svc-b: {pids:?}");
    }

    // The intact copy restores with the same bundle (so the refusals were the images' doing).
    let mut report = rt
        .block_on(backup_ckpt.restore(new_id, &bundle, &good, RestoreOptions::default()))
        .context("restore of the intact image")?;
    let mut restored = Restored::new(&backup_root, new_id, &mut report);
    ensure!(
        alive(report.pid),
        "restored init {} not running",
        report.pid
    );
    ensure!(
        netns_pids(svc_b.netns()).contains(&report.pid),
        "the restored redis is not in svc-b"
    );
    restored.kill_and_delete()?;

    // A container whose standard streams are containerd's FIFOs cannot be dumped: CRIU cannot
    // find their mount in the container. The error carries CRIU's own words, and the container
    // keeps running.
    let mut args = vec!["run", "-d", "--runtime", RRC_RUNTIME];
    let net = primary.ctr_run_args_net();
    args.extend(net.iter().map(String::as_str));
    let redis = image("redis");
    args.extend([redis.as_str(), "fifo1"]);
    primary.ctr_ok(&args)?;
    let pip = primary.ip().to_string();
    wait_for(Duration::from_secs(20), || {
        ensure!(redis_ok(client, &pip, &["PING"])? == "PONG", "no PONG");
        Ok(())
    })?;
    let failed_dir = images.join("fifo1");
    let e = rt
        .block_on(ckpt.dump("fifo1", &failed_dir, &DumpOptions::default()))
        .expect_err("a dump of a container with FIFO stdio");
    eprintln!("[refuse] FIFO stdio: {e}");
    ensure!(matches!(e, CheckpointError::DumpFailed { .. }), "{e:?}");
    let text = e.to_string();
    ensure!(
        text.contains("Can't lookup mount"),
        "CRIU's error is missing: {text}"
    );
    ensure!(
        redis_ok(client, &pip, &["PING"])? == "PONG",
        "redis died with the failed dump"
    );
    let e = rt
        .block_on(backup_ckpt.restore("fifo1-b", &bundle, &failed_dir, RestoreOptions::default()))
        .expect_err("restore from a failed dump");
    ensure!(
        matches!(e, CheckpointError::Image(ManifestError::Unsealed { .. })),
        "{e}"
    );

    for c in ["fifo1", id] {
        primary.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", c])?;
        wait_for(Duration::from_secs(20), || {
            primary.ctr_ok(&["tasks", "delete", c]).map(|_| ())
        })?;
        primary.ctr_ok(&["containers", "delete", c])?;
    }
    Ok(())
}
