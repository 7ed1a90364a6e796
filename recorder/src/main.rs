//! `rrc-recorder`: record a process tree's nondeterministic events.
//!
//! ```text
//! rrc-recorder --pid PID --out FILE [--format eventlog|jsonl] [--container-id ID] [--no-vdso] [--no-rdtsc]
//! rrc-recorder (--pid PID | --pid-fifo FIFO) --out FILE --position-file FILE [--ingress-queue N --netns PATH] [--control-fd FD] [--container-id ID] [--cpu N]
//! rrc-recorder --out FILE [--format eventlog|jsonl] [--container-id ID] [--cpu N] [--no-vdso] [--no-rdtsc] [--no-aslr] --exec -- CMD [ARGS...]
//! rrc-recorder --merge-profile [SECCOMP.json]
//! rrc-recorder verify [--records] FILE
//! ```
//!
//! `--pid` attaches to every thread of PID (running, blocked, or stopped in SIGSTOP, which is
//! then continued) and records until every traced thread has exited; the process's seccomp
//! filter must already trace the syscalls (the shim puts the merged profile into the OCI spec).
//! `--exec` starts CMD under the recorder's own filter and exits with CMD's status
//! (`--no-aslr`: with address-space randomisation off, so that `rrc-replayer` can replay the
//! log on a fresh run).
//! With `--position-file` (how the shim runs it for a replicated container) each record is
//! written to FILE with one `write` and the output's length is then published in that file
//! (see `rrc_recorder::position`), which also says when every thread is attached; with
//! `--pid-fifo FIFO` the pid to attach to is read from FIFO (what the shim's OCI
//! `createRuntime` hook writes, before runc installs the container's seccomp filter); with
//! `--ingress-queue N --netns PATH` the packets entering that network namespace through
//! NFQUEUE N are logged in the same order before the kernel gets them; with `--control-fd FD`
//! the shim's commands arrive on that socket (park the container for a checkpoint, resume it:
//! `rrc_recorder::control`).
//! `--merge-profile` prints the OCI `linux.seccomp` profile merged with the recorder's rules
//! (from the given file, or for a container without a profile) and a report on stderr.
//! Events are written to FILE (`-` for stdout) as rrc's event log (`--format eventlog`, the
//! default: one segment of container ID, default `pid-PID` or `exec`) or as JSON lines
//! (`--format jsonl`, for debugging). `verify` decodes an event log, checks it (structure,
//! checksums, total order, received streams), prints a summary, and exits 1 with every problem
//! found (a truncated or corrupt file: the error and its byte offset). Logging:
//! `RRC_RECORDER_LOG` (error, warn, info, debug, trace; default warn), on stderr.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use rrc_recorder::event::{ExitKind, Sink};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rrc_recorder::control::{Command as ControlCommand, Control, Reply};
use rrc_recorder::position::SharedPosition;
use rrc_recorder::scan::{spawn_scanner, ProcessList};
use rrc_recorder::stream::{scan_report, spawn_ingress, StreamSink};
use rrc_recorder::{launch, profile, EventlogSink, JsonLinesSink, Options, Recorder, Summary};

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

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Format {
    #[default]
    Eventlog,
    Jsonl,
}

#[derive(Default)]
struct Args {
    pid: Option<i32>,
    out: Option<String>,
    format: Format,
    container_id: Option<String>,
    cpu: Option<usize>,
    no_vdso: bool,
    no_rdtsc: bool,
    no_aslr: bool,
    exec: Vec<OsString>,
    merge_profile: Option<Option<String>>,
    position_file: Option<String>,
    pid_fifo: Option<String>,
    ingress_queue: Option<u16>,
    netns: Option<String>,
    control_fd: Option<i32>,
}

const USAGE: &str = "usage: rrc-recorder --pid PID --out FILE [--format eventlog|jsonl] \
     [--container-id ID] [--no-vdso] [--no-rdtsc]\n       \
     rrc-recorder (--pid PID | --pid-fifo FIFO) --out FILE --position-file FILE \
     [--ingress-queue N --netns PATH] [--control-fd FD] [--container-id ID] [--cpu N]\n       \
     rrc-recorder --out FILE [--format eventlog|jsonl] [--container-id ID] [--cpu N] \
     [--no-vdso] [--no-rdtsc] [--no-aslr] --exec -- CMD [ARGS...]\n       \
     rrc-recorder --merge-profile [SECCOMP.json]\n       \
     rrc-recorder verify [--records] FILE";

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
            "--format" => {
                args.format = match value("--format")?.as_str() {
                    "eventlog" => Format::Eventlog,
                    "jsonl" => Format::Jsonl,
                    other => bail!("--format {other}: expected eventlog or jsonl\n{USAGE}"),
                }
            }
            "--container-id" => args.container_id = Some(value("--container-id")?),
            "--cpu" => args.cpu = Some(value("--cpu")?.parse().context("--cpu")?),
            "--position-file" => args.position_file = Some(value("--position-file")?),
            "--pid-fifo" => args.pid_fifo = Some(value("--pid-fifo")?),
            "--ingress-queue" => {
                args.ingress_queue = Some(
                    value("--ingress-queue")?
                        .parse()
                        .context("--ingress-queue")?,
                )
            }
            "--netns" => args.netns = Some(value("--netns")?),
            "--control-fd" => {
                args.control_fd = Some(value("--control-fd")?.parse().context("--control-fd")?)
            }
            "--no-vdso" => args.no_vdso = true,
            "--no-rdtsc" => args.no_rdtsc = true,
            "--no-aslr" => args.no_aslr = true,
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

/// Records with the sink `--format` asks for; `go` runs the recording.
fn with_sink(
    args: &Args,
    default_id: String,
    go: &mut dyn FnMut(&mut dyn Sink) -> Result<Summary>,
) -> Result<Summary> {
    let out = open_out(args.out.as_deref())?;
    match args.format {
        Format::Jsonl => go(&mut JsonLinesSink::new(out)),
        Format::Eventlog => {
            let id = args.container_id.clone().unwrap_or(default_id);
            let mut sink = EventlogSink::new(out, id);
            let summary = go(&mut sink);
            let stats = sink.stats().clone();
            let finished = sink.finish();
            let summary = summary?;
            finished.context("finishing the event log")?;
            report_unrecordable(&stats.unrecordable);
            tracing::info!(
                records = stats.records,
                incomplete = stats.incomplete,
                "event log written"
            );
            Ok(summary)
        }
    }
}

/// Lists on stderr what the recorder saw but could not put into the log.
fn report_unrecordable(what: &[String]) {
    if what.is_empty() {
        return;
    }
    eprintln!(
        "rrc-recorder: {} event(s) could not be recorded (each is a gap record in the log; \
         a replay of an epoch with one may diverge):",
        what.len()
    );
    for w in what {
        eprintln!("  {w}");
    }
}

/// `rrc-recorder verify [--records] FILE`.
fn verify(rest: &[String]) -> Result<ExitCode> {
    let (records, path) = match rest {
        [flag, path] if flag == "--records" => (true, path),
        [path] => (false, path),
        _ => bail!("{USAGE}"),
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    let check = rrc_recorder::check_log(&bytes);
    let mut out = io::stdout().lock();
    // A reader that went away (`| head`) ends the listing, not the verdict below.
    let mut listing = Ok(());
    if records {
        for r in &check.records {
            listing = writeln!(out, "{}", rrc_recorder::eventlog::describe(r));
            if listing.is_err() {
                break;
            }
        }
    }
    if listing.is_ok() {
        let _ = writeln!(out, "{path}: {check}");
    }
    drop(out);
    if check.is_ok() {
        return Ok(ExitCode::SUCCESS);
    }
    for p in check.problems() {
        eprintln!("rrc-recorder verify: {path}: {p}");
    }
    Ok(ExitCode::from(1))
}

fn run() -> Result<ExitCode> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("verify") {
        return verify(&argv[1..]);
    }
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
        let mut cmd = launch::Command::new(&args.exec[0])
            .args(&args.exec[1..])
            .no_aslr(args.no_aslr);
        if let Some(cpu) = args.cpu {
            cmd = cmd.pin_cpu(cpu);
        }
        let summary = with_sink(&args, "exec".into(), &mut |sink| {
            Ok(launch::record_command(&cmd, sink, opts)?.0)
        })?;
        tracing::info!(
            events = summary.events,
            syscalls = summary.syscalls,
            stops = summary.stops,
            "recording done"
        );
        return Ok(exit_code(summary.root_exit));
    }
    let pid = match (args.pid, &args.pid_fifo) {
        (Some(pid), None) => pid,
        (None, Some(fifo)) if args.position_file.is_some() => read_pid(fifo)?,
        (None, Some(_)) => bail!("--pid-fifo needs --position-file\n{USAGE}"),
        (Some(_), Some(_)) => bail!("--pid and --pid-fifo exclude each other\n{USAGE}"),
        (None, None) => {
            bail!("one of --pid, --pid-fifo, --exec or --merge-profile is required\n{USAGE}")
        }
    };
    if let Some(cpu) = args.cpu {
        launch::pin_current_thread(cpu).context("pinning")?;
    }
    if let Some(position) = &args.position_file {
        return record_streaming(&args, pid, position, opts);
    }
    if args.ingress_queue.is_some() || args.netns.is_some() || args.control_fd.is_some() {
        bail!("--ingress-queue, --netns and --control-fd need --position-file\n{USAGE}");
    }
    let summary = with_sink(&args, format!("pid-{pid}"), &mut |sink| {
        let mut rec = Recorder::new(rrc_recorder::ptrace::Ptrace, sink, opts);
        rec.attach(pid)?;
        Ok(rec.run()?)
    })?;
    tracing::info!(
        events = summary.events,
        syscalls = summary.syscalls,
        "recording done"
    );
    Ok(ExitCode::SUCCESS)
}

/// Waits for a pid (decimal text) written to the FIFO at `path`.
fn read_pid(path: &str) -> Result<i32> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{path} gave {:?}, not a pid", text.trim()))?;
    if pid <= 0 {
        bail!("{path} gave pid {pid}");
    }
    Ok(pid)
}

/// How long a command from the shim may take (a park waits for every thread, then the freeze).
const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the shim's commands on the stream socket `fd` (see `rrc_recorder::control`): one line
/// per command, one per answer. When the shim closes it the control closes, and a parked
/// container is resumed.
fn spawn_control(fd: i32) -> Result<Arc<Control>> {
    use std::io::BufRead;
    use std::os::fd::FromRawFd;
    // SAFETY: the shim passes a socket it opened for us as this descriptor; nothing else in
    // this process owns or closes it.
    let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    let mut out = stream.try_clone().context("the control socket")?;
    let control = Arc::new(Control::default());
    let c = control.clone();
    std::thread::Builder::new()
        .name("rrc-control".into())
        .spawn(move || {
            for line in io::BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let reply = match ControlCommand::parse(&line) {
                    Ok(cmd) => c.call(cmd, CONTROL_TIMEOUT),
                    Err(e) => Reply::Error(e),
                };
                if writeln!(out, "{}", reply.line()).is_err() {
                    break;
                }
            }
            c.close();
        })
        .context("starting the control thread")?;
    Ok(control)
}

/// `--pid` with `--position-file`: the recording of a replicated container.
fn record_streaming(args: &Args, pid: i32, position: &str, opts: Options) -> Result<ExitCode> {
    if args.format != Format::Eventlog {
        bail!("--position-file needs --format eventlog");
    }
    let out: Box<dyn Write + Send> = match args.out.as_deref() {
        None => bail!("--out FILE is required\n{USAGE}"),
        Some("-") => Box::new(io::stdout()),
        Some(path) => Box::new(File::create(path).with_context(|| format!("creating {path}"))?),
    };
    let position = Arc::new(
        SharedPosition::open(std::path::Path::new(position))
            .with_context(|| format!("opening the position file {position}"))?,
    );
    position.set_pid(u64::from(std::process::id()));
    let id = args.container_id.clone().unwrap_or(format!("pid-{pid}"));
    let mut sink = StreamSink::new(out, &id, position);
    let stop = Arc::new(AtomicBool::new(false));
    let ingress = match (args.ingress_queue, &args.netns) {
        (Some(queue), Some(netns)) => Some(spawn_ingress(
            std::path::Path::new(netns),
            queue,
            sink.log(),
            stop.clone(),
        )?),
        (None, None) => None,
        _ => bail!("--ingress-queue and --netns go together\n{USAGE}"),
    };
    let control = match args.control_fd {
        Some(fd) => Some(spawn_control(fd)?),
        None => None,
    };
    let processes = Arc::new(ProcessList::default());
    let scanner = spawn_scanner(processes.clone(), scan_report(sink.log()), stop.clone())
        .context("starting the code scanner")?;
    let result = {
        let mut rec = Recorder::new(rrc_recorder::ptrace::Ptrace, &mut sink, opts)
            .with_process_list(processes.clone());
        if let Some(c) = &control {
            rec = rec.with_control(c.clone());
        }
        rec.attach(pid)
            .map_err(anyhow::Error::from)
            .and_then(|()| Ok(rec.run()?))
    };
    stop.store(true, Ordering::SeqCst);
    processes.wake(); // the scanner then sees `stop`
    let _ = scanner.join();
    if let Some(t) = ingress {
        let _ = t.join();
    }
    let stats = sink.stats();
    let summary = result?;
    report_unrecordable(&stats.unrecordable);
    eprintln!(
        "rrc-recorder: recording of {id} ended: {} records ({} ingress packets), {} syscalls",
        stats.records, stats.ingress, summary.syscalls
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
