//! The container's network namespace as replication sees it: the service addresses (which move
//! to the backup on failover), the output hold's iptables rule, and the takeover sequence.
//!
//! Commands run through [`super::runner`] (`nsenter --net=PATH ip|iptables ...`), so the shim's
//! reaper cannot steal their exit status.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::runner::run;

/// An IPv4 address of the container's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddr {
    /// The interface it is on.
    pub interface: String,
    /// The address.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
}

fn net_arg(netns: &Path) -> String {
    format!("--net={}", netns.display())
}

/// The IPv4 addresses of every interface but `lo` in `netns`.
pub async fn addresses(netns: &Path) -> Result<Vec<ServiceAddr>, String> {
    let out = run(
        "nsenter",
        &[&net_arg(netns), "ip", "-j", "-4", "addr", "show"],
    )
    .await?;
    parse_addresses(&out)
}

/// Parses `ip -j -4 addr show`.
pub fn parse_addresses(json: &str) -> Result<Vec<ServiceAddr>, String> {
    #[derive(Deserialize)]
    struct Link {
        ifname: String,
        #[serde(default)]
        addr_info: Vec<Info>,
    }
    #[derive(Deserialize)]
    struct Info {
        #[serde(default)]
        family: String,
        local: Option<Ipv4Addr>,
        prefixlen: Option<u8>,
    }
    let links: Vec<Link> =
        serde_json::from_str(json).map_err(|e| format!("cannot read `ip -j addr`: {e}"))?;
    Ok(links
        .into_iter()
        .filter(|l| l.ifname != "lo")
        .flat_map(|l| {
            let ifname = l.ifname;
            l.addr_info.into_iter().filter_map(move |i| {
                (i.family == "inet").then_some(())?;
                Some(ServiceAddr {
                    interface: ifname.clone(),
                    address: i.local?,
                    prefix: i.prefixlen?,
                })
            })
        })
        .collect())
}

/// `iptables -w 5 ARGS...` inside `netns`.
pub async fn iptables(netns: &Path, args: &[String]) -> Result<(), String> {
    let n = net_arg(netns);
    let mut argv: Vec<&str> = vec![n.as_str(), "iptables", "-w", "5"];
    argv.extend(args.iter().map(String::as_str));
    run("nsenter", &argv).await.map(|_| ())
}

/// The rules that drop everything entering and leaving the namespace while a failover restores
/// the container: no packet may reach the address before its sockets exist (the kernel would
/// reset the clients' connections), and nothing a leftover socket sends may leave.
fn isolation_rules() -> [Vec<String>; 2] {
    ["INPUT", "OUTPUT"].map(|chain| {
        [
            chain,
            "-j",
            "DROP",
            "-m",
            "comment",
            "--comment",
            "rrc-failover",
        ]
        .map(String::from)
        .to_vec()
    })
}

/// Applies `op` (`-I` or `-D`) to every rule in one `iptables-restore --noflush` run.
async fn restore_rules(netns: &Path, op: &str, rules: &[Vec<String>]) -> Result<(), String> {
    let mut script = String::from("*filter\n");
    for r in rules {
        script.push_str(&format!("{op} {}\n", r.join(" ")));
    }
    script.push_str("COMMIT\n");
    let mut cmd = tokio::process::Command::new("nsenter");
    cmd.args([
        net_arg(netns).as_str(),
        "iptables-restore",
        "-w",
        "5",
        "--noflush",
    ])
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    super::runner::run_with_input(cmd, script.as_bytes()).await
}

/// Drops every packet entering or leaving `netns` (see [`allow_inbound`]).
pub async fn drop_inbound(netns: &Path) -> Result<(), String> {
    restore_rules(netns, "-I", &isolation_rules()).await
}

/// Lifts [`drop_inbound`].
pub async fn allow_inbound(netns: &Path) -> Result<(), String> {
    restore_rules(netns, "-D", &isolation_rules()).await
}

/// The rules of `netns`'s filter table (`iptables -S`), one per line.
pub async fn list_rules(netns: &Path) -> Result<String, String> {
    run("nsenter", &[&net_arg(netns), "iptables", "-w", "5", "-S"]).await
}

/// Deletes every instance of `rule` (without `-A`/`-D`) from `netns`, if `listing` (from
/// [`list_rules`]) shows one; returns how many.
pub async fn delete_all(netns: &Path, rule: &[String], listing: &str) -> usize {
    let chain = rule.first().map(String::as_str).unwrap_or_default();
    let queue = rule.last().map(String::as_str).unwrap_or_default();
    let present = listing.lines().any(|l| {
        l.starts_with(&format!("-A {chain} ")) && l.contains("NFQUEUE") && l.ends_with(queue)
    });
    if !present {
        return 0;
    }
    let mut del = vec!["-D".to_string()];
    del.extend(rule.iter().cloned());
    let mut n = 0;
    while iptables(netns, &del).await.is_ok() {
        n += 1;
    }
    n
}

/// Destroys every TCP socket left in `netns` (`ss -K`): sockets of a container that was killed
/// there (a fenced primary's, or one whose shim died) keep the clients' 4-tuples, and a restore
/// of the same connections then fails ("Cannot assign requested address"). Only for a
/// namespace no live process of the container uses, and while [`drop_inbound`] isolates it
/// (a destroyed socket sends a reset).
pub async fn destroy_leftover_sockets(netns: &Path) -> Result<(), String> {
    run("nsenter", &[&net_arg(netns), "ss", "-K", "-t", "-a"])
        .await
        .map(|_| ())
}

/// Puts `addrs` on their interfaces in `netns` (interfaces up), before the restore.
pub async fn assign(netns: &Path, addrs: &[ServiceAddr]) -> Result<(), String> {
    let n = net_arg(netns);
    for a in addrs {
        let cidr = format!("{}/{}", a.address, a.prefix);
        run(
            "nsenter",
            &[&n, "ip", "addr", "replace", &cidr, "dev", &a.interface],
        )
        .await?;
        run("nsenter", &[&n, "ip", "link", "set", &a.interface, "up"]).await?;
    }
    Ok(())
}

/// Gratuitous ARP for each address, so the network sends its traffic here: one announcement
/// now (returned once sent), two more 20 ms apart in the background (a lost frame).
pub async fn announce(netns: &Path, addrs: &[ServiceAddr]) -> Result<(), String> {
    let send = |netns: PathBuf, addrs: Vec<ServiceAddr>, count: u32| {
        tokio::task::spawn_blocking(move || {
            for a in &addrs {
                rrc_takeover::announce(
                    &netns,
                    &a.interface,
                    a.address,
                    count,
                    Duration::from_millis(20),
                )
                .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        })
    };
    let first = send(netns.to_path_buf(), addrs.to_vec(), 1).await;
    let again = send(netns.to_path_buf(), addrs.to_vec(), 2);
    tokio::spawn(async move {
        if let Ok(Err(e)) = again.await {
            tracing::warn!("repeating the gratuitous ARP: {e}");
        }
    });
    first.map_err(|e| format!("announce task: {e}"))?
}

/// Removes `addrs` from `netns`: a fenced primary stops answering for them.
pub async fn unassign(netns: &Path, addrs: &[ServiceAddr]) -> Result<(), String> {
    let n = net_arg(netns);
    for a in addrs {
        let cidr = format!("{}/{}", a.address, a.prefix);
        if let Err(e) = run(
            "nsenter",
            &[&n, "ip", "addr", "del", &cidr, "dev", &a.interface],
        )
        .await
        {
            if !e.contains("Cannot assign requested address") && !e.contains("not found") {
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ip_json() {
        let json = r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
            {"ifindex":2,"ifname":"eth0","addr_info":[{"family":"inet","local":"198.18.0.13","prefixlen":15,"scope":"global"}]},
            {"ifindex":3,"ifname":"eth1","addr_info":[]}]"#;
        let a = parse_addresses(json).expect("parses");
        assert_eq!(
            a,
            vec![ServiceAddr {
                interface: "eth0".into(),
                address: Ipv4Addr::new(198, 18, 0, 13),
                prefix: 15
            }]
        );
        assert!(parse_addresses("not json").is_err());
    }
}
