//! `rrc-bench`: redis under containerd's runc shim, rrc mode `off` and rrc passive mode,
//! alternating in the same run.
//!
//! runc and mode off: test hosts `server` (its own containerd) and `client`. Passive mode: the
//! replicated pair of [`rrc_integration::pair`] (primary, backup, clients). For each round and
//! each of the three it measures
//! * container start: from `ctr run -d` to the first PONG from redis, seen from the client host
//!   (passive: the primary's, with its backup already waiting);
//! * redis GET/SET throughput and latency with redis-benchmark from the client host, with 1 and
//!   with 50 clients (passive mode holds every reply until the next checkpoint commits, about
//!   one to two epochs, so it runs far fewer requests: `--passive-requests`);
//! * passive only: the container's pause per checkpoint (CRIU's frozen time), the checkpoint's
//!   size, and the recovery after a primary kill (detection, restore, network, and from the
//!   kill to the first answered PING).
//!
//! It prints medians and ratios against runc and writes them to `integration/results/` as JSON
//! (the data) and Markdown (the table the README shows). Usage:
//! `rrc-bench [--rounds N] [--requests N] [--passive-requests N] [--out DIR]`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rrc_integration::pair::{status, wait_state, Pair};
use rrc_integration::{wait_for, TestBed};

const RUNTIMES: [(&str, &str); 2] = [
    ("runc", "io.containerd.runc.v2"),
    ("rrc-off", "io.containerd.rrc.v2"),
];

struct Args {
    rounds: usize,
    requests: u32,
    passive_requests: u32,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        rounds: 5,
        requests: 20_000,
        passive_requests: 10,
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => a.rounds = value()?.parse().context("--rounds")?,
            "--requests" => a.requests = value()?.parse().context("--requests")?,
            "--passive-requests" => {
                a.passive_requests = value()?.parse().context("--passive-requests")?
            }
            "--out" => a.out = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!(
                    "usage: rrc-bench [--rounds N] [--requests N] [--passive-requests N] [--out DIR]\n\
                     --passive-requests: requests per client in passive mode (default 10)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}; see --help"),
        }
    }
    anyhow::ensure!(
        a.rounds > 0 && a.requests > 0 && a.passive_requests > 0,
        "rounds and requests must be positive"
    );
    Ok(a)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Per (runtime, metric) samples.
type Samples = BTreeMap<(String, String), Vec<f64>>;

fn redis_ping(bed: &TestBed, ip: &str) -> Result<()> {
    let out = bed
        .host("client")
        .command("timeout")
        .args(["5", "redis-cli"])
        .args(["-h", ip, "PING"])
        .output()?;
    if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
        Ok(())
    } else {
        bail!("no PONG yet")
    }
}

/// Parses redis-benchmark `--csv` output: test name → (rps, avg ms, p50 ms, p99 ms).
fn parse_csv(text: &str) -> Result<BTreeMap<String, [f64; 4]>> {
    let mut out = BTreeMap::new();
    let mut header: Vec<String> = Vec::new();
    for line in text.lines() {
        let cols: Vec<String> = line
            .split(',')
            .map(|c| c.trim_matches('"').to_string())
            .collect();
        if cols.first().map(String::as_str) == Some("test") {
            header = cols;
            continue;
        }
        if header.is_empty() || cols.len() != header.len() {
            continue;
        }
        let get = |name: &str| -> Result<f64> {
            let i = header
                .iter()
                .position(|h| h == name)
                .with_context(|| format!("redis-benchmark csv has no {name} column"))?;
            cols[i]
                .parse()
                .with_context(|| format!("bad {name} value {:?}", cols[i]))
        };
        out.insert(
            cols[0].clone(),
            [
                get("rps")?,
                get("avg_latency_ms")?,
                get("p50_latency_ms")?,
                get("p99_latency_ms")?,
            ],
        );
    }
    anyhow::ensure!(
        !out.is_empty(),
        "no results in redis-benchmark output: {text}"
    );
    Ok(out)
}

fn one_round(bed: &TestBed, args: &Args, round: usize, samples: &mut Samples) -> Result<()> {
    let server = bed.host("server");
    let ip = server.ip().to_string();
    let netns = format!("network:/var/run/netns/{}", server.netns());
    // Alternate which runtime goes first, so drift in the machine's load hits both alike.
    let order: Vec<_> = if round % 2 == 0 {
        RUNTIMES.to_vec()
    } else {
        RUNTIMES.iter().rev().copied().collect()
    };
    for (label, runtime) in order {
        let id = format!("bench-{label}-{round}");
        let t0 = Instant::now();
        server.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            runtime,
            "--with-ns",
            &netns,
            "docker.io/rrc/redis:latest",
            &id,
        ])?;
        wait_for(Duration::from_secs(20), || redis_ping(bed, &ip)).with_context(|| {
            let tasks = server
                .ctr(&["tasks", "ls"])
                .map(|o| o.stdout)
                .unwrap_or_default();
            format!(
                "redis under {runtime} never answered; tasks:\n{}",
                String::from_utf8_lossy(&tasks)
            )
        })?;
        let start_ms = t0.elapsed().as_secs_f64() * 1e3;
        push(samples, label, "start_ms", start_ms);

        for clients in [1u32, 50] {
            redis_benchmark(bed, &ip, clients, args.requests, label, samples)?;
        }
        server.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &id])?;
        wait_for(Duration::from_secs(10), || {
            server.ctr_ok(&["tasks", "delete", &id]).map(|_| ())
        })?;
        server.ctr_ok(&["containers", "delete", &id])?;
        eprintln!("round {round}: {label} start {start_ms:.1} ms");
    }
    Ok(())
}

/// redis-benchmark GET and SET from the client host with `clients` connections, `requests` in
/// all per test.
fn redis_benchmark(
    bed: &TestBed,
    ip: &str,
    clients: u32,
    requests: u32,
    label: &str,
    samples: &mut Samples,
) -> Result<()> {
    let out = bed
        .host("client")
        .command("redis-benchmark")
        .args(["-h", ip, "-q", "--csv", "-t", "set,get", "-P", "1"])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string()])
        .output()?;
    anyhow::ensure!(out.status.success(), "redis-benchmark failed: {out:?}");
    let res = parse_csv(&String::from_utf8_lossy(&out.stdout))?;
    for (test, [rps, avg, p50, p99]) in res {
        let t = test.to_lowercase();
        push(samples, label, &format!("{t}_c{clients}_rps"), rps);
        push(samples, label, &format!("{t}_c{clients}_avg_ms"), avg);
        push(samples, label, &format!("{t}_c{clients}_p50_ms"), p50);
        push(samples, label, &format!("{t}_c{clients}_p99_ms"), p99);
    }
    Ok(())
}

/// One round of passive mode: start the pair, benchmark, read the checkpoint figures, kill the
/// primary and time the recovery.
fn passive_round(pair: &Pair, args: &Args, round: usize, samples: &mut Samples) -> Result<()> {
    const LABEL: &str = "rrc-passive";
    let ip = pair.host("svc").ip().to_string();
    pair.start_backup()?;
    let t0 = Instant::now();
    pair.start_primary()?;
    wait_for(Duration::from_secs(20), || redis_ping(&pair.bed, &ip))?;
    let start_ms = t0.elapsed().as_secs_f64() * 1e3;
    push(samples, LABEL, "start_ms", start_ms);
    let primary = pair.host("primary");
    wait_state(primary, &["protected"], Duration::from_secs(30))?;
    let mut seen = std::collections::BTreeSet::new();
    let mut checkpoint = |samples: &mut Samples| -> Result<()> {
        let st = status(primary)?;
        let c = &st["last_checkpoint"];
        if let Some(e) = c["epoch"].as_u64() {
            if seen.insert(e) {
                let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
                push(samples, LABEL, "checkpoint_frozen_ms", f("frozen_ms"));
                push(samples, LABEL, "checkpoint_dump_ms", f("dump_ms"));
                push(samples, LABEL, "checkpoint_transfer_ms", f("transfer_ms"));
                push(samples, LABEL, "checkpoint_mb", f("bytes") / 1e6);
            }
        }
        Ok(())
    };
    for clients in [1u32, 50] {
        redis_benchmark(
            &pair.bed,
            &ip,
            clients,
            args.passive_requests * clients,
            LABEL,
            samples,
        )?;
        checkpoint(samples)?;
    }
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1100));
        checkpoint(samples)?;
    }
    pair.kill_primary()?;
    let killed = Instant::now();
    wait_for(Duration::from_secs(30), || redis_ping(&pair.bed, &ip))?;
    push(
        samples,
        LABEL,
        "recovery_kill_to_answer_ms",
        killed.elapsed().as_secs_f64() * 1e3,
    );
    let st = wait_state(pair.host("backup"), &["live"], Duration::from_secs(30))?;
    if let Some(f) = st["failovers"].as_array().and_then(|a| a.last()) {
        for k in ["detection_ms", "restore_ms", "network_ms"] {
            push(
                samples,
                LABEL,
                &format!("recovery_{k}"),
                f[k].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    pair.reset()?;
    eprintln!("round {round}: rrc-passive start {start_ms:.1} ms");
    Ok(())
}

fn push(samples: &mut Samples, runtime: &str, metric: &str, v: f64) {
    samples
        .entry((runtime.to_string(), metric.to_string()))
        .or_default()
        .push(v);
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if let Some(why) = rrc_integration::integration_unavailable() {
        bail!("cannot benchmark: {why}");
    }
    let mut bed = TestBed::new(&["server", "client"])?;
    bed.host_mut("server").start_containerd("")?;
    let pair = Pair::new()?;
    let mut samples = Samples::new();
    for round in 0..args.rounds {
        // Passive mode first in odd rounds, last in even ones.
        if round % 2 == 1 {
            passive_round(&pair, &args, round, &mut samples)
                .with_context(|| format!("round {round}: passive mode"))?;
        }
        one_round(&bed, &args, round, &mut samples).with_context(|| {
            format!(
                "round {round}\n{}",
                bed.host("server").containerd_log_tail()
            )
        })?;
        if round % 2 == 0 {
            passive_round(&pair, &args, round, &mut samples)
                .with_context(|| format!("round {round}: passive mode"))?;
        }
    }
    drop(pair);
    drop(bed);

    let metrics: std::collections::BTreeSet<String> =
        samples.keys().map(|(_, m)| m.clone()).collect();
    let mut json_rows = Vec::new();
    let mut md = String::new();
    md.push_str(
        "| metric | runc | rrc off | rrc passive | off / runc | passive / runc |\n|---|---|---|---|---|---|\n",
    );
    let med = |label: &str, m: &str| {
        samples
            .get(&(label.to_string(), m.to_string()))
            .map(|v| median(v))
    };
    let cell = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "—".into());
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.3}", a / b),
        _ => "—".into(),
    };
    for m in &metrics {
        let (base, off, passive) = (med("runc", m), med("rrc-off", m), med("rrc-passive", m));
        md.push_str(&format!(
            "| {m} | {} | {} | {} | {} | {} |\n",
            cell(base),
            cell(off),
            cell(passive),
            ratio(off, base),
            ratio(passive, base)
        ));
        json_rows.push(serde_json::json!({
            "metric": m,
            "runc_median": base, "rrc_off_median": off, "rrc_passive_median": passive,
            "runc_samples": samples.get(&("runc".into(), m.clone())),
            "rrc_off_samples": samples.get(&("rrc-off".into(), m.clone())),
            "rrc_passive_samples": samples.get(&("rrc-passive".into(), m.clone())),
        }));
    }
    let start_delta = match (
        samples.get(&("runc".into(), "start_ms".into())),
        samples.get(&("rrc-off".into(), "start_ms".into())),
    ) {
        (Some(a), Some(b)) => median(b) - median(a),
        _ => f64::NAN,
    };
    md.push_str(&format!(
        "\nContainer start (ctr run -d → first PONG), rrc minus runc: {start_delta:+.1} ms (medians).\n"
    ));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let doc = serde_json::json!({
        "benchmark": "redis: runc, rrc mode off, rrc passive mode",
        "passive_requests_per_client": args.passive_requests,
        "rounds": args.rounds,
        "requests_per_run": args.requests,
        "date_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "kernel": kernel.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "start_delta_ms": start_delta,
        "results": json_rows,
    });
    std::fs::create_dir_all(&args.out)?;
    let json_path = args.out.join("bench-redis.json");
    let md_path = args.out.join("bench-redis.md");
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)? + "\n")?;
    std::fs::write(&md_path, &md)?;
    println!("{md}");
    println!("wrote {} and {}", json_path.display(), md_path.display());
    Ok(())
}
