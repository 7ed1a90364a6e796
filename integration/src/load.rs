//! Load generators and probes that run in the calling process but inside a test host's network
//! namespace, for `rrc-bench`: a memcached get/set mix (text protocol) whose every reply is
//! checked, a memcached `version` probe and a one-shot HTTP GET.
//!
//! `setns` moves only the calling thread, so every connection is opened by a thread of its own
//! that enters the namespace first ([`in_netns`]); threads it spawns would not inherit it. Each
//! load connection has one request in flight at a time, and the latency of every request is
//! recorded.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Moves the calling thread into the network namespace at `netns` (`/var/run/netns/NAME`).
/// Only for threads of our own that do nothing else afterwards.
fn enter(netns: &Path) -> Result<()> {
    let ns = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).with_context(|| format!("enter {}", netns.display()))
}

/// Runs `f` on a new thread that has entered the network namespace `netns`, and returns its
/// result.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(netns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("a load thread panicked"))?
    })
}

/// A TCP connection to `addr` with `TCP_NODELAY` and read/write timeouts of `timeout` (the
/// calling thread must already be in the right namespace).
fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Reads one line, without its `\r\n`; fails on end of stream.
fn read_line(reader: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    let n = reader.read_line(&mut line).context("receive")?;
    ensure!(n > 0, "the server closed the connection");
    ensure!(line.ends_with("\r\n"), "truncated line {line:?}");
    line.truncate(line.len() - 2);
    Ok(line)
}

/// Sends `version` to the memcached at `addr` from the namespace `netns`; returns its version.
pub fn memcached_version(netns: &Path, addr: SocketAddr, timeout: Duration) -> Result<String> {
    in_netns(netns, || {
        let mut s = connect(addr, timeout)?;
        s.write_all(b"version\r\n").context("send")?;
        let line = read_line(&mut BufReader::new(s))?;
        line.strip_prefix("VERSION ")
            .map(str::to_string)
            .with_context(|| format!("unexpected reply to version: {line:?}"))
    })
}

/// One HTTP/1.1 GET of `path` from `addr` (from the namespace `netns`, `Connection: close`);
/// returns the status code and the body.
pub fn http_get(
    netns: &Path,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    in_netns(netns, || {
        let mut s = connect(addr, timeout)?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            addr.ip()
        );
        s.write_all(req.as_bytes()).context("send")?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).context("receive")?;
        let end = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no end of the response header")?;
        let head = String::from_utf8_lossy(&resp[..end]).to_string();
        let status_line = head.lines().next().unwrap_or_default();
        let code = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        Ok((code, resp[end + 4..].to_vec()))
    })
}

/// What one run of [`Memcached::run`] measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Requests answered (and checked).
    pub requests: u64,
    /// Of which gets, and of those the hits.
    pub gets: u64,
    /// Gets answered with the value.
    pub hits: u64,
    /// Sets (each answered `STORED`).
    pub sets: u64,
    /// From the start (all connections open) to the last reply.
    pub elapsed: Duration,
    /// The latency of every request, sorted.
    pub latencies: Vec<Duration>,
}

impl Report {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The mean latency in milliseconds.
    pub fn mean_ms(&self) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let sum: Duration = self.latencies.iter().sum();
        sum.as_secs_f64() * 1e3 / self.latencies.len() as f64
    }

    /// The `p`th percentile latency (nearest rank) in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        let n = self.latencies.len();
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.latencies[rank.clamp(1, n) - 1].as_secs_f64() * 1e3
    }
}

/// A memcached get/set mix.
#[derive(Debug, Clone)]
pub struct MixConfig {
    /// Connections, each with one request in flight.
    pub connections: usize,
    /// Requests in all (spread evenly over the connections).
    pub requests: u64,
    /// Percentage of gets (the rest are sets).
    pub get_percent: u32,
    /// Seed of the key and operation choice.
    pub seed: u64,
}

/// A memcached server under test, seen from a client namespace, with a fixed key space: key
/// `i` always gets the same value, so every get can be checked. It remembers which keys a set
/// was acknowledged for: a get sent after that must return the value (memcached has room for the
/// whole key space and nothing expires), before that a miss is fine too.
pub struct Memcached {
    netns: PathBuf,
    addr: SocketAddr,
    timeout: Duration,
    keys: Vec<String>,
    values: Vec<Vec<u8>>,
    stored: Vec<AtomicBool>,
}

/// How a connection of a run ended.
#[derive(Default)]
struct ConnOut {
    gets: u64,
    hits: u64,
    sets: u64,
    latencies: Vec<Duration>,
    end: Option<Instant>,
    error: Option<String>,
}

impl Memcached {
    /// `keys` keys of `value_len`-byte values at `addr`, reached from the namespace `netns`;
    /// `timeout` bounds every connect and every reply.
    pub fn new(
        netns: &Path,
        addr: SocketAddr,
        keys: usize,
        value_len: usize,
        timeout: Duration,
    ) -> Memcached {
        let names: Vec<String> = (0..keys).map(|i| format!("rrc:bench:{i:06}")).collect();
        let values = (0..keys)
            .map(|i| {
                let unit = format!("{i:06}|");
                unit.bytes().cycle().take(value_len).collect()
            })
            .collect();
        Memcached {
            netns: netns.to_path_buf(),
            addr,
            timeout,
            keys: names,
            values,
            stored: (0..keys).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// The whole set command for key `k`.
    fn set_request(&self, k: usize) -> Vec<u8> {
        let v = &self.values[k];
        let mut req = format!("set {} 0 0 {}\r\n", self.keys[k], v.len()).into_bytes();
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
        req
    }

    /// Sets every key once, from `connections` connections, each sending its share in batches
    /// (pipelined: few round trips, so this is quick even when replies wait for a checkpoint).
    pub fn preload(&self, connections: usize) -> Result<()> {
        const BATCH: usize = 500;
        let connections = connections.clamp(1, self.keys.len().max(1));
        let share = self.keys.len().div_ceil(connections);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..connections)
                .map(|c| {
                    s.spawn(move || -> Result<()> {
                        enter(&self.netns)?;
                        let stream = connect(self.addr, self.timeout)?;
                        let mut writer = stream.try_clone()?;
                        let mut reader = BufReader::new(stream);
                        let mine: Vec<usize> =
                            (c * share..((c + 1) * share).min(self.keys.len())).collect();
                        for batch in mine.chunks(BATCH) {
                            let req: Vec<u8> =
                                batch.iter().flat_map(|&k| self.set_request(k)).collect();
                            writer.write_all(&req).context("send")?;
                            for &k in batch {
                                let line = read_line(&mut reader)?;
                                ensure!(
                                    line == "STORED",
                                    "set {}: unexpected reply {line:?}",
                                    self.keys[k]
                                );
                                self.stored[k].store(true, Ordering::Release);
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("a preload thread panicked")))
                })
                .collect()
        });
        for r in results {
            r.context("memcached preload")?;
        }
        Ok(())
    }

    /// Runs the mix and checks every reply. Fails if any request failed (with the number of
    /// failed connections and their first errors).
    pub fn run(&self, cfg: &MixConfig) -> Result<Report> {
        ensure!(
            cfg.connections > 0 && !self.keys.is_empty(),
            "no connections or no keys"
        );
        let conns = cfg.connections;
        let per = cfg.requests / conns as u64;
        let extra = cfg.requests % conns as u64;
        // Every connection thread and this one: the clock starts once all are connected.
        let barrier = Barrier::new(conns + 1);
        let start: Mutex<Option<Instant>> = Mutex::new(None);
        let outs: Vec<ConnOut> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..conns)
                .map(|c| {
                    let n = per + u64::from((c as u64) < extra);
                    let barrier = &barrier;
                    let seed = cfg.seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    s.spawn(move || self.connection(n, cfg.get_percent, seed, barrier))
                })
                .collect();
            barrier.wait();
            if let Ok(mut t) = start.lock() {
                *t = Some(Instant::now());
            }
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| ConnOut {
                        error: Some("the connection's thread panicked".into()),
                        ..ConnOut::default()
                    })
                })
                .collect()
        });
        let start = start.into_inner().ok().flatten().context("no start time")?;
        let errors: Vec<&String> = outs.iter().filter_map(|o| o.error.as_ref()).collect();
        if let Some(first) = errors.first() {
            let more: Vec<&String> = errors.iter().skip(1).take(3).copied().collect();
            bail!(
                "memcached load to {}: {} of {conns} connections failed; first: {first}; \
                 then: {more:?}",
                self.addr,
                errors.len()
            );
        }
        let mut r = Report::default();
        let mut end = start;
        for o in outs {
            r.gets += o.gets;
            r.hits += o.hits;
            r.sets += o.sets;
            r.latencies.extend(o.latencies);
            if let Some(e) = o.end {
                end = end.max(e);
            }
        }
        r.requests = r.gets + r.sets;
        ensure!(
            r.requests == cfg.requests,
            "{} of {} requests answered",
            r.requests,
            cfg.requests
        );
        r.latencies.sort();
        r.elapsed = end.duration_since(start);
        Ok(r)
    }

    /// One connection of [`Memcached::run`]: enter the namespace, connect, wait for all the
    /// others, then `n` requests one after the other. Stops at the first error (the stream may
    /// be out of step afterwards).
    fn connection(&self, n: u64, get_percent: u32, seed: u64, barrier: &Barrier) -> ConnOut {
        let mut out = ConnOut {
            latencies: Vec::with_capacity(usize::try_from(n).unwrap_or(0)),
            ..ConnOut::default()
        };
        let stream = enter(&self.netns)
            .and_then(|()| connect(self.addr, self.timeout))
            .and_then(|s| Ok((s.try_clone()?, BufReader::new(s))));
        // Everyone waits at the barrier, connected or not, so a failure cannot hang the run.
        barrier.wait();
        let (mut writer, mut reader) = match stream {
            Ok(s) => s,
            Err(e) => {
                out.error = Some(format!("{e:#}"));
                return out;
            }
        };
        let mut rng = SplitMix64(seed);
        for i in 0..n {
            let k = (rng.next() % self.keys.len() as u64) as usize;
            let get = (rng.next() % 100) < u64::from(get_percent);
            let t0 = Instant::now();
            let res = if get {
                self.get(k, &mut writer, &mut reader).map(|hit| {
                    out.gets += 1;
                    out.hits += u64::from(hit);
                })
            } else {
                self.set(k, &mut writer, &mut reader)
                    .map(|()| out.sets += 1)
            };
            if let Err(e) = res {
                out.error = Some(format!(
                    "request {i} ({} {}): {e:#}",
                    if get { "get" } else { "set" },
                    self.keys[k]
                ));
                return out;
            }
            out.latencies.push(t0.elapsed());
        }
        out.end = Some(Instant::now());
        out
    }

    /// One get of key `k`; returns whether it hit. A miss is an error once a set of `k` was
    /// acknowledged before the get was sent.
    fn get(
        &self,
        k: usize,
        writer: &mut TcpStream,
        reader: &mut BufReader<TcpStream>,
    ) -> Result<bool> {
        let was_stored = self.stored[k].load(Ordering::Acquire);
        let key = &self.keys[k];
        writer
            .write_all(format!("get {key}\r\n").as_bytes())
            .context("send")?;
        let line = read_line(reader)?;
        if line == "END" {
            ensure!(!was_stored, "miss, but the key was stored before");
            return Ok(false);
        }
        let expected = &self.values[k];
        let header = format!("VALUE {key} 0 {}", expected.len());
        ensure!(line == header, "expected {header:?}, got {line:?}");
        let mut data = vec![0u8; expected.len() + 2];
        reader.read_exact(&mut data).context("receive the value")?;
        ensure!(
            &data[..expected.len()] == expected.as_slice() && data.ends_with(b"\r\n"),
            "wrong value {:?}",
            String::from_utf8_lossy(&data)
        );
        let end = read_line(reader)?;
        ensure!(end == "END", "expected END, got {end:?}");
        Ok(true)
    }

    /// One set of key `k` (always its own value); must be answered `STORED`.
    fn set(
        &self,
        k: usize,
        writer: &mut TcpStream,
        reader: &mut BufReader<TcpStream>,
    ) -> Result<()> {
        writer.write_all(&self.set_request(k)).context("send")?;
        let line = read_line(reader)?;
        ensure!(line == "STORED", "expected STORED, got {line:?}");
        self.stored[k].store(true, Ordering::Release);
        Ok(())
    }
}

/// A small, fast pseudo-random generator (SplitMix64): the key and operation choice.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let r = Report {
            latencies: (1..=100).map(Duration::from_millis).collect(),
            requests: 100,
            elapsed: Duration::from_secs(2),
            ..Report::default()
        };
        assert!((r.percentile_ms(99.0) - 99.0).abs() < 1e-9);
        assert!((r.percentile_ms(50.0) - 50.0).abs() < 1e-9);
        assert!((r.percentile_ms(100.0) - 100.0).abs() < 1e-9);
        assert!((r.mean_ms() - 50.5).abs() < 1e-9);
        assert!((r.rps() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn values_are_fixed_per_key() {
        let m = Memcached::new(
            Path::new("/nonexistent"),
            SocketAddr::from(([127, 0, 0, 1], 11211)),
            3,
            100,
            Duration::from_secs(1),
        );
        assert_eq!(m.values[2].len(), 100);
        assert!(m.values[2].starts_with(b"000002|000002|"));
        let req = m.set_request(1);
        assert!(req.starts_with(b"set rrc:bench:000001 0 0 100\r\n000001|"));
        assert!(req.ends_with(b"\r\n"));
    }
}
