//! `rrc-recorder`: record a process tree's nondeterministic events.
//!
//! ```text
//! rrc-recorder --pid PID --out FILE [--no-vdso] [--no-rdtsc]
//! rrc-recorder --out FILE [--cpu N] [--no-vdso] [--no-rdtsc] --exec -- CMD [ARGS...]
//! rrc-recorder --merge-profile [SECCOMP.json]
//! ```
//!
//! `--pid` attaches to every thread of PID (running, blocked, or stopped in SIGSTOP, which is
//! then continued) and records until every traced thread has exited; the process's seccomp
//! filter must already trace the syscalls (the shim puts the merged profile into the OCI spec).
//! `--exec` starts CMD under the recorder's own filter and exits with CMD's status.
//! `--merge-profile` prints the OCI `linux.seccomp` profile merged with the recorder's rules
//! (from the given file, or for a container without a profile) and a report on stderr.
//! Events are written as JSON lines to FILE (`-` for stdout). Logging: `RRC_RECORDER_LOG`
//! (error, warn, info, debug, trace; default warn), on stderr.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use rrc_recorder::event::ExitKind;
use rrc_recorder::{launch, profile, JsonLinesSink, Options, Recorder};

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(
                io::stderr(),
                "rrc-recorder {} {}: {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn init_logging() {
    let level = std::env::var("RRC_RECORDER_LOG")
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

#[derive(Default)]
struct Args {
    pid: Option<i32>,
    out: Option<String>,
    cpu: Option<usize>,
    no_vdso: bool,
    no_rdtsc: bool,
    exec: Vec<OsString>,
    merge_profile: Option<Option<String>>,
}

const USAGE: &str = "usage: rrc-recorder --pid PID --out FILE [--no-vdso] [--no-rdtsc]\n       \
     rrc-recorder --out FILE [--cpu N] [--no-vdso] [--no-rdtsc] --exec -- CMD [ARGS...]\n       \
     rrc-recorder --merge-profile [SECCOMP.json]";

fn parse_args() -> Result<Args> {
    let mut args = Args::default();
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        let mut value = |name: &str| -> Result<String> {
            it.next()
                .map(|v| v.to_string_lossy().into_owned())
                .with_context(|| format!("{name} needs a value"))
        };
        match s.as_str() {
            "--pid" => args.pid = Some(value("--pid")?.parse().context("--pid")?),
            "--out" => args.out = Some(value("--out")?),
            "--cpu" => args.cpu = Some(value("--cpu")?.parse().context("--cpu")?),
            "--no-vdso" => args.no_vdso = true,
            "--no-rdtsc" => args.no_rdtsc = true,
            "--merge-profile" => {
                args.merge_profile = Some(it.next().map(|v| v.to_string_lossy().into_owned()))
            }
            "--exec" => {
                let rest: Vec<OsString> = it.by_ref().collect();
                args.exec = match rest.first() {
                    Some(f) if f == "--" => rest[1..].to_vec(),
                    _ => rest,
                };
                if args.exec.is_empty() {
                    bail!("--exec needs a command\n{USAGE}");
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(args)
}

fn open_out(out: Option<&str>) -> Result<Box<dyn Write>> {
    match out {
        None => bail!("--out FILE is required\n{USAGE}"),
        Some("-") => Ok(Box::new(BufWriter::new(io::stdout()))),
        Some(path) => Ok(Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("creating {path}"))?,
        ))),
    }
}

fn exit_code(how: Option<ExitKind>) -> ExitCode {
    match how {
        Some(ExitKind::Exited(c)) => ExitCode::from(c.clamp(0, 255) as u8),
        Some(ExitKind::Killed(sig)) => ExitCode::from((128 + sig).clamp(0, 255) as u8),
        _ => ExitCode::SUCCESS,
    }
}

fn run() -> Result<ExitCode> {
    let args = parse_args()?;
    let opts = Options {
        patch_vdso: !args.no_vdso,
        trap_rdtsc: !args.no_rdtsc && !args.no_vdso,
    };
    if let Some(file) = args.merge_profile {
        let container = match file {
            Some(f) => {
                let text = std::fs::read_to_string(&f).with_context(|| format!("reading {f}"))?;
                Some(serde_json::from_str(&text).with_context(|| format!("parsing {f}"))?)
            }
            None => None,
        };
        let merged = profile::merge(container.as_ref())?;
        println!("{}", serde_json::to_string_pretty(&merged.profile)?);
        eprintln!("traced: {}", merged.traced.join(" "));
        eprintln!("partly traced: {}", merged.partly_traced.join(" "));
        eprintln!("denied by the profile: {}", merged.denied.join(" "));
        for (name, why) in &merged.untraced {
            eprintln!("NOT traced: {name}: {why}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !args.exec.is_empty() {
        let sink = JsonLinesSink::new(open_out(args.out.as_deref())?);
        let mut cmd = launch::Command::new(&args.exec[0]).args(&args.exec[1..]);
        if let Some(cpu) = args.cpu {
            cmd = cmd.pin_cpu(cpu);
        }
        let (summary, _) = launch::record_command(&cmd, sink, opts)?;
        tracing::info!(
            events = summary.events,
            syscalls = summary.syscalls,
            stops = summary.stops,
            "recording done"
        );
        return Ok(exit_code(summary.root_exit));
    }
    let Some(pid) = args.pid else {
        bail!("one of --pid, --exec or --merge-profile is required\n{USAGE}");
    };
    if let Some(cpu) = args.cpu {
        launch::pin_current_thread(cpu).context("pinning")?;
    }
    let sink = JsonLinesSink::new(open_out(args.out.as_deref())?);
    let mut rec = Recorder::new(rrc_recorder::ptrace::Ptrace, sink, opts);
    rec.attach(pid)?;
    let summary = rec.run()?;
    tracing::info!(
        events = summary.events,
        syscalls = summary.syscalls,
        "recording done"
    );
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    init_logging();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rrc-recorder: {e:#}");
            ExitCode::from(125)
        }
    }
}
