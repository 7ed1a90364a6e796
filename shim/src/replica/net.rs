//! The container's network namespace as replication sees it: the service addresses (which move
//! to the backup on failover), the output hold's iptables rule, and the takeover sequence.
//!
//! Commands run through [`super::runner`] (`nsenter --net=PATH ip|iptables ...`), so the shim's
//! reaper cannot steal their exit status.

use std::net::Ipv4Addr;
use std::path::Path;
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

/// The rule that drops everything arriving in the namespace while a failover restores the
/// container (no packet may reach the address before its sockets exist: the kernel would reset
/// the clients' connections).
fn drop_inbound_rule() -> Vec<String> {
    [
        "INPUT",
        "-j",
        "DROP",
        "-m",
        "comment",
        "--comment",
        "rrc-failover",
    ]
    .map(String::from)
    .to_vec()
}

/// Drops every inbound packet in `netns` (see [`allow_inbound`]).
pub async fn drop_inbound(netns: &Path) -> Result<(), String> {
    let mut args = vec!["-I".to_string()];
    args.extend(drop_inbound_rule());
    iptables(netns, &args).await
}

/// Lifts [`drop_inbound`].
pub async fn allow_inbound(netns: &Path) -> Result<(), String> {
    let mut args = vec!["-D".to_string()];
    args.extend(drop_inbound_rule());
    iptables(netns, &args).await
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

/// Gratuitous ARP for each address, so the network sends its traffic here.
pub async fn announce(netns: &Path, addrs: &[ServiceAddr]) -> Result<(), String> {
    let (netns, addrs) = (netns.to_path_buf(), addrs.to_vec());
    tokio::task::spawn_blocking(move || {
        for a in &addrs {
            rrc_takeover::announce(
                &netns,
                &a.interface,
                a.address,
                3,
                Duration::from_millis(20),
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
    .await
    .map_err(|e| format!("announce task: {e}"))?
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
