//! Hybrid mode's record side end to end, on real containerd, runc and servers: the primary's
//! shim starts `rrc-recorder` between `runc create` and `runc start`, streams the event log to a
//! backup shim and releases each output once the backup acknowledged the log it depends on.
//! The tests drive load from the client test host, then prove the log complete from the log
//! alone: every connection's byte stream rebuilt from the recorded results is exactly what the
//! client sent, the container-wide order is consistent (no gap, no thread out of order), and
//! the backup holds the same log as the primary.
//!
//! `RRC_HYBRID_SECS=N` sets how long each load runs (default 20). Run as root after
//! `make build`: `cargo test -p rrc-integration --test hybrid -- --nocapture`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rrc_eventlog::{Event, Reader, Record};
use rrc_integration::checker::{connect_in, verify, Checker};
use rrc_integration::pair::{recorder_position, status, wait_state, Pair, Workload, ID};
use rrc_integration::{integration_unavailable, wait_for};

static SERIAL: Mutex<()> = Mutex::new(());

fn bed(workload: Workload) -> Result<Option<(MutexGuard<'static, ()>, Pair)>> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(None);
    }
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut pair = Pair::new()?;
    pair.mode = Some("hybrid".into());
    pair.workload = workload;
    // Several checkpoints during each load; the primary keeps the log it discards in an
    // archive, so the tests can still prove the whole log complete.
    pair.annotations = vec![
        format!("io.containerd.rrc.epoch-ms={EPOCH_MS}"),
        format!(
            "io.containerd.rrc.log-archive={}",
            pair.bed.dir().join(ARCHIVE_DIR).display()
        ),
    ];
    Ok(Some((serial, pair)))
}

/// Ends a test: on failure, the tail of both hosts' containerd logs (the shims log there)
/// goes to stderr; the bed is reset either way.
fn finish(pair: Pair, result: Result<()>) -> Result<()> {
    if result.is_err() {
        for host in ["primary", "backup"] {
            // The shims' lines, without containerd's start-up.
            let path = pair.host(host).containerd_log();
            let text = fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.contains("loading plugin"))
                .collect();
            eprintln!(
                "--- {} (last 80 lines, start-up left out) ---",
                path.display()
            );
            for l in &lines[lines.len().saturating_sub(80)..] {
                eprintln!("{l}");
            }
            match status(pair.host(host)) {
                Ok(st) => eprintln!("--- {host}'s status ---\n{st}"),
                Err(e) => eprintln!("--- {host}'s status: {e}"),
            }
        }
    }
    let reset = pair.reset();
    result?;
    reset
}

/// The checkpoint interval of the tests.
const EPOCH_MS: u64 = 1500;
/// The primary's log archive, in the test bed's directory.
const ARCHIVE_DIR: &str = "log-archive";

/// Checkpoints each load must see committed (it runs several epochs).
const MIN_CHECKPOINTS: u64 = 3;

fn load_secs() -> u64 {
    std::env::var("RRC_HYBRID_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// The container's whole log since it started, and checks of what each side kept:
///
/// * the primary's archive holds every byte it dropped, and its `rrc-log` the rest (from the
///   last committed cut on; what was dropped before reads as a hole);
/// * the backup holds exactly the primary's bytes from the last committed cut to the end of
///   the log, and nothing before that cut;
/// * at least `min_checkpoints` checkpoints committed.
fn logs(pair: &Pair, min_checkpoints: u64) -> Result<Vec<u8>> {
    let primary = pair.host("primary").bundle_dir(ID).join("rrc-log");
    let archive = pair
        .bed
        .dir()
        .join(ARCHIVE_DIR)
        .join(format!("{}-{ID}.rrclog", pair.host("primary").namespace()));
    let backup = pair.host("backup").bundle_dir(ID).join("rrc-log-received");
    wait_for(Duration::from_secs(10), || {
        let pst = status(pair.host("primary"))?;
        let bst = status(pair.host("backup"))?;
        // The primary's copy first, then the archive: a byte dropped in between is archived
        // before it is dropped, so the two always overlap.
        let p = fs::read(&primary).with_context(|| format!("read {}", primary.display()))?;
        let a = fs::read(&archive).with_context(|| format!("read {}", archive.display()))?;
        let b = fs::read(&backup).with_context(|| format!("read {}", backup.display()))?;
        let checkpoints = pst["checkpoints"].as_u64().unwrap_or(0);
        ensure!(
            checkpoints >= min_checkpoints,
            "{checkpoints} checkpoints committed, expected at least {min_checkpoints}"
        );
        ensure!(a.len() <= p.len(), "the archive is longer than the log");
        ensure!(
            p.get(a.len()..a.len() + 8) == Some(b"RRCEVLOG"),
            "the primary's log does not go on with a segment where the archive ends ({})",
            a.len()
        );
        let whole = [&a[..], &p[a.len()..]].concat();
        let kept = pst["log"]["kept_from"].as_u64().unwrap_or(0);
        let kept_b = bst["log"]["kept_from"].as_u64().unwrap_or(0);
        ensure!(
            kept > 0 && kept_b == kept,
            "the last committed cut: primary {kept}, backup {kept_b}"
        );
        let k = usize::try_from(kept)?;
        ensure!(
            p[..k.min(p.len())].iter().all(|&x| x == 0),
            "the primary kept log bytes before the committed cut at {k}"
        );
        ensure!(
            b.len() == p.len(),
            "the backup holds {} of the primary's {} log bytes",
            b.len(),
            p.len()
        );
        ensure!(
            b[..k].iter().all(|&x| x == 0),
            "the backup kept log bytes before the committed cut at {k}"
        );
        ensure!(
            b[k..] == whole[k..],
            "the backup's log after the cut differs from the primary's"
        );
        ensure!(
            whole.get(k..k + 8) == Some(b"RRCEVLOG"),
            "no segment starts at the committed cut {k}"
        );
        Ok(whole)
    })
}

/// The primary's committed checkpoints, as the status shows the last one.
fn checkpoint_line(pair: &Pair) -> String {
    match status(pair.host("primary")) {
        Ok(st) => format!(
            "{} checkpoints, the last: {}",
            st["checkpoints"], st["last_checkpoint"]
        ),
        Err(e) => format!("no status: {e}"),
    }
}

/// What a log says: its records (decoded strictly: a bad checksum or a gap fails), the
/// verifier's report, and the byte streams the application received.
struct Checked {
    records: Vec<Record>,
    streams: rrc_eventlog::Streams,
}

fn check(log: &[u8]) -> Result<Checked> {
    let mut reader = Reader::new(log);
    let mut records = Vec::new();
    while let Some(r) = reader.next().context("decoding the log")? {
        records.push(r);
    }
    let report = rrc_eventlog::verify(&records);
    ensure!(
        report.violations.is_empty(),
        "the log's order is inconsistent: {:?}",
        report.violations.iter().take(5).collect::<Vec<_>>()
    );
    let streams = rrc_eventlog::received_streams(&records);
    Ok(Checked { records, streams })
}

fn kinds(records: &[Record]) -> BTreeMap<&'static str, u64> {
    let mut k = BTreeMap::new();
    for r in records {
        if let Record::Event(e) = r {
            *k.entry(e.event.kind_name()).or_default() += 1;
        }
    }
    k
}

/// What the log says the recorder could not record (gap records), one line each.
fn gaps(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Event(e) => match &e.event {
                Event::Gap { what, detail, .. } => Some(format!("{}: {detail}", what.name())),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Every connection's bytes must be one accepted stream of the log, whole.
fn streams_match(c: &Checked, sent: &[Vec<u8>]) -> Result<()> {
    if let Some(dir) = std::env::var_os("RRC_HYBRID_DUMP") {
        let dir = std::path::PathBuf::from(dir);
        let _ = fs::create_dir_all(&dir);
        for (i, b) in sent.iter().enumerate() {
            let _ = fs::write(dir.join(format!("sent-{i}")), b);
        }
        for (i, s) in c.streams.streams.iter().enumerate() {
            let _ = fs::write(
                dir.join(format!(
                    "stream-{i}-pid{}-fd{}-acc{:?}",
                    s.tgid, s.fd, s.accepted_at
                )),
                &s.data,
            );
        }
    }
    for (i, bytes) in sent.iter().enumerate() {
        ensure!(!bytes.is_empty(), "connection {i} sent nothing");
        let found = c.streams.accepted().any(|s| s.data == *bytes);
        if !found {
            let lens: Vec<usize> = c.streams.accepted().map(|s| s.data.len()).collect();
            bail!(
                "connection {i}'s {} bytes are not a received stream of the log (accepted \
                 streams' lengths: {lens:?})",
                bytes.len()
            );
        }
    }
    Ok(())
}

/// A connection from the client host (the calling thread enters the host's namespace), with a
/// read timeout.
fn connect_from(netns: &Path, addr: SocketAddr) -> Result<TcpStream> {
    let s = connect_in(netns, addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// One request on connection `c` (number `i`) and its checked reply; the bytes sent are
/// appended to the last argument.
type Step = fn(usize, u64, &mut TcpStream, &mut BufReader<TcpStream>, &mut Vec<u8>) -> Result<()>;

/// Runs `conns` client connections for `secs`, each a loop of `step` (one request and its
/// checked reply) of at most `max` requests; returns what each sent, or the first failure.
fn drive(
    netns: &Path,
    addr: SocketAddr,
    conns: usize,
    secs: u64,
    max: u64,
    step: Step,
) -> Result<(Vec<Vec<u8>>, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let (netns, stop) = (netns.to_path_buf(), stop.clone());
            std::thread::spawn(move || -> Result<(Vec<u8>, u64)> {
                let mut s = connect_from(&netns, addr)?;
                let mut r = BufReader::new(s.try_clone()?);
                let mut sent = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < max {
                    step(c, i, &mut s, &mut r, &mut sent)
                        .with_context(|| format!("connection {c}, request {i}"))?;
                    i += 1;
                }
                Ok((sent, i))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    let mut total = 0;
    for t in threads {
        let (bytes, n) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        sent.push(bytes);
        total += n;
    }
    Ok((sent, total))
}

fn send(s: &mut TcpStream, sent: &mut Vec<u8>, req: &[u8]) -> Result<()> {
    s.write_all(req)?;
    sent.extend_from_slice(req);
    Ok(())
}

/// memcached: a `set` of a key of this connection, then a `get` of it.
fn memcached_step(
    c: usize,
    i: u64,
    s: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    sent: &mut Vec<u8>,
) -> Result<()> {
    let key = format!("k{c}-{}", i % 64);
    let value = format!("v{c}-{i}");
    send(
        s,
        sent,
        format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()).as_bytes(),
    )?;
    let mut line = String::new();
    r.read_line(&mut line)?;
    ensure!(line == "STORED\r\n", "set answered {line:?}");
    send(s, sent, format!("get {key}\r\n").as_bytes())?;
    let mut head = String::new();
    r.read_line(&mut head)?;
    ensure!(
        head == format!("VALUE {key} 0 {}\r\n", value.len()),
        "get answered {head:?}"
    );
    let mut body = vec![0u8; value.len() + 2 + 5];
    r.read_exact(&mut body)?;
    ensure!(
        body == format!("{value}\r\nEND\r\n").as_bytes(),
        "get returned {:?}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

/// lighttpd: one kept-alive GET of the index page, the whole response checked.
fn http_step(
    _c: usize,
    _i: u64,
    s: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    sent: &mut Vec<u8>,
) -> Result<()> {
    send(
        s,
        sent,
        b"GET /index.html HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n",
    )?;
    let mut status = String::new();
    r.read_line(&mut status)?;
    ensure!(status.starts_with("HTTP/1.1 200"), "status {status:?}");
    let mut len = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h == "\r\n" {
            break;
        }
        ensure!(!h.is_empty(), "the connection closed in the headers");
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = Some(v.trim().parse::<usize>()?);
        }
    }
    let len = len.context("no Content-Length")?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    ensure!(
        String::from_utf8_lossy(&body).contains("hello from rrc lighttpd"),
        "unexpected body"
    );
    Ok(())
}

/// Waits until the primary is protected, the backup has acknowledged every log byte the
/// primary had when the load ended, and no output is held; returns the primary's status.
fn settled_status(pair: &Pair) -> Result<serde_json::Value> {
    let log = pair.host("primary").bundle_dir(ID).join("rrc-log");
    let written = fs::metadata(&log)
        .with_context(|| format!("stat {}", log.display()))?
        .len();
    wait_for(Duration::from_secs(10), || {
        let st = status(pair.host("primary"))?;
        ensure!(st["mode"] == "hybrid", "mode {}", st["mode"]);
        ensure!(
            st["state"] == "protected",
            "state {} ({})",
            st["state"],
            st["detail"]
        );
        let log = &st["log"];
        ensure!(
            log["acked_bytes"].as_u64().unwrap_or(0) >= written
                && log["packets_released"].as_u64().unwrap_or(0) > 0
                && log["packets_held"] == 0,
            "log figures {log}, {written} bytes written when the load ended"
        );
        Ok(st)
    })
}

#[test]
fn redis_log_is_complete_and_outputs_wait_for_the_backup() -> Result<()> {
    let Some((_serial, pair)) = bed(Workload::Redis)? else {
        return Ok(());
    };
    let result = (|| -> Result<()> {
        pair.start()?;
        let netns = pair.host("client").netns_path();
        let started = Instant::now();
        let checker = Checker::start(&netns, pair.service(), 4);
        std::thread::sleep(Duration::from_secs(load_secs()));
        let report = checker.stop();
        let secs = started.elapsed().as_secs_f64();
        let broken = report.broken();
        ensure!(broken.is_empty(), "connections broke: {broken:?}");
        let missing = verify(&netns, pair.service(), &report)?;
        ensure!(
            missing.is_empty(),
            "acknowledged writes missing: {missing:?}"
        );
        let acked = report.acknowledged();
        ensure!(
            acked > 100,
            "only {acked} writes acknowledged in {secs:.1} s"
        );
        let st = settled_status(&pair)?;
        let log = logs(&pair, MIN_CHECKPOINTS)?;
        let c = check(&log)?;
        let sent: Vec<Vec<u8>> = report.conns.iter().map(|c| c.sent.clone()).collect();
        streams_match(&c, &sent)?;
        let k = kinds(&c.records);
        ensure!(
            k.get("ingress-packet").copied().unwrap_or(0) > acked,
            "fewer ingress packets than requests: {k:?}"
        );
        // redis-server is linked dynamically: the loader and libc read the CPU's features
        // with cpuid, which cannot be trapped here, and the code scan must say so in the log.
        ensure!(
            k.get("unrecordable").copied().unwrap_or(0) > 0,
            "no cpuid site of redis-server's code in the log: {k:?}"
        );
        eprintln!(
            "redis, hybrid: {acked} writes acknowledged in {secs:.1} s over 4 connections \
             ({:.0}/s); log {} bytes, {} records {k:?}; status log {}; {}",
            acked as f64 / secs,
            log.len(),
            c.records.len(),
            st["log"],
            checkpoint_line(&pair)
        );
        eprintln!("redis, hybrid: gaps in the log: {:?}", gaps(&c.records));
        Ok(())
    })();
    finish(pair, result)
}

#[test]
fn memcached_with_four_threads_is_recorded_completely() -> Result<()> {
    let Some((_serial, pair)) = bed(Workload::Memcached)? else {
        return Ok(());
    };
    let result = (|| -> Result<()> {
        pair.start()?;
        let netns = pair.host("client").netns_path();
        let (sent, requests) = drive(
            &netns,
            pair.service(),
            8,
            load_secs(),
            u64::MAX,
            memcached_step,
        )?;
        ensure!(requests > 100, "only {requests} requests answered");
        settled_status(&pair)?;
        let log = logs(&pair, MIN_CHECKPOINTS)?;
        let c = check(&log)?;
        streams_match(&c, &sent)?;
        let threads: std::collections::HashSet<u32> = c
            .records
            .iter()
            .filter_map(|r| match r {
                Record::Event(e) if !matches!(e.event, Event::IngressPacket { .. }) => {
                    Some(e.thread.tid)
                }
                _ => None,
            })
            .collect();
        let k = kinds(&c.records);
        ensure!(
            threads.len() >= 5,
            "events of only {} threads (memcached -t 4 has 4 workers besides its main \
             thread): {k:?}",
            threads.len()
        );
        ensure!(
            k.get("sync-order").copied().unwrap_or(0) > 0,
            "no futex order: {k:?}"
        );
        eprintln!(
            "memcached -t 4, hybrid: {requests} set+get pairs over 8 connections; log {} \
             bytes, {} records from {} threads {k:?}; {}",
            log.len(),
            c.records.len(),
            threads.len(),
            checkpoint_line(&pair)
        );
        Ok(())
    })();
    finish(pair, result)
}

#[test]
fn lighttpd_log_is_complete() -> Result<()> {
    let Some((_serial, pair)) = bed(Workload::Lighttpd)? else {
        return Ok(());
    };
    let result = (|| -> Result<()> {
        pair.start()?;
        let netns = pair.host("client").netns_path();
        // lighttpd closes a kept-alive connection after 1000 requests
        // (server.max-keep-alive-requests): stay below.
        let (sent, requests) = drive(&netns, pair.service(), 8, load_secs(), 900, http_step)?;
        ensure!(requests > 100, "only {requests} requests answered");
        settled_status(&pair)?;
        let log = logs(&pair, MIN_CHECKPOINTS)?;
        let c = check(&log)?;
        streams_match(&c, &sent)?;
        eprintln!(
            "lighttpd, hybrid: {requests} kept-alive GETs over 8 connections; log {} bytes, \
             {} records {:?}; {}",
            log.len(),
            c.records.len(),
            kinds(&c.records),
            checkpoint_line(&pair)
        );
        Ok(())
    })();
    finish(pair, result)
}

#[test]
fn a_hybrid_backup_refuses_to_take_over_without_replay() -> Result<()> {
    let Some((_serial, pair)) = bed(Workload::Redis)? else {
        return Ok(());
    };
    let result = (|| -> Result<()> {
        pair.start()?;
        pair.kill_primary()?;
        let st = wait_state(pair.host("backup"), &["failed"], Duration::from_secs(15))?;
        let detail = st["detail"].as_str().unwrap_or_default();
        ensure!(
            detail.contains("NOT TAKING OVER") && detail.contains("replayer"),
            "detail: {detail}"
        );
        ensure!(
            st["failovers"].as_array().is_none_or(Vec::is_empty),
            "a failover was recorded: {st}"
        );
        // Nothing was restored: the service address stays off the backup's namespace.
        let out = pair
            .host("svcb")
            .command("ip")
            .args(["-4", "addr", "show", "dev", "eth0"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            !text.contains(&pair.host("svc").ip().to_string()),
            "the backup took the service address: {text}"
        );
        Ok(())
    })();
    finish(pair, result)
}

#[test]
fn a_dead_recorder_stops_its_container_and_says_so() -> Result<()> {
    let Some((_serial, pair)) = bed(Workload::Redis)? else {
        return Ok(());
    };
    let result = (|| -> Result<()> {
        pair.start()?;
        let primary = pair.host("primary");
        // The recorder's pid is in the position file it shares with the shim.
        let (_, _, pid) = recorder_position(primary)?;
        ensure!(pid > 1, "recorder pid {pid}");
        let pid = i32::try_from(pid)?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let st = wait_state(primary, &["failed"], Duration::from_secs(15))?;
        let detail = st["detail"].as_str().unwrap_or_default();
        ensure!(
            detail.contains("recorder")
                && detail.contains("signal 9")
                && detail.contains("stopped"),
            "detail: {detail}"
        );
        // containerd sees the task exit; the backup was told goodbye and does not complain.
        wait_for(Duration::from_secs(15), || {
            let out = primary.ctr(&["task", "ls"])?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let line = text.lines().find(|l| l.starts_with(ID)).unwrap_or_default();
            ensure!(line.contains("STOPPED"), "task ls: {text}");
            Ok(())
        })?;
        let backup = status(pair.host("backup"))?;
        ensure!(
            backup["state"] != "failed",
            "the backup reports a failure after a goodbye: {backup}"
        );
        Ok(())
    })();
    finish(pair, result)
}

#[test]
fn replies_wait_for_the_backup_to_hold_their_log() -> Result<()> {
    let Some((_serial, mut pair)) = bed(Workload::Redis)? else {
        return Ok(());
    };
    // Long enough that a paused backup is not declared lost while the test holds it.
    pair.annotations
        .push("io.containerd.rrc.failover-timeout-ms=10000".into());
    let result = (|| -> Result<()> {
        pair.start()?;
        let netns = pair.host("client").netns_path();
        let addr = pair.service();
        let backup_shim = fs::read_to_string(pair.host("backup").bundle_dir(ID).join("shim.pid"))?;
        let backup_shim = nix::unistd::Pid::from_raw(backup_shim.trim().parse()?);
        let (tx, rx) = std::sync::mpsc::channel();
        let client = std::thread::spawn(move || -> Result<()> {
            let mut s = connect_in(&netns, addr)?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut line = String::new();
            s.write_all(b"PING\r\n")?;
            r.read_line(&mut line)?;
            ensure!(line == "+PONG\r\n", "PING answered {line:?}");
            // Now with the backup paused: the reply must wait for it.
            tx.send(Instant::now())?;
            std::thread::sleep(Duration::from_millis(200));
            let sent = Instant::now();
            s.write_all(b"INCR paused\r\n")?;
            line.clear();
            r.read_line(&mut line)?;
            ensure!(line == ":1\r\n", "INCR answered {line:?}");
            tx.send(sent)?;
            tx.send(Instant::now())?;
            Ok(())
        });
        // Pause the backup shim once the first reply came.
        let first = rx.recv_timeout(Duration::from_secs(10))?;
        nix::sys::signal::kill(backup_shim, nix::sys::signal::Signal::SIGSTOP)?;
        let paused_for = Duration::from_millis(1500);
        std::thread::sleep(paused_for);
        let resumed = Instant::now();
        nix::sys::signal::kill(backup_shim, nix::sys::signal::Signal::SIGCONT)?;
        let sent = rx.recv_timeout(Duration::from_secs(10))?;
        let answered = rx.recv_timeout(Duration::from_secs(10))?;
        client
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
        ensure!(
            first < sent,
            "the INCR was sent before the backup was paused"
        );
        ensure!(
            answered >= resumed,
            "the INCR was answered {:?} before the backup resumed: its reply did not wait for \
             the log to be acknowledged",
            resumed - answered
        );
        eprintln!(
            "hybrid: a reply produced while the backup was paused came {:?} after the request, \
             {:?} after the backup resumed",
            answered - sent,
            answered - resumed
        );
        let st = status(pair.host("primary"))?;
        ensure!(st["state"] == "protected", "primary: {st}");
        Ok(())
    })();
    // A paused backup must never be left behind.
    finish(pair, result)
}
