//! A redis server under `io.containerd.rrc.v2` on one test host, used over the bed's network from
//! another: the shim's containers serve real clients.
//!
//! Run as root: `cargo build && cargo test -p rrc-integration --test redis`.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rrc_integration::{
    image, integration_unavailable, mounts_under, output_with_timeout, wait_for, Host, TestBed,
    RRC_RUNTIME,
};

/// `redis-cli -h IP args...` from `client`, with a timeout.
fn redis_cli(client: &Host, ip: &str, args: &[&str]) -> Result<Output> {
    let mut c = client.command("redis-cli");
    c.args(["-h", ip]).args(args).stdin(Stdio::null());
    output_with_timeout(&mut c, Duration::from_secs(20))
}

/// `redis-cli` that must succeed; returns its trimmed reply.
fn redis_ok(client: &Host, ip: &str, args: &[&str]) -> Result<String> {
    let out = redis_cli(client, ip, args)?;
    let reply = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.status.success() && !reply.starts_with("ERR") && !reply.contains("Could not connect"),
        "redis-cli {}: {} / {}",
        args.join(" "),
        reply,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(reply)
}

#[test]
fn redis_serves_a_client_on_another_host() -> Result<()> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(());
    }
    let mut bed = TestBed::new(&["client", "server"])?;
    bed.host_mut("server").start_containerd("")?;
    let server = bed.host("server");
    let client = bed.host("client");
    let ip = server.ip().to_string();
    let log = || server.containerd_log_tail();

    let redis = image("redis");
    let net = server.ctr_run_args_net();
    let mut args = vec!["run", "-d", "--runtime", RRC_RUNTIME];
    args.extend(net.iter().map(String::as_str));
    args.extend([redis.as_str(), "redis1"]);
    server.ctr_ok(&args)?;

    let start = Instant::now();
    wait_for(Duration::from_secs(20), || {
        let reply = redis_ok(client, &ip, &["PING"])?;
        ensure!(reply == "PONG", "PING: {reply}");
        Ok(())
    })
    .with_context(|| format!("redis on {ip} never answered the client\n{}", log()))?;
    eprintln!("redis answered after {:?}", start.elapsed());

    ensure!(redis_ok(client, &ip, &["SET", "k", "v"])? == "OK", "SET");
    let got = redis_ok(client, &ip, &["GET", "k"])?;
    ensure!(got == "v", "GET k: {got:?}");

    for i in 1..=100u32 {
        let reply = redis_ok(client, &ip, &["INCR", "counter"])?;
        ensure!(reply == i.to_string(), "INCR #{i} replied {reply:?}");
    }
    let got = redis_ok(client, &ip, &["GET", "counter"])?;
    ensure!(got == "100", "counter: {got:?}");

    let mut c = client.command("redis-benchmark");
    c.args(["-h", &ip, "-n", "2000", "-q", "-t", "set,get"])
        .stdin(Stdio::null());
    let out = output_with_timeout(&mut c, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("SET") && stdout.contains("GET"),
        "redis-benchmark: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for l in stdout.lines().filter(|l| l.contains("requests per second")) {
        eprintln!("redis-benchmark: {}", l.trim());
    }

    // The server process is a child of rrc's shim, in the server host's network namespace.
    let tasks = server.ctr_ok(&["tasks", "ls"])?;
    ensure!(
        tasks
            .lines()
            .any(|l| l.starts_with("redis1 ") && l.contains("RUNNING")),
        "tasks: {tasks}"
    );

    server.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "redis1"])?;
    wait_for(Duration::from_secs(20), || {
        server.ctr_ok(&["tasks", "delete", "redis1"]).map(|_| ())
    })?;
    server.ctr_ok(&["containers", "delete", "redis1"])?;
    let mounts = mounts_under(&server.bundle_dir("redis1"));
    ensure!(mounts.is_empty(), "still mounted: {mounts:?}");
    let out = redis_cli(client, &ip, &["PING"])?;
    ensure!(
        !String::from_utf8_lossy(&out.stdout).contains("PONG"),
        "redis still answers after its container was deleted"
    );
    Ok(())
}
