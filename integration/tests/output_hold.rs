//! The output hold on a real network namespace: replies of a redis on one test host to a client
//! on another wait in the NFQUEUE until released, in order, and flow freely when released all.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rrc_integration::{integration_unavailable, Host, TestBed};
use rrc_output_hold::OutputHold;

/// A kept-open TCP connection from the client host, one reply line at a time.
struct Conn {
    child: Child,
    to: ChildStdin,
    replies: Receiver<String>,
}

impl Conn {
    fn open(client: &Host, ip: &str, port: u16) -> Result<Conn> {
        let mut child = client.open_tcp_relay(ip, port)?;
        let to = child.stdin.take().context("stdin")?;
        let from = child.stdout.take().context("stdout")?;
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { return };
                if tx.send(line.trim().to_string()).is_err() {
                    return;
                }
            }
        });
        Ok(Conn { child, to, replies })
    }

    fn send(&mut self, cmd: &str) -> Result<()> {
        self.to.write_all(format!("{cmd}\r\n").as_bytes())?;
        self.to.flush()?;
        Ok(())
    }

    fn reply(&self, within: Duration) -> Option<String> {
        self.replies.recv_timeout(within).ok()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn round_trips(conn: &mut Conn, n: usize) -> Result<Vec<f64>> {
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        conn.send("PING")?;
        let r = conn.reply(Duration::from_secs(2)).context("reply")?;
        ensure!(r == "+PONG", "unexpected {r:?}");
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(rtts)
}

#[test]
fn replies_wait_for_release_in_order() -> Result<()> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(());
    }
    let bed = TestBed::new(&["client", "server"])?;
    let (client, server) = (bed.host("client"), bed.host("server"));
    let ip = server.ip().to_string();
    let _redis = server.start_redis(6379)?;
    let mut conn = Conn::open(client, &ip, 6379)?;
    let mut plain = round_trips(&mut conn, 200)?;

    let hold = OutputHold::start(&server.netns_path(), None, 7)?;
    hold.set_tag(1);
    conn.send("INCR c")?;
    ensure!(
        conn.reply(Duration::from_millis(500)).is_none(),
        "reply escaped the hold"
    );
    ensure!(hold.held() >= 1, "nothing held: {} queued", hold.queued());
    let t = Instant::now();
    hold.release_upto(1);
    let r = conn
        .reply(Duration::from_secs(3))
        .context("released reply")?;
    let release_latency = t.elapsed();
    ensure!(r == ":1", "got {r:?}");

    // A later tag waits for its own release, not an earlier one.
    hold.set_tag(2);
    conn.send("INCR c")?;
    hold.release_upto(1);
    ensure!(
        conn.reply(Duration::from_millis(400)).is_none(),
        "tag 2 released by release(1)"
    );
    hold.release_upto(2);
    let r = conn.reply(Duration::from_secs(3)).context("second reply")?;
    ensure!(r == ":2", "got {r:?}");

    // Several replies held across tags come out in order.
    for tag in [3u64, 3, 4, 5] {
        hold.set_tag(tag);
        conn.send("INCR c")?;
        // Let each reply reach the queue under its own tag.
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        conn.reply(Duration::from_millis(300)).is_none(),
        "held replies escaped"
    );
    hold.release_upto(5);
    for want in [":3", ":4", ":5", ":6"] {
        let r = conn
            .reply(Duration::from_secs(3))
            .context("ordered reply")?;
        ensure!(r == want, "got {r:?}, wanted {want}");
    }

    // Unprotected: everything flows.
    hold.release_all();
    let mut held = round_trips(&mut conn, 200)?;
    let (queued, released) = (hold.queued(), hold.released());
    ensure!(queued == released, "{queued} queued, {released} released");
    hold.stop()?;
    let rules = std::process::Command::new("nsenter")
        .arg(format!("--net={}", server.netns_path().display()))
        .args(["iptables", "-S", "OUTPUT"])
        .output()?;
    ensure!(
        !String::from_utf8_lossy(&rules.stdout).contains("NFQUEUE"),
        "rule left behind: {}",
        String::from_utf8_lossy(&rules.stdout)
    );
    eprintln!(
        "output hold: release-to-reply {:?}; PING round trip median {:.0} µs plain, {:.0} µs through the queue (released all)",
        release_latency,
        median(&mut plain),
        median(&mut held)
    );
    Ok(())
}
