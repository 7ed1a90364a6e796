//! `containerd-shim-rrc-v2`: the binary containerd runs for `--runtime io.containerd.rrc.v2`.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};
use rrc_shim::service::{options_from_stdin, Service};
use rrc_shim::status::{self, ReplicaStatus};
use rrc_shim::RUNTIME_NAME;

/// `-info`: what containerd's `RuntimeInfo` asks of a shim, with runc's OCI features.
fn info() -> anyhow::Result<()> {
    let opts = options_from_stdin().map_err(|e| anyhow::anyhow!("{e}"))?;
    let runc = if opts.binary_name.is_empty() {
        "runc".to_string()
    } else {
        opts.binary_name.clone()
    };
    let out = std::process::Command::new(&runc)
        .arg("features")
        .output()
        .with_context(|| format!("run {runc} features"))?;
    anyhow::ensure!(
        out.status.success(),
        "{runc} features failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut info = RuntimeInfo {
        name: "containerd-shim-rrc-v2".to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        features: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
                .to_string(),
            value: out.stdout,
            ..Default::default()
        }),
        ..Default::default()
    };
    info.annotations
        .insert("io.containerd.rrc.modes".into(), "off".into());
    let any = Any {
        type_url: "io.containerd.rrc.v2.Info".to_string(),
        value: info.write_to_bytes()?,
        ..Default::default()
    };
    std::io::stdout().write_all(&any.write_to_bytes()?)?;
    Ok(())
}

const STATUS_USAGE: &str = "\
usage: containerd-shim-rrc-v2 status [--state DIR] [--namespace NS] [--json] [CONTAINER_ID]

Shows each replicated container's role, mode, peer, last committed epoch, last checkpoint's
pause and size, and failovers, from the rrc-status.json files in containerd's bundles.

  --state DIR           containerd's state directory (default /run/containerd)
  -n, --namespace NS    only this containerd namespace
  --json                print the statuses as a JSON array (also with CONTAINER_ID)
  CONTAINER_ID          show this container in detail instead of the table

Exit status: 0; 1 when the state directory does not exist or CONTAINER_ID has no readable
status; 2 for a usage error.
";

/// The arguments of the `status` subcommand.
#[derive(Debug, PartialEq)]
struct StatusArgs {
    state: PathBuf,
    namespace: Option<String>,
    json: bool,
    id: Option<String>,
}

/// Parses the arguments after `status`; `None` for `--help`.
fn parse_status_args(args: &[OsString]) -> anyhow::Result<Option<StatusArgs>> {
    let mut a = StatusArgs {
        state: PathBuf::from(status::DEFAULT_STATE_DIR),
        namespace: None,
        json: false,
        id: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let arg = arg
            .to_str()
            .ok_or_else(|| anyhow::anyhow!("argument {arg:?} is not UTF-8"))?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with('-') => (f, Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = |name: &str| -> anyhow::Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .and_then(|v| v.to_str())
                    .map(str::to_string)
                    .ok_or_else(|| anyhow::anyhow!("{name} needs a value")),
            }
        };
        match flag {
            "-h" | "--help" | "-help" => return Ok(None),
            "--state" | "-state" => a.state = PathBuf::from(value("--state")?),
            "--namespace" | "-namespace" | "-n" => a.namespace = Some(value("--namespace")?),
            "--json" | "-json" => a.json = true,
            f if f.starts_with('-') => anyhow::bail!("unknown option {f}"),
            id => {
                if let Some(first) = &a.id {
                    anyhow::bail!("one container id at most (got {first} and {id})");
                }
                a.id = Some(id.to_string());
            }
        }
    }
    Ok(Some(a))
}

/// What `status` prints: its standard output, and warnings for its standard error.
#[derive(Debug, Default)]
struct StatusReport {
    stdout: String,
    warnings: Vec<String>,
}

/// Runs `status`; an error is printed and exits 1.
fn status_report(a: &StatusArgs) -> anyhow::Result<StatusReport> {
    anyhow::ensure!(
        a.state.is_dir(),
        "containerd state directory {} does not exist: is containerd running, and is this its \
         state directory? (pass --state DIR for another one)",
        a.state.display()
    );
    let where_ = match &a.namespace {
        Some(ns) => format!("namespace {ns}"),
        None => "any namespace".to_string(),
    };
    let mut rows = status::scan(&a.state, a.namespace.as_deref());
    let mut report = StatusReport::default();
    if let Some(id) = &a.id {
        rows.retain(|r| status::row_container_id(r) == *id);
        if rows.is_empty() {
            anyhow::bail!(
                "no rrc status for container {id} in {where_} under {}: it does not exist, is \
                 not replicated (mode off), or its shim has not written a status yet",
                a.state.join(status::TASK_DIR).display()
            );
        }
    }
    let mut ok: Vec<&ReplicaStatus> = Vec::new();
    let mut errors = Vec::new();
    for (_, r) in &rows {
        match r {
            Ok(s) => ok.push(s),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if a.id.is_some() && ok.is_empty() {
        anyhow::bail!("{}", errors.join("\n"));
    }
    if a.json {
        report.stdout = serde_json::to_string_pretty(&ok)?;
        report.stdout.push('\n');
        report.warnings = errors;
    } else if a.id.is_some() {
        let views: Vec<String> = ok.iter().map(|s| status::render_detail(s)).collect();
        report.stdout = views.join("\n");
        report.warnings = errors;
    } else if rows.is_empty() {
        report.stdout = format!(
            "no replicated containers in {where_} under {}\n",
            a.state.join(status::TASK_DIR).display()
        );
    } else {
        // Unreadable files are rows of the table.
        report.stdout = status::render_table(&rows);
    }
    Ok(report)
}

/// `status [--state DIR] [--namespace NS] [--json] [CONTAINER_ID]`: the operator view.
fn status_main(args: &[OsString]) -> ExitCode {
    let parsed = match parse_status_args(args) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print_stdout(STATUS_USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("containerd-shim-rrc-v2 status: {e:#}\n\n{STATUS_USAGE}");
            return ExitCode::from(2);
        }
    };
    match status_report(&parsed) {
        Ok(report) => {
            for w in &report.warnings {
                eprintln!("containerd-shim-rrc-v2 status: {w}");
            }
            print_stdout(&report.stdout);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("containerd-shim-rrc-v2 status: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
fn print_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("containerd-shim-rrc-v2 status: write output: {e}");
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    // containerd always passes flags first (`-namespace ns ... start`), never `status`.
    if args.get(1).is_some_and(|a| a == "standby") {
        // A backup task's process while it waits for its primary (see rrc_shim::replica::backup):
        // it does nothing until a signal ends it.
        loop {
            std::thread::park();
        }
    }
    if args.get(1).is_some_and(|a| a == "criu-hook") {
        // Run by CRIU (see rrc_shim::replica::fs): asks the shim to save the writable layer.
        let (Some(socket), Some(action)) = (args.get(2), args.get(3).and_then(|a| a.to_str()))
        else {
            eprintln!("usage: containerd-shim-rrc-v2 criu-hook SOCKET ACTION");
            return ExitCode::from(2);
        };
        return match rrc_shim::replica::fs::run_hook(std::path::Path::new(socket), action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("containerd-shim-rrc-v2 criu-hook: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.get(1).is_some_and(|a| a == "recorder-hook") {
        // Run by runc as a createRuntime hook in hybrid mode (see rrc_shim::replica::hybrid):
        // hands the container's init to its recorder and waits until it is seized.
        let (Some(fifo), Some(position)) = (args.get(2), args.get(3)) else {
            eprintln!("usage: containerd-shim-rrc-v2 recorder-hook FIFO POSITION_FILE");
            return ExitCode::from(2);
        };
        let mut state = String::new();
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut state) {
            eprintln!("containerd-shim-rrc-v2 recorder-hook: reading the OCI state: {e}");
            return ExitCode::FAILURE;
        }
        return match rrc_shim::replica::hybrid::run_hook(
            std::path::Path::new(fifo),
            std::path::Path::new(position),
            &state,
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("containerd-shim-rrc-v2 recorder-hook: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.get(1).is_some_and(|a| a == "status") {
        return status_main(args.get(2..).unwrap_or_default());
    }
    let flags = match containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-rrc-v2: {e}");
            return ExitCode::FAILURE;
        }
    };
    if flags.version {
        println!("containerd-shim-rrc-v2:");
        println!("  Runtime: {RUNTIME_NAME}");
        println!("  Version: {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if flags.info {
        return match info() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("containerd-shim-rrc-v2 -info: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-rrc-v2: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(containerd_shim::asynchronous::run::<Service>(
        RUNTIME_NAME,
        None,
    ));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use rrc_shim::status::{Role, State, TASK_DIR};

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn parse(args: &[&str]) -> StatusArgs {
        parse_status_args(&os(args))
            .expect("parse")
            .expect("not help")
    }

    #[test]
    fn status_args() {
        assert_eq!(
            parse(&[]),
            StatusArgs {
                state: PathBuf::from("/run/containerd"),
                namespace: None,
                json: false,
                id: None
            }
        );
        assert_eq!(
            parse(&["--state", "/s", "-n", "k8s.io", "--json", "c1"]),
            StatusArgs {
                state: PathBuf::from("/s"),
                namespace: Some("k8s.io".into()),
                json: true,
                id: Some("c1".into())
            }
        );
        assert_eq!(
            parse(&["--state=/x", "--namespace=ns"])
                .namespace
                .as_deref(),
            Some("ns")
        );
        assert!(parse_status_args(&os(&["--help"])).expect("help").is_none());
        assert!(parse_status_args(&os(&["--bogus"])).is_err());
        assert!(parse_status_args(&os(&["--state"])).is_err());
        assert!(parse_status_args(&os(&["a", "b"])).is_err());
    }

    fn state_with(ns: &str, id: &str) -> tempfile::TempDir {
        let state = tempfile::tempdir().expect("dir");
        let bundle = state.path().join(TASK_DIR).join(ns).join(id);
        std::fs::create_dir_all(&bundle).expect("bundle");
        let mut s = ReplicaStatus::new(id, ns, "passive", Role::Backup);
        s.set_state(State::InSync, None);
        status::write(&bundle, &s).expect("write");
        state
    }

    fn args(state: &std::path::Path, json: bool, id: Option<&str>) -> StatusArgs {
        StatusArgs {
            state: state.to_path_buf(),
            namespace: None,
            json,
            id: id.map(str::to_string),
        }
    }

    #[test]
    fn status_outputs() {
        let missing = args(std::path::Path::new("/nonexistent/rrc-state"), false, None);
        let e = status_report(&missing).expect_err("no state dir");
        assert!(
            e.to_string()
                .contains("/nonexistent/rrc-state does not exist"),
            "{e}"
        );

        let empty = tempfile::tempdir().expect("dir");
        let r = status_report(&args(empty.path(), false, None)).expect("empty");
        assert!(
            r.stdout.starts_with("no replicated containers"),
            "{}",
            r.stdout
        );
        let r = status_report(&args(empty.path(), true, None)).expect("empty json");
        assert_eq!(r.stdout.trim(), "[]");

        let state = state_with("default", "r1");
        let r = status_report(&args(state.path(), false, None)).expect("table");
        assert!(
            r.stdout.contains("NAMESPACE") && r.stdout.contains("in-sync"),
            "{}",
            r.stdout
        );
        let r = status_report(&args(state.path(), false, Some("r1"))).expect("detail");
        assert!(r.stdout.starts_with("default/r1\n"), "{}", r.stdout);
        assert!(r.stdout.contains("ready to take over"), "{}", r.stdout);
        let r = status_report(&args(state.path(), true, Some("r1"))).expect("json");
        let v: Vec<ReplicaStatus> = serde_json::from_str(&r.stdout).expect("array");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].container_id, "r1");
        let e = status_report(&args(state.path(), false, Some("r2"))).expect_err("no r2");
        assert!(
            e.to_string().contains("no rrc status for container r2"),
            "{e}"
        );

        let bad = state.path().join(TASK_DIR).join("default").join("bad");
        std::fs::create_dir_all(&bad).expect("bad bundle");
        std::fs::write(bad.join(status::STATUS_FILE), "{").expect("bad status");
        let e = status_report(&args(state.path(), false, Some("bad"))).expect_err("bad");
        assert!(e.to_string().contains("not a JSON rrc status file"), "{e}");
        let r = status_report(&args(state.path(), true, None)).expect("json with a bad one");
        assert_eq!(r.warnings.len(), 1);
        let r = status_report(&args(state.path(), false, None)).expect("table with a bad one");
        assert!(r.stdout.contains("unreadable"), "{}", r.stdout);
    }
}
