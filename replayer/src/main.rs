//! `rrc-replayer`: replay a recorded event log.
//!
//! ```text
//! rrc-replayer --log FILE [--until SEQ] --exec -- CMD [ARGS...]
//! ```
//!
//! Starts CMD the way `rrc-recorder --no-aslr --exec` did (the recorder's filter, stopped
//! before its exec, address-space randomisation off, `rdtsc` trapped) and replays FILE's first
//! segment onto it: every recorded input, clock, randomness and `rdtsc` result is injected,
//! the calls that order threads run at their recorded turn, and once the last record (or
//! record SEQ) is replayed the program runs on live.
//! Prints what it replayed; exits with the program's status, or 3 if the replay diverged (the
//! divergence on stderr: which record, which thread, what the log has, what happened).

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use rrc_recorder::launch;
use rrc_replayer::{Plan, ReplayError, Replayer};

const USAGE: &str = "usage: rrc-replayer --log FILE [--until SEQ] --exec -- CMD [ARGS...]";

fn run() -> Result<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    let (mut log, mut until, mut exec): (Option<String>, Option<u64>, Vec<OsString>) =
        (None, None, Vec::new());
    while let Some(a) = args.next() {
        match a.to_string_lossy().as_ref() {
            "--log" => log = args.next().map(|v| v.to_string_lossy().into_owned()),
            "--until" => {
                let v = args.next().context("--until needs a record number")?;
                until = Some(v.to_string_lossy().parse().context("--until")?);
            }
            "--exec" => {
                exec = args.by_ref().collect();
                if exec.first().is_some_and(|f| f == "--") {
                    exec.remove(0);
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let Some(log) = log else {
        bail!("--log FILE is required\n{USAGE}")
    };
    let Some(program) = exec.first() else {
        bail!("--exec needs a command\n{USAGE}")
    };
    let bytes = std::fs::read(&log).with_context(|| format!("reading {log}"))?;
    let plan = Plan::from_log(&bytes, None).with_context(|| log.clone())?;
    let cmd = launch::Command::new(program)
        .args(&exec[1..])
        .trap_tsc(true)
        .no_aslr(true);
    let pid = launch::spawn_stopped(&cmd)?;
    let mut rep = Replayer::new(rrc_recorder::ptrace::Ptrace, plan, until);
    rep.attach(pid)?;
    match rep.run() {
        Ok(s) => {
            eprintln!(
                "rrc-replayer: replayed {} records ({} results injected, {} calls run at their \
                 turn, {:?} held back for recorded intervals); live after #{}",
                s.applied.values().sum::<u64>(),
                s.injected,
                s.executed,
                s.interval_wait,
                s.live_after.map_or_else(|| "-".into(), |n| n.to_string())
            );
            let code = s.root_exit.unwrap_or(0).clamp(0, 255);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
        }
        Err(ReplayError::Diverged(d)) => {
            eprintln!("rrc-replayer: {d}");
            Ok(ExitCode::from(3))
        }
        Err(e) => Err(e.into()),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rrc-replayer: {e:#}");
            ExitCode::from(125)
        }
    }
}
