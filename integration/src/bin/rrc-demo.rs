//! `rrc-demo`: the main job, end to end on this machine.
//!
//! A redis replicated in passive mode survives the kill of its primary while clients watch. Test
//! hosts (network namespaces on one switch): `primary` and `backup`, each with its own
//! containerd running rrc's shim; `svc` and `svcb`, the container's network namespace on each
//! side; `client`. The backup is started first (role backup), then the primary (role primary,
//! peer = the backup); four client connections write (INCR, SET of fresh keys) the whole time.
//! The demo then kills the primary host's side (link cut, shim and container SIGKILLed), the
//! backup restores the last committed checkpoint, takes over the address and goes live, and the
//! same client connections carry on. At the end every acknowledged write is checked.
//!
//! Usage: `rrc-demo [--seconds N]` (how long the clients write before the kill; default 5).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rrc_integration::checker::{verify, Checker};
use rrc_integration::pair::{status, wait_state, Pair, CONNECTIONS_SETTLE, ID};
use rrc_integration::Host;

/// Prints `ctr task ls` of a host.
fn print_tasks(label: &str, host: &Host) -> Result<()> {
    let ls = host.ctr_ok(&["task", "ls"])?;
    println!(
        "[demo] {label} {}",
        ls.trim_end().replace('\n', "\n[demo]   ")
    );
    Ok(())
}

fn main() -> Result<()> {
    let mut seconds = 5u64;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .context("--seconds needs a value")?
                    .parse()
                    .context("--seconds")?
            }
            other => bail!("unknown argument {other}; usage: rrc-demo [--seconds N]"),
        }
    }
    if let Some(why) = rrc_integration::integration_unavailable() {
        bail!("cannot run the demo: {why}");
    }

    println!("[demo] test hosts: client, primary, backup, and the container's network namespace on each side (svc, svcb)");
    let pair = Pair::new()?;
    let (primary, backup) = (pair.host("primary"), pair.host("backup"));
    println!(
        "[demo] backup: ctr run -d --runtime io.containerd.rrc.v2 --annotation io.containerd.rrc.role=backup --annotation io.containerd.rrc.listen={}:7070 --annotation io.containerd.rrc.auth-key-file=KEY --with-ns network:SVCB docker.io/rrc/redis:latest {ID} ...",
        backup.ip()
    );
    pair.start_backup()?;
    println!(
        "[demo] primary: ctr run -d --runtime io.containerd.rrc.v2 --annotation io.containerd.rrc.role=primary --annotation io.containerd.rrc.peer={}:7070 --annotation io.containerd.rrc.auth-key-file=KEY --with-ns network:SVC docker.io/rrc/redis:latest {ID} ...",
        backup.ip()
    );
    pair.start_primary()?;
    let st = wait_state(primary, &["protected"], Duration::from_secs(30))?;
    println!(
        "[demo] primary protected: checkpoint {} committed at the backup",
        st["last_committed_epoch"]
    );
    print_tasks("primary host:", primary)?;
    print_tasks("backup host: ", backup)?;

    let client = pair.host("client");
    let netns = client.netns_path();
    println!(
        "[demo] 4 client connections from {} to {} write (INCR of a counter, SET of fresh keys)",
        client.ip(),
        pair.service()
    );
    let checker = Checker::start(&netns, pair.service(), 4);
    std::thread::sleep(CONNECTIONS_SETTLE);
    for s in 1..=seconds {
        std::thread::sleep(Duration::from_secs(1));
        let st = status(primary)?;
        let c = &st["last_checkpoint"];
        println!(
            "[demo] {s} s: primary {} — checkpoint {} committed, container paused {:.0} ms, {:.1} MB",
            st["state"].as_str().unwrap_or("?"),
            c["epoch"],
            c["frozen_ms"].as_f64().unwrap_or(0.0),
            c["bytes"].as_f64().unwrap_or(0.0) / 1e6
        );
    }
    println!("[demo] KILL: primary's link cut, its shim and redis SIGKILLed");
    pair.kill_primary()?;
    let killed = Instant::now();
    let st = wait_state(backup, &["live", "failed"], Duration::from_secs(30))?;
    ensure!(st["state"] == "live", "failover failed: {}", st["detail"]);
    let f = st["failovers"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default();
    println!(
        "[demo] backup live {:.0?} after the kill: detection {:.0} ms, restore {:.0} ms, network {:.0} ms (checkpoint {})",
        killed.elapsed(),
        f["detection_ms"].as_f64().unwrap_or(0.0),
        f["restore_ms"].as_f64().unwrap_or(0.0),
        f["network_ms"].as_f64().unwrap_or(0.0),
        f["from_epoch"]
    );
    print_tasks("backup host: ", backup)?;
    std::thread::sleep(Duration::from_secs(2));
    let report = checker.stop();
    println!(
        "[demo] {} writes acknowledged over the same 4 connections; longest wait for a reply {:?}",
        report.acknowledged(),
        report.max_stall()
    );
    let broken = report.broken();
    ensure!(broken.is_empty(), "connections broke: {broken:?}");
    let problems = verify(&netns, pair.service(), &report)?;
    if !problems.is_empty() {
        bail!("lost or broken: {problems:#?}");
    }
    println!("[demo] no connection broke, every acknowledged write is there. Tearing down.");
    pair.reset()?;
    drop(pair);
    println!("[demo] done");
    Ok(())
}
