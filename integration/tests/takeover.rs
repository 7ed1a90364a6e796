//! Moving a service address between test hosts: after the old holder releases it and the new
//! one claims it with gratuitous ARP, a client reaches the new holder at once, its neighbour entry
//! pointing at the new MAC; without the announcement it would still point at the old one.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{ensure, Result};
use rrc_integration::{integration_unavailable, wait_for, Host, KillOnDrop, TestBed};
use rrc_takeover::{announce, claim, release};

const SERVICE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 50);

/// A redis on `host` that answers `GET whoami` with the host's name.
fn redis_named(host: &Host) -> Result<KillOnDrop> {
    let r = host.start_redis(6379)?;
    let out = host
        .command("redis-cli")
        .args(["-h", "127.0.0.1", "SET", "whoami", host.name()])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "OK",
        "SET whoami: {out:?}"
    );
    Ok(r)
}

fn whoami(client: &Host) -> Result<String> {
    let out = client
        .command("timeout")
        .args([
            "2",
            "redis-cli",
            "-h",
            &SERVICE.to_string(),
            "GET",
            "whoami",
        ])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn mac(host: &Host) -> Result<String> {
    let out = host
        .command("cat")
        .arg("/sys/class/net/eth0/address")
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn neighbour(client: &Host) -> Result<String> {
    let out = client
        .command("ip")
        .args(["neigh", "show", &SERVICE.to_string()])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

#[test]
fn claimed_address_moves_clients_at_once() -> Result<()> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(());
    }
    let bed = TestBed::new(&["client", "a", "b"])?;
    let (client, a, b) = (bed.host("client"), bed.host("a"), bed.host("b"));
    let (_ra, _rb) = (redis_named(a)?, redis_named(b)?);
    let (mac_a, mac_b) = (mac(a)?, mac(b)?);
    ensure!(mac_a != mac_b && !mac_a.is_empty(), "MACs {mac_a} {mac_b}");

    claim(&a.netns_path(), "eth0", SERVICE, 15, 1, Duration::ZERO)?;
    ensure!(whoami(client)? == "a", "the service is not on a");
    ensure!(
        neighbour(client)?.contains(&mac_a),
        "{}",
        neighbour(client)?
    );

    // Fence the old holder, move the address without announcing it: the client still sends to
    // a's MAC, and a no longer answers.
    release(&a.netns_path(), "eth0", SERVICE, 15)?;
    release(&a.netns_path(), "eth0", SERVICE, 15)?; // releasing twice is fine
    claim(&b.netns_path(), "eth0", SERVICE, 15, 0, Duration::ZERO)?;
    ensure!(
        neighbour(client)?.contains(&mac_a),
        "{}",
        neighbour(client)?
    );
    ensure!(
        whoami(client)?.is_empty(),
        "a still answers for the service after release"
    );

    // The announcement moves the client over at once.
    announce(
        &b.netns_path(),
        "eth0",
        SERVICE,
        3,
        Duration::from_millis(20),
    )?;
    wait_for(Duration::from_secs(1), || {
        let n = neighbour(client)?;
        ensure!(n.contains(&mac_b), "neighbour entry still {n}");
        Ok(())
    })?;
    ensure!(whoami(client)? == "b", "the service is not on b");
    // Claiming again is idempotent.
    claim(&b.netns_path(), "eth0", SERVICE, 15, 1, Duration::ZERO)?;
    ensure!(whoami(client)? == "b", "a second claim broke the service");
    Ok(())
}
