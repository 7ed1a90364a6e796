//! `rrc-demo`: the main job, end to end on this machine.
//!
//! Today (mode `off`): two test hosts, `primary` (its own containerd) and `client`. A redis runs
//! under `--runtime io.containerd.rrc.v2` on `primary`; the checker client on the other host
//! writes over kept-open connections and then verifies every acknowledged write. When
//! the replicated modes land, this grows a `backup` host and kills the primary mid-stream.
//!
//! Usage: `rrc-demo [--seconds N]`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use rrc_integration::checker::{verify, Checker};
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

    let addr = std::net::SocketAddr::new(primary.ip().into(), 6379);
    let netns = bed.host("client").netns_path();
    println!(
        "[demo] 4 client connections write for {seconds} s (INCR of a counter, SET of fresh keys)"
    );
    let checker = Checker::start(&netns, addr, 4);
    for s in 1..=seconds {
        std::thread::sleep(Duration::from_secs(1));
        println!("[demo] {s} s");
    }
    let report = checker.stop();
    println!(
        "[demo] {} writes acknowledged; longest stall {:?}",
        report.acknowledged(),
        report.max_stall()
    );
    let problems = verify(&netns, addr, &report)?;
    if !problems.is_empty() {
        bail!("lost or broken: {problems:#?}");
    }
    println!("[demo] every acknowledged write is there. Tearing down.");
    drop(bed);
    println!("[demo] done");
    Ok(())
}
