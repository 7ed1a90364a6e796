//! `rrc-demo`: the main job, end to end on this machine.
//!
//! Today (mode `off`): two test hosts, `primary` (its own containerd) and `client`. A redis runs
//! under `--runtime io.containerd.rrc.v2` on `primary`; a client on the other host writes a stream
//! of acknowledged `INCR`s over one kept-open connection and checks the counter at the end. When
//! the replicated modes land, this grows a `backup` host and kills the primary mid-stream.
//!
//! Usage: `rrc-demo [--seconds N]`.

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rrc_integration::{wait_for, TestBed};

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

    println!("[demo] creating test hosts: primary, client (network namespaces on 198.18.0.0/15)");
    let mut bed = TestBed::new(&["primary", "client"])?;
    bed.host_mut("primary").start_containerd("")?;
    let primary = bed.host("primary");
    let ip = primary.ip().to_string();
    println!(
        "[demo] primary {} runs its own containerd; client {}",
        ip,
        bed.host("client").ip()
    );
    let netns = format!("network:/var/run/netns/{}", primary.netns());
    primary.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.rrc.v2",
        "--with-ns",
        &netns,
        "docker.io/rrc/redis:latest",
        "demo-redis",
    ])?;
    println!("[demo] redis started with: ctr run -d --runtime io.containerd.rrc.v2 docker.io/rrc/redis:latest demo-redis");
    println!("{}", primary.ctr_ok(&["tasks", "ls"])?.trim_end());

    wait_for(Duration::from_secs(20), || {
        let out = bed
            .host("client")
            .command("redis-cli")
            .args(["-h", &ip, "PING"])
            .output()?;
        anyhow::ensure!(
            String::from_utf8_lossy(&out.stdout).trim() == "PONG",
            "no PONG"
        );
        Ok(())
    })
    .context("redis never answered the client")?;
    println!("[demo] client got PONG from {ip}:6379");

    let acked = stream_incrs(&bed, &ip, Duration::from_secs(seconds))?;
    let out = bed
        .host("client")
        .command("redis-cli")
        .args(["-h", &ip, "GET", "demo:counter"])
        .output()?;
    let value: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("reading the counter back")?;
    println!("[demo] {acked} INCRs acknowledged over one connection; counter reads {value}");
    if value != acked {
        bail!("counter {value} != acknowledged writes {acked}");
    }
    println!("[demo] every acknowledged write is there. Tearing down.");
    drop(bed);
    println!("[demo] done");
    Ok(())
}

/// Sends INCRs over one connection from the client host for `duration`; returns how many were
/// acknowledged.
fn stream_incrs(bed: &TestBed, ip: &str, duration: Duration) -> Result<u64> {
    let mut child = bed.host("client").open_tcp_relay(ip, 6379)?;
    let mut to = child.stdin.take().context("client stdin")?;
    let mut from = BufReader::new(child.stdout.take().context("client stdout")?);
    let start = Instant::now();
    let mut acked = 0u64;
    let mut last_report = Instant::now();
    let mut line = String::new();
    while start.elapsed() < duration {
        to.write_all(b"INCR demo:counter\r\n")?;
        to.flush()?;
        line.clear();
        from.read_line(&mut line)?;
        let n: u64 = line
            .trim()
            .strip_prefix(':')
            .with_context(|| format!("unexpected reply {line:?}"))?
            .parse()?;
        acked += 1;
        anyhow::ensure!(n == acked, "counter jumped: got {n}, expected {acked}");
        if last_report.elapsed() > Duration::from_secs(1) {
            println!("[demo] {acked} acknowledged INCRs");
            last_report = Instant::now();
        }
    }
    drop(to);
    let _ = child.kill();
    let _ = child.wait();
    Ok(acked)
}
