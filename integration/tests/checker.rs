//! The redis checker must see a healthy server as healthy, and must catch lost writes and broken
//! connections: it is the witness the failover tests rely on.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use rrc_integration::checker::{verify, Checker};
use rrc_integration::{integration_unavailable, TestBed};

#[test]
fn checker_passes_a_healthy_server_and_catches_loss_and_resets() -> Result<()> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(());
    }
    let bed = TestBed::new(&["client", "server"])?;
    let (client, server) = (bed.host("client"), bed.host("server"));
    let redis = server.start_redis(6379)?;
    let addr = SocketAddr::new(server.ip().into(), 6379);
    let netns = client.netns_path();

    // Healthy: every acknowledged write is there, no connection broke.
    let checker = Checker::start(&netns, addr, 4);
    std::thread::sleep(Duration::from_millis(800));
    let report = checker.stop();
    ensure!(report.acknowledged() > 100, "too few writes: {report:?}");
    let problems = verify(&netns, addr, &report)?;
    ensure!(problems.is_empty(), "healthy server reported: {problems:?}");

    // Lost writes: the server forgets them.
    let out = client
        .command("redis-cli")
        .args(["-h", &server.ip().to_string(), "FLUSHALL"])
        .output()?;
    ensure!(out.status.success(), "FLUSHALL: {out:?}");
    let problems = verify(&netns, addr, &report)?;
    ensure!(
        problems.len() >= 4 && problems.iter().any(|p| p.contains("missing")),
        "lost writes not caught: {problems:?}"
    );
    ensure!(
        problems.iter().any(|p| p.contains("counter is 0")),
        "lost counters not caught: {problems:?}"
    );

    // Broken connections: the server dies under the writers.
    let checker = Checker::start(&netns, addr, 2);
    std::thread::sleep(Duration::from_millis(300));
    drop(redis);
    std::thread::sleep(Duration::from_millis(300));
    let report = checker.stop();
    let broken = report.broken();
    ensure!(broken.len() == 2, "resets not caught: {report:?}");
    eprintln!(
        "checker: {} acknowledged writes, broken as expected: {broken:?}",
        report.acknowledged()
    );
    Ok(())
}
