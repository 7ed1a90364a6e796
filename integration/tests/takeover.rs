//! Moving a service address between test hosts: after the old holder releases it and the new
//! one claims it with gratuitous ARP, a client reaches the new holder at once, its neighbour entry
//! pointing at the new MAC; without the announcement it would still point at the old one. And an
//! ARP probe finds out who else holds an address: another host, never the prober itself.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use rrc_integration::{integration_unavailable, wait_for, Host, KillOnDrop, TestBed};
use rrc_takeover::{announce, claim, probe, release};

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

/// `mac` as `/sys/class/net/*/address` writes it.
fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Probes from `host`'s eth0 for `addr` (3 tries, 50 ms apart) and prints how long it took.
fn probe_from(host: &Host, addr: Ipv4Addr) -> Result<Option<String>> {
    let start = Instant::now();
    let found = probe(
        &host.netns_path(),
        "eth0",
        addr,
        3,
        Duration::from_millis(50),
    )?;
    let found = found.map(mac_text);
    eprintln!(
        "probe from {} for {addr}: {found:?} in {:?}",
        host.name(),
        start.elapsed()
    );
    Ok(found)
}

#[test]
fn probe_finds_other_holders_only() -> Result<()> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(());
    }
    let bed = TestBed::new(&["a", "b", "c"])?;
    let (a, b, c) = (bed.host("a"), bed.host("b"), bed.host("c"));
    let (mac_a, mac_b, mac_c) = (mac(a)?, mac(b)?, mac(c)?);
    ensure!(
        mac_a != mac_b && mac_a != mac_c && mac_b != mac_c && !mac_a.is_empty(),
        "MACs {mac_a} {mac_b} {mac_c}"
    );

    let found = probe_from(a, b.ip())?;
    ensure!(
        found.as_ref() == Some(&mac_b),
        "b's address: {found:?}, b is {mac_b}"
    );
    let unused = Ipv4Addr::new(198, 18, 0, 99);
    let found = probe_from(a, unused)?;
    ensure!(found.is_none(), "unused address held by {found:?}");
    // a holds its own address, but a does not count.
    let found = probe_from(a, a.ip())?;
    ensure!(
        found.is_none(),
        "a's own address held by {found:?}, a is {mac_a}"
    );

    // c takes a's address too (as a backup that took over would): now a finds c.
    let out = Command::new("ip")
        .args(["-n", c.netns(), "addr", "add"])
        .arg(format!("{}/15", a.ip()))
        .args(["dev", "eth0"])
        .output()?;
    ensure!(out.status.success(), "add a's address to c: {out:?}");
    let found = probe_from(a, a.ip())?;
    ensure!(
        found.as_ref() == Some(&mac_c),
        "a's address: {found:?}, c is {mac_c}"
    );
    Ok(())
}
