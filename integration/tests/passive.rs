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
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use rrc_integration::checker::{verify, Checker, Report};
use rrc_integration::pair::{
    ip, iptables, kill_shims, status, wait_state, Pair, CONNECTIONS_SETTLE, ID,
};
use rrc_integration::{integration_unavailable, wait_for, Host};
use serde_json::Value;

/// The tests use the same test hosts' names and ports; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Skips (or fails under RRC_REQUIRE_INTEGRATION=1) without a test bed; otherwise takes the
/// serial lock and builds the pair's bed.
fn bed() -> Result<Option<(MutexGuard<'static, ()>, Pair)>> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(None);
    }
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Some((serial, Pair::new()?)))
}

/// Waits for the backup to go live after a primary failure; returns its status.
fn await_takeover(pair: &Pair) -> Result<Value> {
    await_failover(pair.host("backup"), 1)
}

/// Waits until `host`'s status records its `n`th failover, which must have gone live (the state
/// may already have moved on: a new primary with a peer configured waits for its own backup).
fn await_failover(host: &Host, n: usize) -> Result<Value> {
    let st = wait_for(Duration::from_secs(30), || {
        let st = status(host)?;
        let done = st["failovers"].as_array().map(Vec::len).unwrap_or(0);
        ensure!(
            done >= n || st["state"] == "failed",
            "{} is {} with {done} failovers, waiting for failover {n}",
            host.name(),
            st["state"]
        );
        Ok(st)
    })
    .with_context(|| host.containerd_log_tail())?;
    let last = st["failovers"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default();
    ensure!(
        last["outcome"] == "live",
        "failover failed: {} ({})",
        last["outcome"],
        st["detail"]
    );
    Ok(st)
}

/// Lets the checker write to the new primary for a while, stops it, and checks that no
/// connection broke and every acknowledged write is there.
fn finish_checker(pair: &Pair, checker: Checker) -> Result<Report> {
    std::thread::sleep(Duration::from_millis(1500));
    let report = checker.stop();
    let broken = report.broken();
    ensure!(broken.is_empty(), "connections broke: {broken:?}");
    let client = pair.host("client").netns_path();
    let problems = verify(&client, pair.service(), &report)?;
    ensure!(
        problems.is_empty(),
        "acknowledged writes lost: {problems:?}"
    );
    Ok(report)
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
    let st = await_takeover(pair)?;
    let report = finish_checker(pair, checker)?;
    let f = st["failovers"]
        .as_array()
        .and_then(|a| a.last())
        .ok_or_else(|| anyhow!("no failover recorded: {st}"))?;
    let num = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
    Ok(Recovery {
        after,
        detection_ms: num("detection_ms"),
        restore_ms: num("restore_ms"),
        network_ms: num("network_ms"),
        max_stall: report.max_stall(),
        acknowledged: report.acknowledged(),
    })
}

/// A phase of the recovery and how to read it from one injection's figures.
type Phase = (&'static str, fn(&Recovery) -> f64);

/// The campaign's figures as a Markdown table: recovery rate and each phase's distribution.
fn campaign_summary(n: usize, seed: u64, results: &[Recovery], failures: &[String]) -> String {
    fn pct(v: &mut [f64], p: f64) -> f64 {
        v.sort_by(f64::total_cmp);
        let i = ((v.len() as f64 - 1.0) * p).round();
        v.get(i as usize).copied().unwrap_or(f64::NAN)
    }
    let mut out = format!(
        "## Passive failover campaign\n\n{} of {n} injections recovered ({:.1} %), RRC_SEED={seed}; \
         every recovered one with no acknowledged write lost and no connection broken.\n\n\
         | phase (ms) | median | p90 | max |\n|---|---|---|---|\n",
        results.len(),
        100.0 * results.len() as f64 / n.max(1) as f64
    );
    let phases: [Phase; 5] = [
        ("detection", |r| r.detection_ms),
        ("restore", |r| r.restore_ms),
        ("network", |r| r.network_ms),
        ("detection + restore + network", |r| {
            r.detection_ms + r.restore_ms + r.network_ms
        }),
        ("longest client stall", |r| {
            r.max_stall.as_secs_f64() * 1000.0
        }),
    ];
    for (name, f) in phases {
        let mut v: Vec<f64> = results.iter().map(f).collect();
        out.push_str(&format!(
            "| {name} | {:.0} | {:.0} | {:.0} |\n",
            pct(&mut v, 0.5),
            pct(&mut v, 0.9),
            pct(&mut v, 1.0)
        ));
    }
    for f in failures {
        out.push_str(&format!("\nFAILED: {f}\n"));
    }
    out
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
    let Some((_serial, pair)) = bed()? else {
        return Ok(());
    };
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
    let mut failures = Vec::new();
    for (i, after) in delays(n, seed).into_iter().enumerate() {
        match inject(&pair, after) {
            Ok(r) => {
                eprintln!(
                    "injection {i}: killed after {:?}; detection {:.0} ms, restore {:.0} ms, network {:.0} ms; longest client stall {:?}; {} writes acknowledged, none lost",
                    r.after, r.detection_ms, r.restore_ms, r.network_ms, r.max_stall, r.acknowledged
                );
                results.push(r);
            }
            Err(e) => {
                eprintln!("injection {i} (kill after {after:?}) FAILED: {e:#}");
                failures.push(format!("injection {i} (kill after {after:?}): {e:#}"));
            }
        }
        pair.reset()
            .with_context(|| format!("reset after injection {i} (RRC_SEED={seed})"))?;
    }
    let summary = campaign_summary(n, seed, &results, &failures);
    eprintln!("{summary}");
    if let Some(out) = std::env::var_os("RRC_CAMPAIGN_OUT") {
        fs::write(&out, &summary).with_context(|| format!("write {out:?}"))?;
    }
    ensure!(
        failures.is_empty(),
        "{} of {n} injections failed (RRC_SEED={seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn backup_loss_leaves_the_primary_serving_and_it_pairs_again() -> Result<()> {
    let Some((_serial, pair)) = bed()? else {
        return Ok(());
    };
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
    await_takeover(&pair)?;
    let report = finish_checker(&pair, checker)?;
    eprintln!(
        "after backup loss, re-pairing and a primary kill: {} writes acknowledged, none lost, no connection broken",
        report.acknowledged()
    );
    pair.reset()
}

#[test]
fn a_backup_with_another_key_is_refused_and_the_primary_keeps_serving() -> Result<()> {
    let Some((_serial, mut pair)) = bed()? else {
        return Ok(());
    };
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
    let Some((_serial, mut pair)) = bed()? else {
        return Ok(());
    };
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
    await_takeover(&pair)?;
    let report = finish_checker(&pair, checker)?;
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

#[test]
fn a_partitioned_primary_fences_itself_when_the_backup_took_over() -> Result<()> {
    let Some((_serial, pair)) = bed()? else {
        return Ok(());
    };
    pair.start()?;
    let client = pair.host("client");
    let checker = Checker::start(&client.netns_path(), pair.service(), 4);
    std::thread::sleep(CONNECTIONS_SETTLE);

    // Primary and backup can no longer talk; clients still reach both.
    let (primary, backup) = (pair.host("primary"), pair.host("backup"));
    let b = backup.ip().to_string();
    iptables(primary, &["-I", "INPUT", "-s", &b, "-j", "DROP"])?;
    iptables(primary, &["-I", "OUTPUT", "-d", &b, "-j", "DROP"])?;
    let cut = Instant::now();
    await_takeover(&pair)?;
    let st = wait_state(primary, &["fenced"], Duration::from_secs(15))?;
    eprintln!(
        "partition: the old primary fenced itself {:?} after the cut ({})",
        cut.elapsed(),
        st["detail"]
    );
    // It no longer holds the address, and its task has stopped.
    let out = Command::new("ip")
        .args([
            "-n",
            pair.host("svc").netns(),
            "-4",
            "addr",
            "show",
            "dev",
            "eth0",
        ])
        .output()?;
    let addrs = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !addrs.contains(&pair.host("svc").ip().to_string()),
        "the fenced primary still holds the address: {addrs}"
    );
    wait_for(Duration::from_secs(10), || {
        let ls = primary.ctr_ok(&["task", "ls"])?;
        ensure!(ls.contains("STOPPED"), "task still running: {ls}");
        Ok(())
    })?;

    let report = finish_checker(&pair, checker)?;
    eprintln!(
        "partition: {} writes acknowledged, none lost, no connection broken",
        report.acknowledged()
    );
    iptables(primary, &["-F", "INPUT"])?;
    iptables(primary, &["-F", "OUTPUT"])?;
    pair.reset()
}

#[test]
fn the_new_primary_pairs_with_a_new_backup_and_survives_a_second_failure() -> Result<()> {
    let Some((_serial, pair)) = bed()? else {
        return Ok(());
    };
    let (primary, backup) = (pair.host("primary"), pair.host("backup"));
    let (p, b) = (primary.ip(), backup.ip());
    // The backup also names where its own backup will be once it has taken over.
    let args = pair.run_args(
        &[
            "io.containerd.rrc.role=backup".into(),
            format!("io.containerd.rrc.listen={b}:7070"),
            format!("io.containerd.rrc.peer={p}:7070"),
        ],
        pair.host("svcb"),
    );
    backup.ctr_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    pair.start_primary()?;
    wait_state(primary, &["protected"], Duration::from_secs(30))?;
    let client = pair.host("client");
    let checker = Checker::start(&client.netns_path(), pair.service(), 4);
    std::thread::sleep(CONNECTIONS_SETTLE);

    // First failure: the backup takes over, then tries to reach a backup of its own.
    pair.kill_primary()?;
    await_takeover(&pair)?;
    // The primary host comes back with a fresh namespace for the container and a new backup.
    let rm = primary.ctr(&["task", "rm", "-f", ID])?;
    let err = String::from_utf8_lossy(&rm.stderr);
    ensure!(
        rm.status.success() || err.contains("not found"),
        "task rm: {err}"
    );
    primary.ctr_ok(&["container", "rm", ID])?;
    let svc = pair.host("svc").netns();
    for chain in ["INPUT", "OUTPUT"] {
        iptables(pair.host("svc"), &["-F", chain])?;
    }
    ip(&["-n", svc, "addr", "flush", "dev", "eth0"])?;
    ip(&["-n", svc, "link", "set", "eth0", "up"])?;
    let args = pair.run_args(
        &[
            "io.containerd.rrc.role=backup".into(),
            format!("io.containerd.rrc.listen={p}:7070"),
        ],
        pair.host("svc"),
    );
    primary.ctr_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let paired = Instant::now();
    let st = wait_state(backup, &["protected"], Duration::from_secs(30))?;
    eprintln!(
        "the new primary is protected by the new backup {:?} after it started ({} failover on record)",
        paired.elapsed(),
        st["failovers"].as_array().map(Vec::len).unwrap_or(0)
    );
    std::thread::sleep(Duration::from_secs(2));

    // Second failure, on the other host: the address moves back.
    pair.kill_side("backup", "svcb")?;
    await_failover(primary, 1)?;
    let report = finish_checker(&pair, checker)?;
    eprintln!(
        "two failovers, back and forth: {} writes acknowledged over the same connections, none lost, none broken",
        report.acknowledged()
    );
    pair.reset()
}

/// Speaks to the backup shim as a primary would (from the primary host's namespace, with
/// `version` and the pair's key): connects, sends the control message `pair_msg` and the
/// checkpoint `pieces`, and waits up to 5 s for the backup to acknowledge the last piece.
/// Returns whether it did; an error if the connection was refused. With `goodbye` it then says
/// goodbye, so the backup does not take over.
fn play_primary(
    pair: &Pair,
    version: u16,
    pair_msg: &str,
    pieces: &[rrc_checkpoint::Piece],
    goodbye: bool,
) -> Result<bool> {
    let key = fs::read(&pair.key)?;
    let mut cfg = rrc_channel::Config::new(key, ID, rrc_channel::Role::Primary);
    cfg.version = version;
    let addr = format!("{}:7070", pair.host("backup").ip());
    let netns = fs::File::open(pair.host("primary").netns_path())?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<bool> {
            // This thread alone enters the primary host's namespace.
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let ch = rrc_channel::connect(&addr, cfg).await?;
                ch.send(0, pair_msg.as_bytes()).await?;
                let mut last = 0;
                for p in pieces {
                    last = ch.send(1, &p.encode()).await?;
                }
                let acked = tokio::time::timeout(Duration::from_secs(5), ch.wait_acked(last)).await;
                if goodbye {
                    let seq = ch.send(0, br#"{"type":"goodbye","reason":"test"}"#).await?;
                    let _ = tokio::time::timeout(Duration::from_secs(5), ch.wait_acked(seq)).await;
                }
                Ok(matches!(acked, Ok(Ok(()))))
            })
        })
        .join()
        .map_err(|_| anyhow!("the primary's thread panicked"))?
    })
}

#[test]
fn a_backup_refuses_a_wrong_version_and_a_corrupt_checkpoint() -> Result<()> {
    use rrc_checkpoint::Piece;
    let Some((_serial, pair)) = bed()? else {
        return Ok(());
    };
    let backup = pair.host("backup");
    pair.start_backup()?;
    wait_state(backup, &["standby"], Duration::from_secs(20))?;

    let pair_msg = format!(
        r#"{{"type":"pair","addresses":[{{"interface":"eth0","address":"{}","prefix":15}}],"epoch_ms":1000,"instance":7}}"#,
        pair.host("svc").ip()
    );
    let pieces = |digest: [u8; 32]| {
        [
            Piece::Begin { epoch: 1, files: 1 },
            Piece::File {
                name: "pages-1.img".into(),
                size: 3,
            },
            Piece::Chunk(b"abc".to_vec()),
            Piece::End { epoch: 1, digest },
        ]
    };
    // The digest the backup computes: name length, name, size, then the bytes (SHA-256).
    let good = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(11u32.to_le_bytes());
        h.update(b"pages-1.img");
        h.update(3u64.to_le_bytes());
        h.update(b"abc");
        <[u8; 32]>::from(h.finalize())
    };

    // Another protocol version: refused, with the versions named.
    let err = match play_primary(
        &pair,
        rrc_channel::PROTOCOL_VERSION + 1,
        &pair_msg,
        &pieces(good),
        true,
    ) {
        Ok(_) => anyhow::bail!("the backup accepted another protocol version"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("version"),
        "refusal does not name the version: {err}"
    );

    // The right version and key, but a checkpoint whose digest does not match its bytes.
    let acked = play_primary(
        &pair,
        rrc_channel::PROTOCOL_VERSION,
        &pair_msg,
        &pieces([0u8; 32]),
        false,
    )?;
    ensure!(!acked, "the backup acknowledged a corrupt checkpoint");
    // Nothing was committed, so nothing is restored: the backup keeps waiting.
    std::thread::sleep(Duration::from_secs(2));
    let st = status(backup)?;
    ensure!(
        st["state"] == "standby"
            && st["checkpoints"] == 0
            && st["failovers"] == serde_json::json!([]),
        "the backup used a corrupt checkpoint or took over: {st}"
    );
    let log = fs::read_to_string(backup.containerd_log())?;
    ensure!(
        log.contains("version") && log.contains("refused a checkpoint"),
        "the backup's log does not name the refusals"
    );
    // The same checkpoint with its true digest is acknowledged (the refusal above was the
    // digest's doing); the fake primary then says goodbye, so the backup does not take over.
    let acked = play_primary(
        &pair,
        rrc_channel::PROTOCOL_VERSION,
        &pair_msg,
        &pieces(good),
        true,
    )?;
    ensure!(acked, "the backup did not acknowledge an intact checkpoint");
    wait_state(backup, &["standby"], Duration::from_secs(10))?;
    // And a real primary still pairs with it.
    pair.start_primary()?;
    wait_state(
        pair.host("primary"),
        &["protected"],
        Duration::from_secs(30),
    )?;
    eprintln!("wrong version and corrupt checkpoint refused ({err}); a real primary then paired");
    pair.reset()
}
