//! The test bed: test hosts in network namespaces, each able to run its own containerd.
//!
//! A [`TestBed`] is a set of test hosts. Each host is a network namespace with `lo` up and an
//! `eth0` holding `198.18.0.(10+i)/15` (i = the host's position in [`TestBed::new`]'s list); every
//! `eth0` is one end of a veth pair whose other end is a port of the bridge `br0`, which lives in a
//! separate "switch" namespace. Nothing is created in the root network namespace, and traffic can
//! only go between the bed's hosts (and to loopback inside each).
//!
//! A host can run its own containerd ([`Host::start_containerd`]), which runs *in the host's network
//! namespace* but in the root mount namespace (it is started with `nsenter --net=…`, not
//! `ip netns exec`, which would give it a private mount namespace and a fresh `/sys` without the
//! cgroup v1 hierarchies runc needs). Everything it owns — configuration, root, state, sockets,
//! log, runc state (`<state>/runc/<namespace>` for rrc's shim) — lives under the bed's work
//! directory, `/run/rrc-test/<unique>/<host>/`.
//!
//! # A container in a host's network namespace
//!
//! Both of these put a container into its host's network namespace (verified by comparing the
//! namespace inodes, see the `container_joins_host_netns` test):
//!
//! * `--with-ns network:/var/run/netns/<netns>` ([`Host::ctr_run_args_net`]): runc joins the named
//!   namespace; explicit, and independent of where the shim runs. This is the recommended form.
//! * `--net-host`: runc creates no network namespace, so the container inherits the shim's, and the
//!   shim inherits containerd's, which is the host's. ctr then also bind-mounts the root's
//!   `/etc/hosts` and `/etc/resolv.conf`.
//!
//! Without either, `ctr run` gives the container a new, empty network namespace (only `lo`).
//!
//! # Names
//!
//! Everything is named after a per-bed unique string `<pid>-<counter>`: network namespaces
//! `rrc-<unique>-<host>` (hosts) and `rrc-<unique>.switch`, containerd namespaces
//! `rrc-<unique>-<host>` (one per host, so the stock runc shim's default state root
//! `/run/containerd/runc/<namespace>` is never shared between two containerds), and the work
//! directory `/run/rrc-test/<unique>/`. Beds in parallel threads or processes never collide.
//!
//! # Teardown
//!
//! Dropping a [`TestBed`] tears everything down, also after a failed assertion (a panic unwinds
//! through the drop): tasks and containers of every containerd namespace, containerd, every process
//! left in the hosts' network namespaces (shims, containers in a host's netns), runc state of the
//! bed's containers, mounts under the work directory, the containers' cgroups, the network
//! namespaces and the work directory. Problems are logged to stderr; the drop never panics.
//!
//! A bed whose process died without dropping it (killed by a timeout, `abort`) is swept by the next
//! [`TestBed::new`] in any process: each live bed holds an exclusive `flock` on its
//! `/run/rrc-test/<unique>/lock`, and a bed whose lock can be taken has no owner any more.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// rrc's runtime name, for `ctr run --runtime`.
pub const RRC_RUNTIME: &str = "io.containerd.rrc.v2";
/// containerd's stock runc shim, for reference runs.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// Where beds keep their work directories.
pub const TEST_ROOT: &str = "/run/rrc-test";
/// Where `ip netns` keeps its named network namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
/// How long [`Host::ctr`] lets one `ctr` command run before it kills it.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(120);
/// The runc state root the stock runc shim uses when no `Root` option is given.
const STOCK_RUNC_ROOT: &str = "/run/containerd/runc";
/// Where containerd's shims put their ttrpc sockets.
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// containerd's v2 runtime bundle directory, under its state directory.
const TASK_DIR: &str = "io.containerd.runtime.v2.task";
/// The image names `integration/images/import.sh` knows.
pub const IMAGES: [&str; 5] = ["busybox", "redis", "memcached", "lighttpd", "pause"];

/// The full reference of a local test image: `image("redis")` is `docker.io/rrc/redis:latest`.
pub fn image(name: &str) -> String {
    format!("docker.io/rrc/{name}:latest")
}

static BED_COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A set of test hosts joined by a bridge; see the module docs.
pub struct TestBed {
    unique: String,
    dir: PathBuf,
    switch_netns: Option<String>,
    hosts: Vec<Host>,
    /// The held `flock` on `<dir>/lock` that marks this bed as alive.
    lock: Option<Flock<File>>,
}

/// A child process the tests started; killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One test host: a network namespace, optionally with its own containerd.
pub struct Host {
    name: String,
    ip: Ipv4Addr,
    netns: String,
    namespace: String,
    dir: PathBuf,
    containerd: Option<Child>,
    /// Whether a configuration was written (start_containerd was called).
    configured: bool,
}

impl TestBed {
    /// Creates one test host per name: a network namespace joined to the others through a bridge
    /// that lives in a separate "switch" namespace (the root network namespace is untouched),
    /// address `198.18.0.(10+i)/15` on `eth0` of host i, `lo` up. Names of network namespaces and
    /// directories are unique per bed (`rrc-<pid>-<counter>-<host>`), so tests run in parallel.
    /// The work directory is `/run/rrc-test/<pid>-<counter>/`.
    ///
    /// Host names are 1 to 20 ASCII letters, digits and single inner dashes (they become parts of
    /// namespace names). At most 240 hosts. Needs root.
    pub fn new(hosts: &[&str]) -> Result<TestBed> {
        ensure!(!hosts.is_empty(), "a test bed needs at least one host");
        ensure!(hosts.len() <= 240, "at most 240 hosts per bed");
        let mut seen = BTreeSet::new();
        for h in hosts {
            ensure!(
                valid_host_name(h),
                "invalid test host name {h:?}: use 1 to 20 ASCII letters, digits and single inner dashes"
            );
            ensure!(seen.insert(*h), "host name {h:?} given twice");
        }
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the test bed needs root (network namespaces, mounts, containerd)"
        );
        SWEEP.call_once(sweep_stale_beds);

        fs::create_dir_all(TEST_ROOT).with_context(|| format!("create {TEST_ROOT}"))?;
        // A unique name; a directory left by an earlier process with our pid is skipped.
        let (unique, dir) = loop {
            let unique = format!(
                "{}-{}",
                std::process::id(),
                BED_COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let dir = Path::new(TEST_ROOT).join(&unique);
            match fs::create_dir(&dir) {
                Ok(()) => break (unique, dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("create {}", dir.display())),
            }
        };
        let lock_file = File::create(dir.join("lock"))
            .with_context(|| format!("create {}/lock", dir.display()))?;
        // Blocking: a sweeper may hold it for a moment (it lets go of a bed without `owner`).
        let lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow!("lock {}/lock: {e}", dir.display()))?;
        let mut bed = TestBed {
            unique: unique.clone(),
            dir,
            switch_netns: None,
            hosts: Vec::new(),
            lock: Some(lock),
        };
        // From here on, an error drops `bed`, which removes whatever was created.
        fs::write(bed.dir.join("owner"), format!("{}\n", std::process::id()))
            .context("write owner")?;

        let switch = format!("rrc-{unique}.switch");
        fs::write(bed.dir.join("switch.netns"), &switch).context("write switch.netns")?;
        bed.switch_netns = Some(switch.clone());
        netns_add(&switch)?;
        ip(&["-n", &switch, "link", "set", "lo", "up"])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;

        for (i, name) in hosts.iter().enumerate() {
            let netns = format!("rrc-{unique}-{name}");
            let hdir = bed.dir.join(name);
            fs::create_dir(&hdir).with_context(|| format!("create {}", hdir.display()))?;
            let octet = u8::try_from(10 + i).context("too many hosts")?;
            let host = Host {
                name: name.to_string(),
                ip: Ipv4Addr::new(198, 18, 0, octet),
                netns: netns.clone(),
                namespace: format!("rrc-{unique}-{name}"),
                dir: hdir.clone(),
                containerd: None,
                configured: false,
            };
            // Recorded first, for a sweeper, should this process die half-way.
            fs::write(
                hdir.join("host"),
                format!("netns={}\nnamespace={}\n", host.netns, host.namespace),
            )
            .context("write host record")?;
            bed.hosts.push(host);
            netns_add(&netns)?;
            let port = format!("p{i}");
            let addr = format!("198.18.0.{octet}/15");
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &switch, "link", "set", &port, "up"])?;
            ip(&["-n", &netns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        }
        Ok(bed)
    }

    /// The host named `name`. Panics (with the known names) if there is none.
    pub fn host(&self, name: &str) -> &Host {
        match self.hosts.iter().find(|h| h.name == name) {
            Some(h) => h,
            None => panic!(
                "no test host {name:?} in this bed; its hosts are {:?}",
                self.host_names()
            ),
        }
    }

    /// The host named `name`, mutably. Panics (with the known names) if there is none.
    pub fn host_mut(&mut self, name: &str) -> &mut Host {
        let names = self.host_names();
        match self.hosts.iter_mut().find(|h| h.name == name) {
            Some(h) => h,
            None => panic!("no test host {name:?} in this bed; its hosts are {names:?}"),
        }
    }

    /// Every host, in the order given to [`TestBed::new`].
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    fn host_names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// The bed's work directory, `/run/rrc-test/<unique>/` (one subdirectory per host).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The unique string in every name of this bed (`<pid>-<counter>`).
    pub fn unique(&self) -> &str {
        &self.unique
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        let plan = Teardown {
            dir: self.dir.clone(),
            switch_netns: self.switch_netns.take(),
            hosts: self
                .hosts
                .iter_mut()
                .map(|h| HostTeardown {
                    name: h.name.clone(),
                    netns: h.netns.clone(),
                    namespace: h.namespace.clone(),
                    dir: h.dir.clone(),
                    containerd: h.containerd.take().map(Daemon::Child),
                })
                .collect(),
        };
        plan.run();
        // Released last: until now a sweeper in another process must leave this bed alone.
        drop(self.lock.take());
    }
}

fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

impl Host {
    /// The host's name, as given to [`TestBed::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on `eth0` (prefix length 15).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The name of the host's network namespace (`/var/run/netns/<netns>`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The path of the host's network namespace, `/var/run/netns/<netns>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// A command that runs `program` inside this host's network namespace
    /// (`ip netns exec <netns> <program>`: the program also gets a private mount namespace with
    /// this namespace's `/sys`). Add arguments with [`Command::args`].
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, program]);
        c
    }

    /// Starts a plain redis-server (a host process, not a container) in this host's network
    /// namespace, on every address, without persistence, and returns once it answers `PING` on
    /// `port`. It is killed when the returned guard is dropped.
    pub fn start_redis(&self, port: u16) -> Result<KillOnDrop> {
        let port = port.to_string();
        let child = self
            .command("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "0.0.0.0",
                "--protected-mode",
                "no",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start redis-server on test host {}", self.name))?;
        let guard = KillOnDrop(child);
        wait_for(Duration::from_secs(10), || {
            let out = self
                .command("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port, "PING"])
                .output()?;
            ensure!(
                String::from_utf8_lossy(&out.stdout).trim() == "PONG",
                "no PONG yet"
            );
            Ok(())
        })
        .with_context(|| format!("redis-server on test host {} never answered", self.name))?;
        Ok(guard)
    }

    /// Opens one TCP connection from this host to `ip:port` and keeps it open: a bash in this
    /// host's netns holds `/dev/tcp/ip/port` and relays its stdin to the connection and the
    /// connection to its stdout (both piped; stderr discarded; own process group, so killing the
    /// group ends the relay). This is how tests and the demo act as a client that never
    /// reconnects.
    pub fn open_tcp_relay(&self, ip: &str, port: u16) -> Result<Child> {
        self.command("bash")
            .args([
                "-c",
                &format!("exec 3<>/dev/tcp/{ip}/{port}; cat <&3 & cat >&3; wait"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("open a TCP connection from {} to {ip}:{port}", self.name))
    }

    /// The `ctr run` arguments that put a container into this host's network namespace:
    /// `--with-ns network:/var/run/netns/<netns>` (see the module docs; `--net-host` works too).
    pub fn ctr_run_args_net(&self) -> Vec<String> {
        vec![
            "--with-ns".to_string(),
            format!("network:{}", self.netns_path().display()),
        ]
    }

    /// The host's own directory under the bed's work directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's state directory on this host.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// containerd's root directory on this host.
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The runc state root rrc's shim uses for this host's namespace ([`Host::namespace`]):
    /// `<state>/runc/<namespace>`, for `runc --root`.
    pub fn runc_root(&self) -> PathBuf {
        self.state_dir().join("runc").join(&self.namespace)
    }

    /// The bundle directory containerd gives container `id` of this host's namespace.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state_dir()
            .join(TASK_DIR)
            .join(&self.namespace)
            .join(id)
    }

    /// The path of containerd's log on this host.
    pub fn containerd_log(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("containerd.toml")
    }

    /// The pid of this host's containerd, if it runs.
    pub fn containerd_pid(&self) -> Option<u32> {
        self.containerd.as_ref().map(Child::id)
    }

    /// Starts a containerd for this host inside its network namespace, with its own
    /// configuration, root, state, gRPC and ttrpc sockets (all under the bed's work directory),
    /// `PATH` starting with a directory holding `containerd-shim-rrc-v2` (a symlink to the built
    /// shim, see [`shim_binary`]), and `extra_config` (TOML tables) appended to the generated
    /// `config.toml` (`version = 2`). rrc's shim derives its runc root, `<state>/runc`, itself;
    /// the stock runc shim gets nothing and uses `/run/containerd/runc/<namespace>`.
    ///
    /// The generated configuration sets the top-level keys `version`, `root`, `state` and
    /// `disabled_plugins` and the tables `[grpc]`, `[ttrpc]` and
    /// `[plugins."io.containerd.internal.v1.opt"]`: `extra_config` must not set them again, and
    /// must consist of tables only (a bare key after the generated tables would land in the last
    /// one). The CRI plugin is disabled unless `extra_config` contains
    /// `[plugins."io.containerd.grpc.v1.cri"`. containerd's log goes to
    /// `<workdir>/<host>/containerd.log`. Waits until the socket answers `ctr version`, then
    /// imports every test image into [`Host::namespace`].
    pub fn start_containerd(&mut self, extra_config: &str) -> Result<()> {
        ensure!(
            self.containerd.is_none(),
            "containerd already runs on test host {}",
            self.name
        );
        for d in ["root", "state", "bin", "opt"] {
            let p = self.dir.join(d);
            fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        }
        let shim = shim_binary()?;
        let link = self.dir.join("bin").join("containerd-shim-rrc-v2");
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", link.display())),
        }
        std::os::unix::fs::symlink(&shim, &link)
            .with_context(|| format!("symlink {} -> {}", link.display(), shim.display()))?;

        let cri = extra_config.contains("[plugins.\"io.containerd.grpc.v1.cri\"");
        let mut disabled = vec![
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
        ];
        if !cri {
            disabled.push("io.containerd.grpc.v1.cri");
        }
        let disabled = disabled
            .iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let d = |p: &str| toml_str(&self.dir.join(p));
        let config = format!(
            "# containerd configuration of rrc test host {name} (generated by the test bed)\n\
             version = 2\n\
             root = {root}\n\
             state = {state}\n\
             disabled_plugins = [{disabled}]\n\
             \n\
             [grpc]\n  address = {sock}\n\
             \n\
             [ttrpc]\n  address = {ttrpc}\n\
             \n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n\
             \n\
             # --- extra configuration ---\n\
             {extra_config}\n",
            name = self.name,
            root = d("root"),
            state = d("state"),
            sock = toml_str(&self.containerd_socket()),
            ttrpc = d("containerd.sock.ttrpc"),
            opt = d("opt"),
        );
        fs::write(self.config_path(), config)
            .with_context(|| format!("write {}", self.config_path().display()))?;
        self.configured = true;
        self.spawn_containerd()?;
        let ns = self.namespace.clone();
        self.import_images(&ns, &[])
            .with_context(|| format!("\n{}", self.containerd_log_tail()))
    }

    fn spawn_containerd(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.containerd_log())
            .with_context(|| format!("open {}", self.containerd_log().display()))?;
        let log2 = log.try_clone().context("dup log")?;
        let path = format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_else(|_| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
            })
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display()))
            .arg("containerd")
            .arg("--config")
            .arg(self.config_path())
            .env("PATH", path)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a ^C to the test run does not hit it before the drop.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("start containerd on test host {}", self.name))?;
        let pid = child.id();
        self.containerd = Some(child);
        fs::write(self.dir.join("containerd.pid"), format!("{pid}\n"))
            .context("write containerd.pid")?;

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.containerd.as_mut() {
                if let Some(status) = child.try_wait().context("wait for containerd")? {
                    self.containerd = None;
                    bail!(
                        "containerd on test host {} exited at start-up ({status})\n{}",
                        self.name,
                        self.containerd_log_tail()
                    );
                }
            }
            let out = self.ctr_timeout(&["version"], Duration::from_secs(5));
            if matches!(&out, Ok(o) if o.status.success()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let why = match out {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => format!("{e:#}"),
                };
                bail!(
                    "containerd on test host {} did not answer on {} within 30 s: {why}\n{}",
                    self.name,
                    self.containerd_socket().display(),
                    self.containerd_log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops containerd (SIGTERM, waits up to 10 s, then SIGKILL) and starts it again with the
    /// same configuration. Running shims and tasks stay; containerd reconnects to them.
    pub fn restart_containerd(&mut self) -> Result<()> {
        ensure!(
            self.configured,
            "containerd was never started on test host {}",
            self.name
        );
        if let Some(child) = self.containerd.take() {
            let status = stop_daemon(Daemon::Child(child), Duration::from_secs(10));
            log_line(&format!(
                "test host {}: containerd stopped for a restart ({status})",
                self.name
            ));
        }
        self.spawn_containerd()
    }

    /// containerd's gRPC socket on this host.
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The containerd namespace [`Host::ctr`] uses on this host (`rrc-<unique>-<host>`, unique
    /// per host and bed).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Runs `ctr --address SOCKET --namespace NAMESPACE args...` (from outside the network
    /// namespace: it only talks to the socket) with stdin from /dev/null, and returns its output.
    /// A `ctr` running longer than [`CTR_TIMEOUT`] is killed and reported as an error.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        self.ctr_timeout(args, CTR_TIMEOUT)
    }

    /// [`Host::ctr`] with a timeout of your choice.
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut c = self.ctr_command(args);
        output_with_timeout(&mut c, timeout)
    }

    /// The `ctr` command [`Host::ctr`] runs, to spawn it yourself (e.g. a foreground `ctr run`
    /// you kill the task of). Its stdin is /dev/null.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.containerd_socket())
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Like [`Host::ctr`], but fails unless `ctr` exits 0 (the error has the arguments, the
    /// status, stdout, stderr and the tail of containerd's log); returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            bail!(
                "`ctr {}` on test host {} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout).trim_end(),
                String::from_utf8_lossy(&out.stderr).trim_end(),
                self.containerd_log_tail()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The tail (last 60 lines) of this host's containerd log, with a header line, for failure
    /// messages.
    pub fn containerd_log_tail(&self) -> String {
        let path = self.containerd_log();
        let text = match fs::read(&path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => return format!("(no containerd log at {}: {e})", path.display()),
        };
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines
            .get(lines.len().saturating_sub(60)..)
            .unwrap_or_default();
        format!(
            "--- last {} lines of {} ---\n{}",
            tail.len(),
            path.display(),
            tail.join("\n")
        )
    }

    /// Imports test images (names from [`IMAGES`]; empty: all) into a containerd namespace of
    /// this host's containerd with `integration/images/import.sh` (used for the CRI namespace
    /// `k8s.io`). Builds a missing image tarball first, which can take minutes.
    pub fn import_images(&self, namespace: &str, images: &[&str]) -> Result<()> {
        ensure!(
            self.containerd.is_some(),
            "containerd does not run on test host {}",
            self.name
        );
        let script = workspace_dir().join("integration/images/import.sh");
        let mut c = Command::new("bash");
        c.arg(&script)
            .arg(self.containerd_socket())
            .arg(namespace)
            .args(images)
            .stdin(Stdio::null());
        let out = output_with_timeout(&mut c, Duration::from_secs(900))?;
        ensure!(
            out.status.success(),
            "{} {} {namespace} {} failed ({}):\n{}{}",
            script.display(),
            self.containerd_socket().display(),
            images.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

/// Returns `Some(reason)` if the integration tests cannot run here: not root, or `containerd`,
/// `runc`, `ctr`, `ip` or `nsenter` missing. A test then prints `SKIPPED: reason` and returns.
///
/// # Panics
///
/// When the environment has `RRC_REQUIRE_INTEGRATION=1` (`make test` sets it) and the tests
/// cannot run: CI must not skip silently.
pub fn integration_unavailable() -> Option<String> {
    let reason = unavailable_reason();
    if let Some(why) = &reason {
        if std::env::var("RRC_REQUIRE_INTEGRATION").as_deref() == Ok("1") {
            panic!("integration tests required (RRC_REQUIRE_INTEGRATION=1) but cannot run: {why}");
        }
    }
    reason
}

fn unavailable_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (the test bed needs network namespaces and mounts)".into());
    }
    let missing: Vec<&str> = ["containerd", "runc", "ctr", "ip", "nsenter"]
        .into_iter()
        .filter(|p| find_in_path(p).is_none())
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "not installed: {} (run integration/setup.sh)",
            missing.join(", ")
        ));
    }
    None
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Polls `f` every 50 ms until it returns `Ok` or `timeout` has passed; then returns the last
/// error (with the timeout added as context). `f` runs at least once.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= timeout => {
                return Err(e.context(format!("still failing after {timeout:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The workspace's root directory (the parent of this crate's manifest directory): from
/// `CARGO_MANIFEST_DIR` as cargo sets it when it runs a test, else the current directory when it
/// is a checkout of this workspace (`make demo`), else the directory this crate was compiled in.
/// (A build cache shared by two checkouts may hold a binary compiled in the other one.)
pub fn workspace_dir() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|m| m.join("images").is_dir())
        .or_else(|| {
            std::env::current_dir()
                .ok()
                .map(|d| d.join("integration"))
                .filter(|m| m.join("images").is_dir())
        })
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().unwrap_or(&manifest).to_path_buf()
}

/// The shim binary the test bed puts on containerd's `PATH`: `$RRC_SHIM_BIN` if set, otherwise
/// `$CARGO_TARGET_DIR/debug/containerd-shim-rrc-v2` (a relative `CARGO_TARGET_DIR` is taken
/// from the workspace), otherwise `<workspace>/target/debug/containerd-shim-rrc-v2`. Fails when
/// it does not exist ("run cargo build first"); warns on stderr when the shim's sources are newer
/// than the binary.
pub fn shim_binary() -> Result<PathBuf> {
    const NAME: &str = "containerd-shim-rrc-v2";
    if let Some(p) = std::env::var_os("RRC_SHIM_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        ensure!(
            p.is_file(),
            "RRC_SHIM_BIN={} does not exist: run cargo build first",
            p.display()
        );
        return Ok(p);
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|p| !p.is_empty()) {
        Some(t) => workspace_dir().join(t),
        None => workspace_dir().join("target"),
    };
    let p = target.join("debug").join(NAME);
    ensure!(
        p.is_file(),
        "the shim binary {} does not exist: run cargo build first (or set RRC_SHIM_BIN)",
        p.display()
    );
    warn_if_stale(&p);
    Ok(p)
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        let Ok(m) = e.metadata() else { continue };
        let t = if m.is_dir() {
            newest_mtime(&e.path())
        } else {
            m.modified().ok()
        };
        newest = newest.max(t);
    }
    newest
}

fn warn_if_stale(bin: &Path) {
    static WARNED: Once = Once::new();
    let Ok(built) = fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let ws = workspace_dir();
    let newest = [ws.join("shim/src"), ws.join("config/src")]
        .iter()
        .filter_map(|d| newest_mtime(d))
        .max();
    if newest.is_some_and(|n| n > built) {
        WARNED.call_once(|| {
            log_line(&format!(
                "WARNING: {} is older than the shim's sources; run cargo build to test the current code",
                bin.display()
            ))
        });
    }
}

/// Runs `cmd` with stdout and stderr captured and kills it (its whole process group: it is
/// started as a group leader) if it runs longer than `timeout`. stdin is whatever `cmd` was given
/// (the default for a spawned command is to inherit it: set `Stdio::null()` for anything that
/// might read). A timeout is an error carrying what the command printed so far.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let stdout = Collector::start(child.stdout.take());
    let stderr = Collector::start(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .with_context(|| format!("wait for {cmd:?}"))?
        {
            break s;
        }
        if Instant::now() >= deadline {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            }
            let _ = child.kill();
            let status = child.wait();
            let out = stdout.finish(Duration::from_secs(1));
            let err = stderr.finish(Duration::from_secs(1));
            bail!(
                "{cmd:?} did not finish within {timeout:?} and was killed ({status:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // A grandchild may still hold the pipes; do not wait for it forever.
    let grace = Duration::from_secs(5);
    Ok(Output {
        status,
        stdout: stdout.finish(grace),
        stderr: stderr.finish(grace),
    })
}

/// Reads a pipe to its end on a thread.
struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Collector {
    fn start<R: Read + Send + 'static>(r: Option<R>) -> Collector {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        let b = buf.clone();
        std::thread::spawn(move || {
            if let Some(mut r) = r {
                let mut chunk = [0u8; 8192];
                loop {
                    match r.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => {
                            if let (Ok(mut b), Some(c)) = (b.lock(), chunk.get(..n)) {
                                b.extend_from_slice(c);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
            let _ = tx.send(());
        });
        Collector { buf, done }
    }

    fn finish(self, grace: Duration) -> Vec<u8> {
        let _ = self.done.recv_timeout(grace);
        self.buf
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
    }
}

fn toml_str(p: &Path) -> String {
    // Debug formatting of a str is a valid TOML basic string for the paths used here.
    format!("{:?}", p.display().to_string())
}

fn log_line(msg: &str) {
    eprintln!("[testbed] {msg}");
}

/// Runs a command that must succeed within `timeout`; returns its stdout.
fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let out = output_with_timeout(cmd.stdin(Stdio::null()), timeout)?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args), Duration::from_secs(20)).map(|_| ())
}

fn netns_add(name: &str) -> Result<()> {
    ip(&["netns", "add", name])
}

// ------------------------------------------------------------------------------------------
// Teardown

/// A containerd to stop: our child, or (for a swept bed) a pid.
enum Daemon {
    Child(Child),
    Pid(i32),
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL; returns what happened, for the log.
fn stop_daemon(daemon: Daemon, grace: Duration) -> String {
    match daemon {
        Daemon::Child(mut child) => {
            if let Ok(Some(s)) = child.try_wait() {
                return format!("had already exited: {s}");
            }
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            loop {
                match child.try_wait() {
                    Ok(Some(s)) => return describe(s),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        return match child.wait() {
                            Ok(s) => format!("killed after {grace:?}: {}", describe(s)),
                            Err(e) => format!("cannot wait for it: {e}"),
                        };
                    }
                }
            }
        }
        Daemon::Pid(pid) => {
            let p = Pid::from_raw(pid);
            if kill(p, Signal::SIGTERM).is_err() {
                return "not running".into();
            }
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if kill(p, None).is_err() || is_zombie(pid) {
                    return "stopped".into();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = kill(p, Signal::SIGKILL);
            "killed".into()
        }
    }
}

fn describe(s: ExitStatus) -> String {
    s.to_string()
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

struct HostTeardown {
    name: String,
    netns: String,
    namespace: String,
    dir: PathBuf,
    containerd: Option<Daemon>,
}

struct Teardown {
    dir: PathBuf,
    switch_netns: Option<String>,
    hosts: Vec<HostTeardown>,
}

impl HostTeardown {
    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn ctr(&self, ns: &str, args: &[&str], timeout: Duration) -> Result<String> {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(ns)
            .args(args);
        run_ok(&mut c, timeout)
    }

    /// Containers' bundles: (namespace, id, bundle dir).
    fn bundles(&self) -> Vec<(String, String, PathBuf)> {
        let mut out = Vec::new();
        for ns in read_dir_names(&self.dir.join("state").join(TASK_DIR)) {
            let nsdir = self.dir.join("state").join(TASK_DIR).join(&ns);
            for id in read_dir_names(&nsdir) {
                out.push((ns.clone(), id.clone(), nsdir.join(id)));
            }
        }
        out
    }

    /// Stops everything of this host that runs, and adds the containerd namespaces and container
    /// cgroups it finds to `namespaces` and `cgroups`.
    fn stop(&mut self, cgroups: &mut BTreeSet<String>, namespaces: &mut BTreeSet<String>) {
        namespaces.insert(self.namespace.clone());
        let mut sockets = BTreeSet::new();
        for (ns, _, bundle) in self.bundles() {
            namespaces.insert(ns);
            if let Some(cg) = bundle_cgroup(&bundle) {
                cgroups.insert(cg);
            }
            if let Ok(a) = fs::read_to_string(bundle.join("address")) {
                sockets.insert(a.trim().trim_start_matches("unix://").to_string());
            }
        }
        for ns in read_dir_names(&self.dir.join("state").join("runc")) {
            namespaces.insert(ns);
        }

        // Through containerd, while it answers.
        let alive = match &mut self.containerd {
            Some(Daemon::Child(c)) => matches!(c.try_wait(), Ok(None)),
            Some(Daemon::Pid(p)) => kill(Pid::from_raw(*p), None).is_ok(),
            None => false,
        };
        if alive && self.socket().exists() {
            if let Err(e) = self.clean_through_containerd(cgroups, namespaces) {
                log_line(&format!(
                    "teardown of host {}: cleaning up through containerd: {e:#}",
                    self.name
                ));
            }
        }
        if let Some(d) = self.containerd.take() {
            let how = stop_daemon(d, Duration::from_secs(5));
            if !how.contains("exit status: 0") && !how.contains("stopped") {
                log_line(&format!("teardown of host {}: containerd {how}", self.name));
            }
        }
        kill_netns_processes(&self.netns);
        self.delete_runc_containers(namespaces);
        for s in sockets {
            if s.starts_with(SHIM_SOCKET_DIR) {
                if let Ok(m) = fs::symlink_metadata(&s) {
                    if m.file_type().is_socket() {
                        let _ = fs::remove_file(&s);
                    }
                }
            }
        }
    }

    fn clean_through_containerd(
        &self,
        cgroups: &mut BTreeSet<String>,
        namespaces: &mut BTreeSet<String>,
    ) -> Result<()> {
        let t = Duration::from_secs(15);
        let listed = self.ctr("default", &["namespaces", "ls", "-q"], t)?;
        namespaces.extend(
            listed
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
        for ns in namespaces.clone() {
            let tasks = self.ctr(&ns, &["tasks", "ls", "-q"], t).unwrap_or_default();
            for id in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = self.ctr(&ns, &["tasks", "kill", "-a", "-s", "SIGKILL", id], t);
            }
            for id in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
                if let Err(e) = self.ctr(&ns, &["tasks", "delete", "-f", id], t) {
                    log_line(&format!(
                        "teardown of host {}: task {id} in {ns}: {e:#}",
                        self.name
                    ));
                }
            }
            let containers = self.ctr(&ns, &["containers", "ls", "-q"], t)?;
            for id in containers.lines().map(str::trim).filter(|l| !l.is_empty()) {
                if let Ok(info) = self.ctr(&ns, &["containers", "info", id], t) {
                    if let Some(cg) = info_cgroup(&info) {
                        cgroups.insert(cg);
                    }
                }
                if let Err(e) = self.ctr(&ns, &["containers", "delete", id], t) {
                    log_line(&format!(
                        "teardown of host {}: container {id} in {ns}: {e:#}",
                        self.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// `runc delete --force` of every container whose bundle is under this host's directory, in
    /// rrc's runc roots and the stock shim's.
    fn delete_runc_containers(&self, namespaces: &BTreeSet<String>) {
        for ns in namespaces {
            let roots = [
                self.dir.join("state").join("runc").join(ns),
                Path::new(STOCK_RUNC_ROOT).join(ns),
            ];
            for root in roots {
                if !root.is_dir() {
                    continue;
                }
                let mut c = Command::new("runc");
                c.arg("--root")
                    .arg(&root)
                    .args(["list", "--format", "json"]);
                let list = match run_ok(&mut c, Duration::from_secs(15)) {
                    Ok(l) => l,
                    Err(e) => {
                        log_line(&format!("teardown: runc list in {}: {e:#}", root.display()));
                        continue;
                    }
                };
                let entries: Vec<serde_json::Value> =
                    serde_json::from_str(&list).unwrap_or_default();
                for e in entries {
                    let id = e.get("id").and_then(|v| v.as_str()).unwrap_or_default();
                    let bundle = e.get("bundle").and_then(|v| v.as_str()).unwrap_or_default();
                    if id.is_empty() || !Path::new(bundle).starts_with(&self.dir) {
                        continue;
                    }
                    let mut c = Command::new("runc");
                    c.arg("--root").arg(&root).args(["delete", "--force", id]);
                    if let Err(e) = run_ok(&mut c, Duration::from_secs(15)) {
                        log_line(&format!("teardown: runc delete {id}: {e:#}"));
                    }
                }
                // The stock root of a namespace only this host used.
                if root.starts_with(STOCK_RUNC_ROOT) && *ns == self.namespace {
                    let _ = fs::remove_dir(&root);
                }
            }
        }
    }
}

impl Teardown {
    fn run(mut self) {
        let mut cgroups = BTreeSet::new();
        let mut namespaces = BTreeSet::new();
        let mut own_namespaces = Vec::new();
        for h in &mut self.hosts {
            own_namespaces.push(h.namespace.clone());
            h.stop(&mut cgroups, &mut namespaces);
        }
        unmount_all_under(&self.dir);
        for ns in &own_namespaces {
            cgroups.insert(format!("/{ns}"));
        }
        for cg in &cgroups {
            remove_cgroup(cg);
        }
        for h in &self.hosts {
            netns_delete(&h.netns);
        }
        if let Some(s) = &self.switch_netns {
            netns_delete(s);
        }
        let left = mounts_under(&self.dir);
        if left.is_empty() {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                log_line(&format!("teardown: remove {}: {e}", self.dir.display()));
            }
        } else {
            log_line(&format!(
                "teardown: keeping {}: still mounted under it: {left:?}",
                self.dir.display()
            ));
        }
    }
}

fn read_dir_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn spec_cgroup(spec: &serde_json::Value) -> Option<String> {
    let p = spec.get("linux")?.get("cgroupsPath")?.as_str()?;
    // Only cgroupfs paths; a systemd "slice:prefix:name" is not ours to remove.
    (p.starts_with('/') && !p.contains(':') && !p.contains("..")).then(|| p.to_string())
}

fn bundle_cgroup(bundle: &Path) -> Option<String> {
    let text = fs::read(bundle.join("config.json")).ok()?;
    spec_cgroup(&serde_json::from_slice(&text).ok()?)
}

fn info_cgroup(info: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(info).ok()?;
    spec_cgroup(v.get("Spec")?)
}

/// The pids of the processes in network namespace `netns`.
pub fn netns_pids(netns: &str) -> Vec<i32> {
    let Ok(target) = fs::metadata(Path::new(NETNS_DIR).join(netns)) else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if u32::try_from(pid).ok() == Some(me) {
            continue;
        }
        if let Ok(m) = fs::metadata(format!("/proc/{pid}/ns/net")) {
            if m.dev() == target.dev() && m.ino() == target.ino() {
                pids.push(pid);
            }
        }
    }
    pids
}

fn kill_netns_processes(netns: &str) {
    for round in 0..50 {
        let pids = netns_pids(netns);
        if pids.is_empty() {
            return;
        }
        if round == 0 {
            let names: Vec<String> = pids
                .iter()
                .map(|p| {
                    let comm = fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                    format!("{p} ({})", comm.trim())
                })
                .collect();
            log_line(&format!(
                "teardown: killing what is left in netns {netns}: {}",
                names.join(", ")
            ));
        }
        for p in pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    log_line(&format!("teardown: processes survive in netns {netns}"));
}

fn netns_delete(name: &str) {
    if !Path::new(NETNS_DIR).join(name).exists() {
        return;
    }
    if let Err(e) = ip(&["netns", "delete", name]) {
        log_line(&format!("teardown: {e:#}"));
    }
}

/// Mount points at or under `dir`, in /proc/self/mountinfo order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b.get(i) == Some(&b'\\') {
            if let Some(oct) = s.get(i + 1..i + 4) {
                if let Ok(v) = u8::from_str_radix(oct, 8) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        if let Some(c) = b.get(i) {
            out.push(*c);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unmount_all_under(dir: &Path) {
    for _ in 0..10 {
        let mut mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        // Deepest first; of equal depth, the latest first.
        mounts.reverse();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in mounts {
            if umount2(&m, MntFlags::empty()).is_err() {
                if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                    if e != Errno::EINVAL && e != Errno::ENOENT {
                        log_line(&format!("teardown: umount {}: {e}", m.display()));
                    }
                }
            }
        }
    }
}

/// The directories of `cgroup` (a cgroupfs path like `/ns/id`) in every hierarchy.
fn cgroup_dirs(cgroup: &str) -> Vec<PathBuf> {
    let rel = cgroup.trim_start_matches('/');
    if rel.is_empty() {
        return Vec::new();
    }
    let base = Path::new("/sys/fs/cgroup");
    let mut dirs = Vec::new();
    if base.join("cgroup.controllers").exists() {
        dirs.push(base.join(rel));
    }
    for e in fs::read_dir(base).into_iter().flatten().flatten() {
        // Real hierarchy mounts only (cpu,cpuacct-style names may be symlinks).
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            dirs.push(e.path().join(rel));
        }
    }
    dirs
}

fn remove_cgroup(cgroup: &str) {
    for d in cgroup_dirs(cgroup) {
        if d.is_dir() {
            remove_cgroup_tree(&d);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path());
        }
    }
    for attempt in 0..40 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                if attempt == 39 {
                    log_line(&format!("teardown: rmdir {}: {e}", dir.display()));
                    return;
                }
                // Processes still in it: they are this bed's; kill them.
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for p in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Sweeping beds whose process died

fn sweep_stale_beds() {
    let Ok(rd) = fs::read_dir(TEST_ROOT) else {
        return;
    };
    for e in rd.flatten() {
        let dir = e.path();
        if !dir.is_dir() {
            continue;
        }
        let Ok(f) = File::options()
            .read(true)
            .write(true)
            .open(dir.join("lock"))
        else {
            continue;
        };
        // Held by a live bed: leave it alone.
        let Ok(lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        // A bed being created holds its lock before it writes `owner`.
        if !dir.join("owner").exists() {
            drop(lock);
            continue;
        }
        log_line(&format!(
            "sweeping a test bed left by a dead process: {}",
            dir.display()
        ));
        let switch_netns = fs::read_to_string(dir.join("switch.netns"))
            .ok()
            .map(|s| s.trim().to_string());
        let mut hosts = Vec::new();
        for name in read_dir_names(&dir) {
            let hdir = dir.join(&name);
            let Ok(record) = fs::read_to_string(hdir.join("host")) else {
                continue;
            };
            let field = |k: &str| {
                record
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}=")))
                    .unwrap_or_default()
                    .to_string()
            };
            let config = hdir.join("containerd.toml");
            // Only a containerd still running with this host's configuration.
            let containerd = fs::read_to_string(hdir.join("containerd.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
                .filter(|pid| {
                    fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| {
                            String::from_utf8_lossy(&c).contains(config.to_string_lossy().as_ref())
                        })
                        .unwrap_or(false)
                })
                .map(Daemon::Pid);
            hosts.push(HostTeardown {
                name,
                netns: field("netns"),
                namespace: field("namespace"),
                dir: hdir,
                containerd,
            });
        }
        Teardown {
            dir: dir.clone(),
            switch_netns,
            hosts,
        }
        .run();
        drop(lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert!(valid_host_name("server"));
        assert!(valid_host_name("h-1"));
        assert!(!valid_host_name(""));
        assert!(!valid_host_name("-a"));
        assert!(!valid_host_name("a--b"));
        assert!(!valid_host_name("a.b"));
        assert!(!valid_host_name("abcdefghijklmnopqrstu"));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\"), "/x\\");
    }

    #[test]
    fn cgroup_paths_from_specs() {
        let spec = serde_json::json!({"linux": {"cgroupsPath": "/ns/c1"}});
        assert_eq!(spec_cgroup(&spec).as_deref(), Some("/ns/c1"));
        let spec = serde_json::json!({"linux": {"cgroupsPath": "system.slice:cri:c1"}});
        assert_eq!(spec_cgroup(&spec), None);
        assert_eq!(cgroup_dirs("/"), Vec::<PathBuf>::new());
    }

    #[test]
    fn output_with_timeout_kills() {
        let mut c = Command::new("sleep");
        c.arg("10").stdin(Stdio::null());
        let start = Instant::now();
        let err = output_with_timeout(&mut c, Duration::from_millis(200)).expect_err("timeout");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(err.to_string().contains("did not finish"), "{err}");
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo err >&2; exit 4"]);
        let out = output_with_timeout(&mut c, Duration::from_secs(10)).expect("runs");
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(4));
    }

    #[test]
    fn wait_for_returns_last_error() {
        let mut n = 0;
        let r: Result<()> = wait_for(Duration::from_millis(120), || {
            n += 1;
            bail!("attempt {n}")
        });
        let e = format!("{:#}", r.expect_err("fails"));
        assert!(e.contains("attempt"), "{e}");
        assert!(n >= 2);
        assert_eq!(wait_for(Duration::ZERO, || Ok(5)).expect("ok"), 5);
    }
}
