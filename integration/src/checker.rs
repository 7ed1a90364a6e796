//! A redis checker client: the witness of "nothing lost, no connection broken".
//!
//! It opens N TCP connections from a test host (each in its own thread, which enters the host's
//! network namespace), keeps them open, and on each issues a stream of writes: `INCR` of the
//! connection's counter and `SET` of a key unique to that write. It records every acknowledged
//! write and never reconnects: a reset or closed connection is an error. [`Checker::stop`]
//! returns what was acknowledged; [`verify`] then reads the server back over a fresh
//! connection and reports every acknowledged write that is missing, every counter that is not
//! exactly what was acknowledged, and every connection that broke.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What one connection saw.
#[derive(Debug, Clone, Default)]
pub struct ConnReport {
    /// Connection number.
    pub conn: usize,
    /// Acknowledged INCRs of this connection's counter (= the counter's last acknowledged value).
    pub incrs: u64,
    /// Acknowledged SETs: key i holds value i for i in 0..sets.
    pub sets: u64,
    /// A request was sent and its reply never came (the connection broke in between).
    pub in_flight: bool,
    /// Longest time between two replies.
    pub max_stall: Duration,
    /// Why the connection stopped early, if it did.
    pub error: Option<String>,
    /// Every byte this connection sent, in order (what the server must have received: the
    /// hybrid-mode tests compare it with the recorded log).
    pub sent: Vec<u8>,
}

/// Everything the checker saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Per connection.
    pub conns: Vec<ConnReport>,
}

impl Report {
    /// Acknowledged writes in all.
    pub fn acknowledged(&self) -> u64 {
        self.conns.iter().map(|c| c.incrs + c.sets).sum()
    }

    /// Longest stall any connection saw.
    pub fn max_stall(&self) -> Duration {
        self.conns
            .iter()
            .map(|c| c.max_stall)
            .max()
            .unwrap_or_default()
    }

    /// Connections that broke (reset, closed, wrong reply).
    pub fn broken(&self) -> Vec<String> {
        self.conns
            .iter()
            .filter_map(|c| {
                c.error
                    .as_ref()
                    .map(|e| format!("connection {}: {e}", c.conn))
            })
            .collect()
    }
}

/// A running checker.
pub struct Checker {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<ConnReport>>,
}

fn counter_key(conn: usize) -> String {
    format!("rrc:check:{conn}:counter")
}

fn set_key(conn: usize, i: u64) -> String {
    format!("rrc:check:{conn}:key:{i}")
}

/// A TCP connection made from inside a network namespace: this thread enters it, so the socket
/// belongs to it for good.
pub fn connect_in(netns: &Path, addr: SocketAddr) -> Result<TcpStream> {
    let ns = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    // SAFETY: setns with a valid netns descriptor; it moves only the calling thread, which is a
    // thread of our own that only does this connection's work.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "enter {}: {}",
            netns.display(),
            std::io::Error::last_os_error()
        );
    }
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends one command (appending its bytes to `sent`) and reads its one-line reply.
fn call(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    cmd: &[&str],
    sent: &mut Vec<u8>,
) -> Result<String> {
    let mut req = format!("*{}\r\n", cmd.len());
    for a in cmd {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(req.as_bytes()).context("send")?;
    sent.extend_from_slice(req.as_bytes());
    let mut line = String::new();
    let n = reader.read_line(&mut line).context("receive")?;
    if n == 0 {
        bail!("the server closed the connection");
    }
    Ok(line.trim_end().to_string())
}

fn run_conn(netns: PathBuf, addr: SocketAddr, conn: usize, stop: Arc<AtomicBool>) -> ConnReport {
    let mut r = ConnReport {
        conn,
        ..Default::default()
    };
    let mut stream = match connect_in(&netns, addr) {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(format!("{e:#}"));
            return r;
        }
    };
    let mut reader = match stream.try_clone() {
        Ok(s) => BufReader::new(s),
        Err(e) => {
            r.error = Some(e.to_string());
            return r;
        }
    };
    let counter = counter_key(conn);
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Alternate: an INCR, then a SET of a fresh key.
        let incr = r.incrs <= r.sets;
        let key = set_key(conn, r.sets);
        let value = r.sets.to_string();
        r.in_flight = true;
        let reply = if incr {
            call(&mut stream, &mut reader, &["INCR", &counter], &mut r.sent)
        } else {
            call(
                &mut stream,
                &mut reader,
                &["SET", &key, &value],
                &mut r.sent,
            )
        };
        let reply = match reply {
            Ok(line) => line,
            Err(e) => {
                r.error = Some(format!("{e:#}"));
                return r;
            }
        };
        r.in_flight = false;
        let now = Instant::now();
        r.max_stall = r.max_stall.max(now - last);
        last = now;
        if incr {
            if reply != format!(":{}", r.incrs + 1) {
                r.error = Some(format!(
                    "INCR answered {reply:?} after {} acknowledged INCRs",
                    r.incrs
                ));
                return r;
            }
            r.incrs += 1;
        } else {
            if reply != "+OK" {
                r.error = Some(format!("SET answered {reply:?}"));
                return r;
            }
            r.sets += 1;
        }
    }
    r
}

impl Checker {
    /// Starts `connections` connections from the host whose network namespace is `netns` to
    /// redis at `addr`.
    pub fn start(netns: &Path, addr: SocketAddr, connections: usize) -> Checker {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..connections)
            .map(|conn| {
                let (netns, stop) = (netns.to_path_buf(), stop.clone());
                std::thread::spawn(move || run_conn(netns, addr, conn, stop))
            })
            .collect();
        Checker { stop, threads }
    }

    /// Stops the writers (each finishes its request in flight) and returns what they saw.
    pub fn stop(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let conns = self
            .threads
            .into_iter()
            .enumerate()
            .map(|(conn, t)| {
                t.join().unwrap_or_else(|_| ConnReport {
                    conn,
                    error: Some("checker thread panicked".into()),
                    ..Default::default()
                })
            })
            .collect();
        Report { conns }
    }
}

/// Reads the server back over a fresh connection from `netns` and lists every problem: broken
/// connections, counters that differ from what was acknowledged (one more is allowed when a
/// request was in flight as its connection broke), acknowledged keys missing or wrong.
pub fn verify(netns: &Path, addr: SocketAddr, report: &Report) -> Result<Vec<String>> {
    let (netns, report) = (netns.to_path_buf(), report.clone());
    // A thread of our own: it enters the client's network namespace.
    std::thread::spawn(move || -> Result<Vec<String>> {
        let mut problems = report.broken();
        let mut stream = connect_in(&netns, addr)?;
        let mut reader = BufReader::new(stream.try_clone()?);
        for c in &report.conns {
            let got = call(&mut stream, &mut reader, &["GET", &counter_key(c.conn)], &mut Vec::new())?;
            let value = if got == "$-1" {
                0
            } else {
                let mut v = String::new();
                reader.read_line(&mut v)?;
                v.trim().parse::<u64>().unwrap_or(u64::MAX)
            };
            let extra = u64::from(c.in_flight && c.incrs <= c.sets);
            if value < c.incrs || value > c.incrs + extra {
                problems.push(format!(
                    "connection {}: counter is {value}, {} INCRs were acknowledged",
                    c.conn, c.incrs
                ));
            }
            let (mut missing, mut wrong, mut first) = (0u64, 0u64, None);
            for chunk_start in (0..c.sets).step_by(500) {
                let keys: Vec<String> = (chunk_start..c.sets.min(chunk_start + 500))
                    .map(|i| set_key(c.conn, i))
                    .collect();
                let mut cmd = vec!["MGET"];
                cmd.extend(keys.iter().map(String::as_str));
                let head = call(&mut stream, &mut reader, &cmd, &mut Vec::new())?;
                let n: usize = head
                    .strip_prefix('*')
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("MGET answered {head:?}"))?;
                for (key, i) in keys.iter().zip(chunk_start..).take(n) {
                    let mut len = String::new();
                    reader.read_line(&mut len)?;
                    if len.trim() == "$-1" {
                        missing += 1;
                        first.get_or_insert_with(|| format!("{key} is missing"));
                        continue;
                    }
                    let mut v = String::new();
                    reader.read_line(&mut v)?;
                    if v.trim() != i.to_string() {
                        wrong += 1;
                        first.get_or_insert_with(|| format!("{key} holds {:?}, not {i}", v.trim()));
                    }
                }
            }
            if let Some(first) = first {
                problems.push(format!(
                    "connection {}: of {} acknowledged SETs, {missing} missing and {wrong} wrong (first: {first})",
                    c.conn, c.sets
                ));
            }
        }
        Ok(problems)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("verifier thread panicked"))?
}
