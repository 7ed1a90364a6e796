//! `rrc-bench`: rrc mode `off` against containerd's runc shim, alternating in the same run.
//!
//! Two test hosts: `server` (its own containerd) and `client`. For each round and each runtime
//! (`io.containerd.runc.v2`, `io.containerd.rrc.v2`) it measures
//! * container start: from `ctr run -d` to the first PONG from redis, seen from the client host;
//! * redis GET/SET throughput and latency with redis-benchmark from the client host, with 1 and
//!   with 50 clients.
//!
//! It prints medians and rrc/runc ratios and writes them to `integration/results/` as JSON (the
//! data) and Markdown (the table the README shows). Usage:
//! `rrc-bench [--rounds N] [--requests N] [--out DIR]`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rrc_integration::{wait_for, TestBed};

const RUNTIMES: [(&str, &str); 2] = [
    ("runc", "io.containerd.runc.v2"),
    ("rrc-off", "io.containerd.rrc.v2"),
];

struct Args {
    rounds: usize,
    requests: u32,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        rounds: 5,
        requests: 20_000,
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => a.rounds = value()?.parse().context("--rounds")?,
            "--requests" => a.requests = value()?.parse().context("--requests")?,
            "--out" => a.out = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!("usage: rrc-bench [--rounds N] [--requests N] [--out DIR]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}; see --help"),
        }
    }
    anyhow::ensure!(
        a.rounds > 0 && a.requests > 0,
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
        .command("redis-cli")
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
            let out = bed
                .host("client")
                .command("redis-benchmark")
                .args(["-h", &ip, "-q", "--csv", "-t", "set,get", "-P", "1"])
                .args(["-c", &clients.to_string(), "-n", &args.requests.to_string()])
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
    let mut samples = Samples::new();
    for round in 0..args.rounds {
        one_round(&bed, &args, round, &mut samples).with_context(|| {
            format!(
                "round {round}\n{}",
                bed.host("server").containerd_log_tail()
            )
        })?;
    }
    drop(bed);

    let metrics: std::collections::BTreeSet<String> =
        samples.keys().map(|(_, m)| m.clone()).collect();
    let mut json_rows = Vec::new();
    let mut md = String::new();
    md.push_str(
        "| metric | runc (median) | rrc mode off (median) | rrc / runc |\n|---|---|---|---|\n",
    );
    for m in &metrics {
        let base = samples.get(&("runc".into(), m.clone())).map(|v| median(v));
        let rrc = samples
            .get(&("rrc-off".into(), m.clone()))
            .map(|v| median(v));
        if let (Some(b), Some(r)) = (base, rrc) {
            let ratio = r / b;
            md.push_str(&format!("| {m} | {b:.2} | {r:.2} | {ratio:.3} |\n"));
            json_rows.push(serde_json::json!({
                "metric": m, "runc_median": b, "rrc_off_median": r, "ratio": ratio,
                "runc_samples": samples.get(&("runc".into(), m.clone())),
                "rrc_off_samples": samples.get(&("rrc-off".into(), m.clone())),
            }));
        }
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
        "benchmark": "mode off vs runc",
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
    let json_path = args.out.join("bench-mode-off.json");
    let md_path = args.out.join("bench-mode-off.md");
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)? + "\n")?;
    std::fs::write(&md_path, &md)?;
    println!("{md}");
    println!("wrote {} and {}", json_path.display(), md_path.display());
    Ok(())
}
