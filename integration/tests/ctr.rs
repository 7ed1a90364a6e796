//! End-to-end tests of `containerd-shim-rrc-v2` through `ctr`: a real containerd (one per test, in
//! its own test bed), real runc, the shim built by `cargo build`.
//!
//! Run as root: `cargo build && cargo test -p rrc-integration --test ctr -- --test-threads=2`.
//! Without root or containerd the tests print `SKIPPED: …` and pass (unless
//! `RRC_REQUIRE_INTEGRATION=1`).

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rrc_integration::{
    image, integration_unavailable, mounts_under, output_with_timeout, wait_for, Host, TestBed,
    RRC_RUNTIME, RUNC_RUNTIME,
};

/// A bed with one host "h" running containerd, or None (after printing why) when the
/// integration tests cannot run here.
fn one_host_bed() -> Result<Option<TestBed>> {
    if let Some(why) = integration_unavailable() {
        eprintln!("SKIPPED: {why}");
        return Ok(None);
    }
    let mut bed = TestBed::new(&["h"])?;
    bed.host_mut("h").start_containerd("")?;
    Ok(Some(bed))
}

macro_rules! bed_or_skip {
    () => {
        match one_host_bed()? {
            Some(bed) => bed,
            None => return Ok(()),
        }
    };
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What a command printed, for failure messages.
fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        text(&out.stdout).trim_end(),
        text(&out.stderr).trim_end()
    )
}

/// `ctr run --rm --runtime RUNTIME [extra...] busybox ID args...`, in the foreground.
fn run_rm(h: &Host, runtime: &str, extra: &[&str], id: &str, args: &[&str]) -> Result<Output> {
    let busybox = image("busybox");
    let mut a = vec!["run", "--rm", "--runtime", runtime];
    a.extend_from_slice(extra);
    a.push(&busybox);
    a.push(id);
    a.extend_from_slice(args);
    h.ctr_timeout(&a, Duration::from_secs(60))
}

/// `ctr run --rm` under rrc's shim must fail with stderr containing every one of `wants`, run
/// nothing, and leave nothing behind.
fn expect_refused(h: &Host, id: &str, extra: &[&str], args: &[&str], wants: &[&str]) -> Result<()> {
    let out = run_rm(h, RRC_RUNTIME, extra, id, args)?;
    let stderr = text(&out.stderr);
    ensure!(
        !out.status.success()
            && wants.iter().all(|w| stderr.contains(w))
            && !text(&out.stdout).contains("should-not-run"),
        "{id}: wanted a failure naming {wants:?}: {}\n{}",
        show(&out),
        h.containerd_log_tail()
    );
    assert_clean(h, id)
}

/// `ctr run -d --runtime RUNTIME [extra...] busybox ID args...`.
fn run_detached(h: &Host, runtime: &str, extra: &[&str], id: &str, args: &[&str]) -> Result<()> {
    let busybox = image("busybox");
    let mut a = vec!["run", "-d", "--runtime", runtime];
    a.extend_from_slice(extra);
    a.push(&busybox);
    a.push(id);
    a.extend_from_slice(args);
    h.ctr_ok(&a).map(|_| ())
}

/// Spawns a `ctr` command that blocks (a foreground run or exec) on a thread; join for its output.
fn spawn_ctr(h: &Host, args: &[&str]) -> JoinHandle<Result<Output>> {
    let mut cmd = h.ctr_command(args);
    std::thread::spawn(move || output_with_timeout(&mut cmd, Duration::from_secs(90)))
}

fn join(t: JoinHandle<Result<Output>>) -> Result<Output> {
    match t.join() {
        Ok(r) => r,
        Err(_) => bail!("the thread running ctr panicked"),
    }
}

/// (pid, status) of task `id` per `ctr tasks ls`, None when it is not listed.
fn task(h: &Host, id: &str) -> Result<Option<(u32, String)>> {
    let out = h.ctr_ok(&["tasks", "ls"])?;
    for line in out.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [tid, pid, status, ..] = f.as_slice() {
            if *tid == id {
                return Ok(Some((
                    pid.parse().with_context(|| format!("pid in {line:?}"))?,
                    status.to_string(),
                )));
            }
        }
    }
    Ok(None)
}

/// Waits until task `id` has `status`; returns its pid.
fn wait_status(h: &Host, id: &str, status: &str) -> Result<u32> {
    wait_for(Duration::from_secs(20), || match task(h, id)? {
        Some((pid, s)) if s == status => Ok(pid),
        other => bail!("task {id} is {other:?}, waiting for {status}"),
    })
    .with_context(|| h.containerd_log_tail())
}

/// The pids `ctr tasks ps ID` lists.
fn task_pids(h: &Host, id: &str) -> Result<Vec<u32>> {
    let out = h.ctr_ok(&["tasks", "ps", id])?;
    out.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(|p| p.parse().with_context(|| format!("pid {p:?} in {out:?}")))
        .collect()
}

fn listed(h: &Host, what: &str, id: &str) -> Result<bool> {
    let out = h.ctr_ok(&[what, "ls", "-q"])?;
    Ok(out.lines().any(|l| l.trim() == id))
}

/// Pids of rrc shim daemons serving container `id` of this host's containerd.
fn shim_pids(h: &Host, id: &str) -> Vec<i32> {
    let sock = h.containerd_socket().display().to_string();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with("containerd-shim-rrc-v2"));
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        if is_shim
            && after("-id").as_deref() == Some(id)
            && after("-address").as_deref() == Some(sock.as_str())
        {
            pids.push(pid);
        }
    }
    pids
}

/// The ids runc knows in this host's rrc runc root.
fn runc_ids(h: &Host) -> Result<Vec<String>> {
    let root = h.runc_root();
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut c = Command::new("runc");
    c.arg("--root")
        .arg(&root)
        .args(["list", "-q"])
        .stdin(Stdio::null());
    let out = output_with_timeout(&mut c, Duration::from_secs(15))?;
    ensure!(out.status.success(), "runc list: {}", show(&out));
    Ok(text(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect())
}

/// Nothing of container `id` is left: no task, no container, no mount under its bundle, no runc
/// state, no shim.
fn assert_clean(h: &Host, id: &str) -> Result<()> {
    wait_for(Duration::from_secs(15), || {
        ensure!(!listed(h, "tasks", id)?, "task {id} is still listed");
        ensure!(
            !listed(h, "containers", id)?,
            "container {id} is still listed"
        );
        let mounts = mounts_under(&h.bundle_dir(id));
        ensure!(mounts.is_empty(), "still mounted: {mounts:?}");
        ensure!(
            !runc_ids(h)?.iter().any(|i| i == id),
            "runc still knows {id}"
        );
        let shims = shim_pids(h, id);
        ensure!(shims.is_empty(), "shim of {id} still runs: {shims:?}");
        Ok(())
    })
    .with_context(|| format!("{id} left something behind\n{}", h.containerd_log_tail()))
}

/// Kills (SIGKILL), deletes the task and the container, and checks nothing is left.
fn kill_and_remove(h: &Host, id: &str) -> Result<()> {
    h.ctr_ok(&["tasks", "kill", "-a", "-s", "SIGKILL", id])?;
    wait_status(h, id, "STOPPED")?;
    h.ctr_ok(&["tasks", "delete", id])?;
    h.ctr_ok(&["containers", "delete", id])?;
    assert_clean(h, id)
}

/// Shell-quotes one word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `ctr args...` under `script` (a pty for ctr's own stdin/stdout, which `-t` needs).
fn ctr_in_pty(h: &Host, args: &[&str]) -> Result<Output> {
    let ctr = h.ctr_command(args);
    let mut line = sh_quote(&ctr.get_program().to_string_lossy());
    for a in ctr.get_args() {
        line.push(' ');
        line.push_str(&sh_quote(&a.to_string_lossy()));
    }
    let mut c = Command::new("script");
    c.args(["-qec", &line, "/dev/null"]).stdin(Stdio::null());
    output_with_timeout(&mut c, Duration::from_secs(60))
}

// ------------------------------------------------------------------------------------------

/// `ctr run --rm busybox cat` with two lines on stdin prints them and ends.
fn stdin_reaches_cat(h: &Host, runtime: &str) -> Result<()> {
    let busybox = image("busybox");
    let args = [
        "run",
        "--rm",
        "--runtime",
        runtime,
        &busybox,
        "stdin",
        "cat",
    ];
    let mut c = h.ctr_command(&args);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().context("spawn ctr run cat")?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, b"line 1\nline 2\n")?;
        // Dropping it closes ctr's stdin.
    }
    let t = std::thread::spawn(move || child.wait_with_output());
    let finished = wait_for(Duration::from_secs(30), || {
        ensure!(t.is_finished(), "ctr run cat has not finished");
        Ok(())
    });
    if finished.is_err() {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let out = match t.join() {
        Ok(r) => r?,
        Err(_) => bail!("the thread waiting for ctr panicked"),
    };
    finished.with_context(|| format!("cat never saw the end of its stdin: {}", show(&out)))?;
    ensure!(
        out.status.success() && out.stdout == b"line 1\nline 2\n",
        "cat: {}\n{}",
        show(&out),
        h.containerd_log_tail()
    );
    Ok(())
}

/// Output and exit statuses of foreground `ctr run --rm` under `runtime`.
fn echo_and_exit_codes(runtime: &str) -> Result<()> {
    let bed = bed_or_skip!();
    let h = bed.host("h");
    let log = || h.containerd_log_tail();

    let out = run_rm(h, runtime, &[], "echo", &["echo", "hello", "world"])?;
    ensure!(
        out.status.success() && out.stdout == b"hello world\n",
        "echo: {}\n{}",
        show(&out),
        log()
    );

    let out = run_rm(
        h,
        runtime,
        &[],
        "streams",
        &["sh", "-c", "echo out; echo err >&2"],
    )?;
    ensure!(
        out.status.success() && out.stdout == b"out\n" && text(&out.stderr).contains("err\n"),
        "stdout/stderr: {}\n{}",
        show(&out),
        log()
    );

    // A lot of output, all of it, in order, up to the exit.
    let out = run_rm(h, runtime, &[], "seq", &["seq", "1", "20000"])?;
    let want: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    ensure!(
        out.status.success() && text(&out.stdout) == want,
        "seq 1 20000: status {}, {} bytes of {} expected; stderr {}\n{}",
        out.status,
        out.stdout.len(),
        want.len(),
        text(&out.stderr),
        log()
    );

    // stdin reaches the container, and its end too. (Only checked with rrc: with the stock runc
    // shim, the end of stdin reaches `cat` only through ctr's CloseIO, which ctr 1.6 does not
    // always send when stdin ends before the task has started.)
    if runtime == RRC_RUNTIME {
        stdin_reaches_cat(h, runtime)?;
    }

    let out = run_rm(h, runtime, &[], "exit3", &["sh", "-c", "exit 3"])?;
    ensure!(
        out.status.code() == Some(3),
        "exit 3: {}\n{}",
        show(&out),
        log()
    );

    // SIGKILL from outside: ctr run exits with 128+9.
    let busybox = image("busybox");
    let t = spawn_ctr(
        h,
        &[
            "run",
            "--rm",
            "--runtime",
            runtime,
            &busybox,
            "killed",
            "sleep",
            "60",
        ],
    );
    wait_status(h, "killed", "RUNNING")?;
    h.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "killed"])?;
    let out = join(t)?;
    ensure!(
        out.status.code() == Some(137),
        "SIGKILL: {}\n{}",
        show(&out),
        log()
    );

    // SIGTERM. A pid namespace's init ignores every signal it has no handler for, except
    // SIGKILL/SIGSTOP, so the container runs in the root pid namespace here (runc opens the
    // path as itself: /proc/self/ns/pid is runc's, the root one) and the sleep dies of SIGTERM.
    let t = spawn_ctr(
        h,
        &[
            "run",
            "--rm",
            "--runtime",
            runtime,
            "--with-ns",
            "pid:/proc/self/ns/pid",
            &busybox,
            "termed",
            "sleep",
            "60",
        ],
    );
    wait_status(h, "termed", "RUNNING")?;
    h.ctr_ok(&["tasks", "kill", "termed"])?;
    let out = join(t)?;
    ensure!(
        out.status.code() == Some(143),
        "SIGTERM: {}\n{}",
        show(&out),
        log()
    );

    for id in ["echo", "streams", "seq", "exit3", "killed", "termed"] {
        ensure!(!listed(h, "containers", id)?, "--rm left container {id}");
        let mounts = mounts_under(&h.bundle_dir(id));
        ensure!(mounts.is_empty(), "{id} still mounted: {mounts:?}");
    }
    Ok(())
}

#[test]
fn rrc_echo_and_exit_codes() -> Result<()> {
    echo_and_exit_codes(RRC_RUNTIME)
}

/// The same with containerd's stock runc shim: the bed itself works.
#[test]
fn runc_reference_echo_and_exit_codes() -> Result<()> {
    echo_and_exit_codes(RUNC_RUNTIME)
}

/// Both ways of putting a container into its host's network namespace work.
#[test]
fn container_joins_host_netns() -> Result<()> {
    let bed = bed_or_skip!();
    let h = bed.host("h");
    let ino = std::fs::metadata(h.netns_path())?.ino();
    let want = format!("net:[{ino}]");
    let with_ns = h.ctr_run_args_net();
    let with_ns: Vec<&str> = with_ns.iter().map(String::as_str).collect();
    for (id, extra) in [
        ("withns", with_ns.as_slice()),
        ("nethost", &["--net-host"][..]),
    ] {
        let out = run_rm(
            h,
            RRC_RUNTIME,
            extra,
            id,
            &[
                "sh",
                "-c",
                "readlink /proc/self/ns/net; ip -4 addr show eth0",
            ],
        )?;
        let stdout = text(&out.stdout);
        ensure!(
            out.status.success()
                && stdout.lines().next() == Some(want.as_str())
                && stdout.contains(&format!("inet {}/15", h.ip())),
            "{id}: wanted {want} with {}: {}",
            h.ip(),
            show(&out)
        );
    }
    // Without either: a fresh network namespace.
    let out = run_rm(
        h,
        RRC_RUNTIME,
        &[],
        "ownns",
        &["readlink", "/proc/self/ns/net"],
    )?;
    ensure!(
        out.status.success() && text(&out.stdout).trim() != want,
        "own netns: {}",
        show(&out)
    );
    Ok(())
}

/// `ctr run -d`, exec (output, exit codes), ps, kill, kill -a, delete.
#[test]
fn detached_exec_ps_kill_delete() -> Result<()> {
    let bed = bed_or_skip!();
    let h = bed.host("h");
    let log = || h.containerd_log_tail();

    run_detached(
        h,
        RRC_RUNTIME,
        &[],
        "d1",
        &["sh", "-c", "sleep 1000 & exec sleep 1000"],
    )?;
    let pid = wait_status(h, "d1", "RUNNING")?;
    let pids = wait_for(Duration::from_secs(10), || {
        let p = task_pids(h, "d1")?;
        ensure!(p.len() == 2, "ps shows {p:?}");
        Ok(p)
    })?;
    ensure!(pids.contains(&pid), "ps {pids:?} lacks init {pid}");

    let out = h.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "d1",
        "sh",
        "-c",
        "echo hi; exit 5",
    ])?;
    ensure!(
        out.status.code() == Some(5) && out.stdout == b"hi\n",
        "exec e1: {}\n{}",
        show(&out),
        log()
    );
    // An exec is not a pid namespace's init: it can die of any signal.
    let out = h.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e2",
        "d1",
        "sh",
        "-c",
        "kill -TERM $$",
    ])?;
    ensure!(out.status.code() == Some(143), "exec e2: {}", show(&out));
    let out = h.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e3",
        "d1",
        "sh",
        "-c",
        "kill -KILL $$",
    ])?;
    ensure!(out.status.code() == Some(137), "exec e3: {}", show(&out));
    // An exec id can be used again once its exec is gone.
    let out = h.ctr(&["tasks", "exec", "--exec-id", "e1", "d1", "true"])?;
    ensure!(out.status.success(), "exec e1 again: {}", show(&out));

    // A long exec shows up in ps; killing it by exec id ends its ctr with 137.
    let t = spawn_ctr(
        h,
        &["tasks", "exec", "--exec-id", "long", "d1", "sleep", "300"],
    );
    wait_for(Duration::from_secs(10), || {
        let p = task_pids(h, "d1")?;
        ensure!(p.len() == 3, "ps shows {p:?}");
        Ok(())
    })?;
    h.ctr_ok(&["tasks", "kill", "--exec-id", "long", "-s", "SIGKILL", "d1"])?;
    let out = join(t)?;
    ensure!(out.status.code() == Some(137), "exec long: {}", show(&out));
    wait_for(Duration::from_secs(10), || {
        let p = task_pids(h, "d1")?;
        ensure!(p.len() == 2, "ps shows {p:?}");
        Ok(())
    })?;

    // A task that handles SIGTERM: plain `ctr tasks kill` stops it; delete reports its status.
    run_detached(
        h,
        RRC_RUNTIME,
        &[],
        "d2",
        &[
            "sh",
            "-c",
            "trap 'exit 7' TERM; while :; do sleep 0.1; done",
        ],
    )?;
    wait_status(h, "d2", "RUNNING")?;
    // Let sh install its trap before the signal comes.
    std::thread::sleep(Duration::from_millis(300));
    h.ctr_ok(&["tasks", "kill", "d2"])?;
    wait_status(h, "d2", "STOPPED")?;
    let out = h.ctr(&["tasks", "delete", "d2"])?;
    ensure!(
        out.status.success() && text(&out.stderr).contains("exit code 7"),
        "delete d2: {}",
        show(&out)
    );
    ensure!(task(h, "d2")?.is_none(), "d2 still listed after delete");
    h.ctr_ok(&["containers", "delete", "d2"])?;
    assert_clean(h, "d2")?;

    // Deleting a running task is refused; kill -a kills every process of the container.
    let out = h.ctr(&["tasks", "delete", "d1"])?;
    ensure!(
        !out.status.success(),
        "deleting a running task: {}",
        show(&out)
    );
    h.ctr_ok(&["tasks", "kill", "-a", "-s", "SIGKILL", "d1"])?;
    wait_status(h, "d1", "STOPPED")?;
    for p in &pids {
        wait_for(Duration::from_secs(10), || {
            ensure!(
                !std::path::Path::new(&format!("/proc/{p}")).exists() || zombie(*p),
                "process {p} of d1 still alive"
            );
            Ok(())
        })?;
    }
    let out = h.ctr(&["tasks", "delete", "d1"])?;
    ensure!(
        out.status.success() && text(&out.stderr).contains("exit code 137"),
        "delete d1: {}",
        show(&out)
    );
    h.ctr_ok(&["containers", "delete", "d1"])?;
    assert_clean(h, "d1")
}

/// Removes a dead shim's socket file when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if std::os::unix::net::UnixStream::connect(&self.0).is_err() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// A terminal for `ctr run -t` and `ctr tasks exec -t`.
#[test]
fn tty_run_and_exec() -> Result<()> {
    let bed = bed_or_skip!();
    let h = bed.host("h");
    let busybox = image("busybox");
    let out = ctr_in_pty(
        h,
        &[
            "run",
            "--rm",
            "-t",
            "--runtime",
            RRC_RUNTIME,
            &busybox,
            "tty1",
            "sh",
            "-c",
            "tty; echo ok",
        ],
    )?;
    let stdout = text(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("/dev/pts/0") && stdout.contains("ok"),
        "run -t: {}\n{}",
        show(&out),
        h.containerd_log_tail()
    );
    // script -e passes the exit status on.
    let out = ctr_in_pty(
        h,
        &[
            "run",
            "--rm",
            "-t",
            "--runtime",
            RRC_RUNTIME,
            &busybox,
            "tty2",
            "sh",
            "-c",
            "exit 4",
        ],
    )?;
    ensure!(
        out.status.code() == Some(4),
        "run -t exit 4: {}",
        show(&out)
    );

    run_detached(h, RRC_RUNTIME, &[], "tty3", &["sleep", "300"])?;
    wait_status(h, "tty3", "RUNNING")?;
    let out = ctr_in_pty(
        h,
        &[
            "tasks",
            "exec",
            "-t",
            "--exec-id",
            "t1",
            "tty3",
            "sh",
            "-c",
            "tty; echo exec-ok",
        ],
    )?;
    let stdout = text(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("/dev/pts/") && stdout.contains("exec-ok"),
        "exec -t: {}\n{}",
        show(&out),
        h.containerd_log_tail()
    );
    kill_and_remove(h, "tty3")?;
    assert_clean(h, "tty1")?;
    assert_clean(h, "tty2")
}

/// `ctr tasks pause` / `resume`.
#[test]
fn pause_resume() -> Result<()> {
    let bed = bed_or_skip!();
    let h = bed.host("h");
    run_detached(
        h,
        RRC_RUNTIME,
        &[],
        "p1",
        &[
            "sh",
            "-c",
            "while :; do date +%s%N > /tmp/tick; sleep 0.05; done",
        ],
    )?;
    wait_status(h, "p1", "RUNNING")?;
    h.ctr_ok(&["tasks", "pause", "p1"])?;
    wait_status(h, "p1", "PAUSED")?;
    // Frozen: the ticker file (read through the rootfs mount of the bundle) does not move.
    let tick_file = h.bundle_dir("p1").join("rootfs/tmp/tick");
    let tick = || std::fs::read_to_string(&tick_file).unwrap_or_default();
    let a = tick();
    std::thread::sleep(Duration::from_millis(400));
    ensure!(tick() == a, "the ticker moved while the task was paused");
    let out = h.ctr_timeout(
        &["tasks", "exec", "--exec-id", "x", "p1", "true"],
        Duration::from_secs(20),
    )?;
    ensure!(
        !out.status.success(),
        "exec into a paused task: {}",
        show(&out)
    );
    h.ctr_ok(&["tasks", "resume", "p1"])?;
    wait_status(h, "p1", "RUNNING")?;
    wait_for(Duration::from_secs(5), || {
        ensure!(tick() != a, "the ticker does not move after resume");
        Ok(())
    })?;
    kill_and_remove(h, "p1")
}

/// `ctr tasks metrics` on cgroup v1.
#[test]
fn metrics_show_memory() -> Result<()> {
    let bed = bed_or_skip!();
    let h = bed.host("h");
    run_detached(h, RRC_RUNTIME, &[], "m1", &["sleep", "300"])?;
    wait_status(h, "m1", "RUNNING")?;
    let out = h.ctr_ok(&["tasks", "metrics", "m1"])?;
    let usage = out
        .lines()
        .find_map(|l| l.strip_prefix("memory.usage_in_bytes"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    ensure!(usage.is_some_and(|u| u > 0), "no memory usage in:\n{out}");
    let json = h.ctr_ok(&["tasks", "metrics", "--format", "json", "m1"])?;
    let v: serde_json::Value = serde_json::from_str(&json).context("metrics JSON")?;
    let mem = v["memory"]["usage"]["usage"].as_u64().unwrap_or(0);
    ensure!(mem > 0, "no memory.usage.usage in {json}");
    ensure!(
        v["pids"]["current"].as_u64().unwrap_or(0) >= 1,
        "no pids.current in {json}"
    );
    // cgroup v1 (these machines): CPU usage from cpuacct and the memory limit are reported too.
    if std::path::Path::new("/sys/fs/cgroup/cpuacct").is_dir() {
        ensure!(
            v["cpu"]["usage"]["total"].as_u64().unwrap_or(0) > 0,
            "no cpu.usage.total in {json}"
        );
        ensure!(
            v["memory"]["usage"]["limit"].as_u64().unwrap_or(0) > 0,
            "no memory.usage.limit in {json}"
        );
    }
    kill_and_remove(h, "m1")
}

/// A shim killed with SIGKILL: containerd notices and cleans up through `shim delete`.
#[test]
fn shim_killed() -> Result<()> {
    let bed = bed_or_skip!();
    let h = bed.host("h");
    run_detached(h, RRC_RUNTIME, &[], "k1", &["sleep", "300"])?;
    let pid = wait_status(h, "k1", "RUNNING")?;
    ensure!(
        !mounts_under(&h.bundle_dir("k1")).is_empty(),
        "the rootfs of k1 is not mounted under its bundle"
    );
    ensure!(
        runc_ids(h)?.iter().any(|i| i == "k1"),
        "runc does not know k1"
    );
    let shims = shim_pids(h, "k1");
    ensure!(shims.len() == 1, "shims of k1: {shims:?}");
    // Neither containerd 1.6 nor its shims' `delete` remove a killed shim's socket (the stock
    // runc shim leaves it too): the test removes it itself.
    let socket = std::fs::read_to_string(h.bundle_dir("k1").join("address"))?
        .trim()
        .trim_start_matches("unix://")
        .to_string();
    let _remove_socket = RemoveOnDrop(socket.into());
    for s in &shims {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*s),
            nix::sys::signal::Signal::SIGKILL,
        )?;
    }
    // containerd sees the shim go and cleans up; the task stops or disappears.
    wait_for(Duration::from_secs(20), || match task(h, "k1")? {
        None => Ok(()),
        Some((_, s)) if s == "STOPPED" || s == "UNKNOWN" => Ok(()),
        Some((_, s)) => bail!("task k1 is still {s}"),
    })
    .with_context(|| h.containerd_log_tail())?;
    if task(h, "k1")?.is_some() {
        h.ctr_ok(&["tasks", "delete", "-f", "k1"])?;
    }
    h.ctr_ok(&["containers", "delete", "k1"])?;
    assert_clean(h, "k1")?;
    wait_for(Duration::from_secs(10), || {
        ensure!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists() || zombie(pid),
            "the container's process {pid} survived its shim"
        );
        Ok(())
    })?;
    // The id can be used again.
    let out = run_rm(h, RRC_RUNTIME, &[], "k1", &["echo", "again"])?;
    ensure!(
        out.status.success() && out.stdout == b"again\n",
        "k1 again: {}",
        show(&out)
    );
    Ok(())
}

/// containerd restarted while a task runs: the task survives and stays manageable.
#[test]
fn containerd_restart_keeps_tasks() -> Result<()> {
    let Some(mut bed) = one_host_bed()? else {
        return Ok(());
    };
    {
        let h = bed.host("h");
        run_detached(h, RRC_RUNTIME, &[], "r1", &["sleep", "300"])?;
    }
    let pid = wait_status(bed.host("h"), "r1", "RUNNING")?;
    let before = Instant::now();
    bed.host_mut("h").restart_containerd()?;
    eprintln!("containerd restarted in {:?}", before.elapsed());
    let h = bed.host("h");
    let after = wait_status(h, "r1", "RUNNING")?;
    ensure!(after == pid, "r1's pid changed from {pid} to {after}");
    let out = h.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "x",
        "r1",
        "sh",
        "-c",
        "echo hi; exit 2",
    ])?;
    ensure!(
        out.status.code() == Some(2) && out.stdout == b"hi\n",
        "exec after restart: {}\n{}",
        show(&out),
        h.containerd_log_tail()
    );
    // New containers work too.
    let out = run_rm(h, RRC_RUNTIME, &[], "r2", &["echo", "new"])?;
    ensure!(
        out.status.success() && out.stdout == b"new\n",
        "run after restart: {}",
        show(&out)
    );
    kill_and_remove(h, "r1")
}

/// Bad rrc configuration fails `ctr run` with a message naming the problem, and leaves nothing.
#[test]
fn bad_rrc_config_is_refused_cleanly() -> Result<()> {
    let bed = bed_or_skip!();
    let h = bed.host("h");
    let key = h.dir().join("auth.key");
    std::fs::write(&key, [7u8; 32])?;
    let key_arg = format!("io.containerd.rrc.auth-key-file={}", key.display());
    let bad_toml = h.dir().join("bad.toml");
    std::fs::write(&bad_toml, "garbage = = =\n")?;
    let bad_value = h.dir().join("bad-value.toml");
    std::fs::write(&bad_value, "epoch-ms = 0\n")?;
    let good = h.dir().join("good.toml");
    std::fs::write(&good, "epoch-ms = 250\n")?;
    let (bad_toml, bad_value, good) = (
        bad_toml.display().to_string(),
        bad_value.display().to_string(),
        good.display().to_string(),
    );

    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "epoch0",
            vec!["--annotation", "io.containerd.rrc.epoch-ms=0"],
            "io.containerd.rrc.epoch-ms",
        ),
        (
            "bogus",
            vec!["--annotation", "io.containerd.rrc.bogus=1"],
            "io.containerd.rrc.bogus",
        ),
        (
            "passive",
            vec![
                "--annotation",
                "io.containerd.rrc.mode=passive",
                "--annotation",
                "io.containerd.rrc.peer=198.18.0.11:7070",
                "--annotation",
                &key_arg,
            ],
            "network namespace given by path",
        ),
        (
            "hybrid",
            vec![
                "--annotation",
                "io.containerd.rrc.mode=hybrid",
                "--annotation",
                "io.containerd.rrc.on-recorder-failure=continue-unprotected",
                "--annotation",
                "io.containerd.rrc.peer=198.18.0.11:7070",
                "--annotation",
                &key_arg,
            ],
            "continue-unprotected is not possible in hybrid mode",
        ),
        (
            "badtoml",
            vec!["--runtime-config-path", &bad_toml],
            &bad_toml,
        ),
        (
            "badvalue",
            vec!["--runtime-config-path", &bad_value],
            "epoch-ms",
        ),
    ];
    for (id, extra, want) in &cases {
        expect_refused(h, id, extra, &["echo", "should-not-run"], &[want])?;
    }

    // Valid settings reach the shim and are accepted.
    let valid: Vec<(&str, Vec<&str>)> = vec![
        (
            "epoch250",
            vec!["--annotation", "io.containerd.rrc.epoch-ms=250"],
        ),
        (
            "modeoff",
            vec!["--annotation", "io.containerd.rrc.mode=off"],
        ),
        ("goodfile", vec!["--runtime-config-path", &good]),
    ];
    for (id, extra) in &valid {
        let out = run_rm(h, RRC_RUNTIME, extra, id, &["echo", "fine"])?;
        ensure!(
            out.status.success() && out.stdout == b"fine\n",
            "{id}: {}\n{}",
            show(&out),
            h.containerd_log_tail()
        );
        assert_clean(h, id)?;
    }
    Ok(())
}

/// runc's own error reaches ctr, and a failed create leaves nothing behind.
#[test]
fn failing_runc_reports_its_message() -> Result<()> {
    let bed = bed_or_skip!();
    let h = bed.host("h");
    let cases = [
        ("noabs", "/nonexistent-binary", "no such file or directory"),
        ("nopath", "nonexistent-command", "executable file not found"),
    ];
    for (id, prog, want) in cases {
        expect_refused(h, id, &[], &[prog], &[want, prog])?;
    }
    Ok(())
}

/// containerd's log URIs, as nerdctl and `ctr --log-uri` use them: a logging binary gets the
/// process's stdout on fd 3 and stderr on fd 4 (arguments from the URI's query, the container's id
/// and namespace in its environment); a `file://` URI collects both streams in a file. Both are
/// complete when the task is deleted, and nothing is left behind.
#[test]
fn log_uris_binary_and_file() -> Result<()> {
    let bed = bed_or_skip!();
    let h = bed.host("h");
    let dir = h.dir().join("logs");
    std::fs::create_dir_all(&dir)?;
    let logger = dir.join("logger.sh");
    // fd 5 is closed first (the ready signal), so the copies do not hold it open.
    std::fs::write(
        &logger,
        "#!/bin/bash\n[ \"$1\" = dir ] || exit 2\nexec 5>&-\n\
         echo \"$CONTAINER_ID $CONTAINER_NAMESPACE\" > \"$2/env\"\n\
         cat <&3 > \"$2/stdout\" &\ncat <&4 > \"$2/stderr\" &\nwait\n",
    )?;
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 4";

    let uri = format!("binary://{}?dir={}", logger.display(), dir.display());
    let out = run_rm(
        h,
        RRC_RUNTIME,
        &["--log-uri", &uri],
        "logbin",
        &["sh", "-c", script],
    )?;
    ensure!(
        out.status.code() == Some(4),
        "logbin: wanted exit 4: {}\n{}",
        show(&out),
        h.containerd_log_tail()
    );
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    ensure!(
        read("stdout") == "out1\nout2\nout3\n" && read("stderr") == "err1\nerr2\nerr3\n",
        "logger got stdout {:?} stderr {:?}",
        read("stdout"),
        read("stderr")
    );
    ensure!(
        read("env").trim() == format!("logbin {}", h.namespace()),
        "logger environment: {:?}",
        read("env")
    );
    assert_clean(h, "logbin")?;

    let file = dir.join("sub").join("file.log");
    let uri = format!("file://{}", file.display());
    let out = run_rm(
        h,
        RRC_RUNTIME,
        &["--log-uri", &uri],
        "logfile",
        &["sh", "-c", script],
    )?;
    ensure!(out.status.code() == Some(4), "logfile: {}", show(&out));
    let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    ensure!(
        lines == ["err1", "err2", "err3", "out1", "out2", "out3"],
        "log file holds {text:?}"
    );
    assert_clean(h, "logfile")?;

    // A scheme containerd's runc shim does not know either is refused before anything runs.
    expect_refused(
        h,
        "logsys",
        &["--log-uri", "syslog:///x"],
        &["echo", "should-not-run"],
        &["syslog://", "not supported"],
    )
}

/// A detached container keeps running when it writes after `ctr run -d` has gone (nobody reads
/// its stdout FIFO any more).
#[test]
fn detached_output_after_ctr_exits() -> Result<()> {
    let bed = bed_or_skip!();
    let h = bed.host("h");
    run_detached(
        h,
        RRC_RUNTIME,
        &[],
        "o1",
        &[
            "sh",
            "-c",
            "i=0; while :; do echo line $i; echo err $i >&2; i=$((i+1)); sleep 0.05; done",
        ],
    )?;
    wait_status(h, "o1", "RUNNING")?;
    std::thread::sleep(Duration::from_millis(800));
    match task(h, "o1")? {
        Some((_, s)) if s == "RUNNING" => {}
        other => bail!(
            "o1 died writing to its stdout after ctr left: {other:?}\n{}",
            h.containerd_log_tail()
        ),
    }
    kill_and_remove(h, "o1")
}
