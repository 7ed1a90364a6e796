//! Output hold: every packet leaving a container's network namespace waits until the
//! replication layer says the state that produced it is safe at the backup.
//!
//! An iptables rule inside the container's netns (`OUTPUT -j NFQUEUE`, the xt target: the
//! native nft `queue` statement is not in this kernel) sends each outgoing packet — data, pure
//! ACKs, FIN/RST, window updates — to a queue that a thread of this crate holds, bound from inside
//! that netns. Each packet is tagged, on arrival, with the current *tag* (an epoch number in
//! passive mode, a log position in hybrid mode); [`OutputHold::release_upto`] lets every packet
//! whose tag is at most the given one go, in order, with one batch verdict. Tagging on arrival
//! is conservative: a packet is never tagged earlier than the state that produced it.
//!
//! Unprotected operation (no backup) is [`OutputHold::release_all`]: packets flow as they
//! arrive. If the holding thread dies, packets are dropped by the kernel (no fail-open), so TCP
//! retransmits them later: an output is never released early.
//!
//! This crate owns the queue and the rule; it knows nothing of checkpoints, logs or the channel.
//! Its NFQUEUE client ([`netlink`]) is also what the recorder's ingress log binds (whole
//! packets instead of metadata).

pub mod netlink;

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use netlink::NfQueue;

/// Errors of the output hold.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// The network namespace could not be entered.
    #[error("cannot enter network namespace {path}: {err}")]
    Netns {
        /// Its path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The queue could not be bound.
    #[error("cannot bind NFQUEUE {queue} (is another holder bound to it, or is nfnetlink_queue missing?): {err}")]
    Bind {
        /// Queue number.
        queue: u16,
        /// Why.
        err: std::io::Error,
    },
    /// iptables failed.
    #[error("iptables in {netns} failed ({args}): {stderr}")]
    Iptables {
        /// The netns path.
        netns: PathBuf,
        /// The arguments.
        args: String,
        /// What iptables said.
        stderr: String,
    },
    /// The holding thread could not be started.
    #[error("cannot start the output-hold thread: {0}")]
    Thread(std::io::Error),
}

/// Counters of one hold.
#[derive(Debug, Default)]
pub struct Stats {
    /// Packets that entered the queue.
    pub queued: AtomicU64,
    /// Packets released.
    pub released: AtomicU64,
    /// Nanoseconds released packets spent held, summed (from the hold's receipt to its verdict).
    pub held_ns: AtomicU64,
}

/// Where a hold reads the current tag from, besides [`OutputHold::set_tag`]: hybrid mode tags
/// each packet with the recorder's log position, published in memory it shares with the shim.
pub type TagSource = Box<dyn Fn() -> u64 + Send + Sync>;

struct Control {
    tag: AtomicU64,
    source: std::sync::OnceLock<TagSource>,
    released: AtomicU64,
    /// Everything passes, whatever its tag (no backup to wait for).
    passthrough: AtomicBool,
    stop: AtomicBool,
    wake: OwnedFd,
    stats: Stats,
}

impl Control {
    fn current_tag(&self) -> u64 {
        let tag = self.tag.load(Ordering::SeqCst);
        match self.source.get() {
            Some(f) => tag.max(f()),
            None => tag,
        }
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                std::ptr::addr_of!(one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// A running output hold on one queue in one network namespace, plus its iptables rule.
pub struct OutputHold {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
    netns: PathBuf,
    rule: Vec<String>,
}

fn iptables(netns: &Path, args: &[String]) -> Result<(), HoldError> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["iptables", "-w", "5"])
        .args(args)
        .output()
        .map_err(|e| HoldError::Iptables {
            netns: netns.to_path_buf(),
            args: args.join(" "),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(HoldError::Iptables {
            netns: netns.to_path_buf(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

impl OutputHold {
    /// Starts holding packets that leave `netns` through `interface` (every interface but `lo`
    /// when None) on NFQUEUE `queue`. Packets are tagged with the current tag (initially 0) and
    /// nothing is released until [`release_upto`](Self::release_upto) or
    /// [`release_all`](Self::release_all). Installs the iptables rule with `iptables` run as a
    /// child process; a process that reaps children behind `std::process`'s back (a containerd
    /// shim) uses [`bind`](Self::bind) and installs [`nfqueue_rule`] itself.
    pub fn start(
        netns: &Path,
        interface: Option<&str>,
        queue: u16,
    ) -> Result<OutputHold, HoldError> {
        let mut hold = OutputHold::bind(netns, queue)?;
        let rule = nfqueue_rule(interface, queue);
        let mut add = vec!["-A".to_string()];
        add.extend(rule.iter().cloned());
        iptables(netns, &add)?;
        hold.rule = rule;
        Ok(hold)
    }

    /// Binds NFQUEUE `queue` inside `netns` and starts the holding thread, without installing
    /// any rule: packets reach the queue once the caller adds [`nfqueue_rule`] to the
    /// namespace's OUTPUT chain (and stop when it deletes it, before dropping this).
    pub fn bind(netns: &Path, queue: u16) -> Result<OutputHold, HoldError> {
        // SAFETY: eventfd has no preconditions; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(HoldError::Thread(std::io::Error::last_os_error()));
        }
        let control = Arc::new(Control {
            tag: AtomicU64::new(0),
            source: std::sync::OnceLock::new(),
            released: AtomicU64::new(0),
            passthrough: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            // SAFETY: efd is a fresh descriptor nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(efd) },
            stats: Stats::default(),
        });
        let ns = File::open(netns).map_err(|err| HoldError::Netns {
            path: netns.to_path_buf(),
            err,
        })?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let c = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("output-hold-{queue}"))
            .spawn(move || {
                // The queue's socket must be created inside the container's netns; setns on
                // this thread moves only this thread.
                // SAFETY: setns with a valid netns descriptor, affecting only this thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let _ = ready_tx.send(Err(HoldError::Netns {
                        path: PathBuf::new(),
                        err: std::io::Error::last_os_error(),
                    }));
                    return;
                }
                match NfQueue::bind(queue, 1 << 16) {
                    Ok(q) => {
                        let _ = ready_tx.send(Ok(()));
                        hold_loop(q, &c);
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(HoldError::Bind { queue, err }));
                    }
                }
            })
            .map_err(HoldError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(match e {
                    HoldError::Netns { err, .. } => HoldError::Netns {
                        path: netns.to_path_buf(),
                        err,
                    },
                    e => e,
                });
            }
            Err(_) => {
                return Err(HoldError::Thread(std::io::Error::other(
                    "the output-hold thread died while starting",
                )))
            }
        }
        Ok(OutputHold {
            control,
            thread: Some(thread),
            netns: netns.to_path_buf(),
            rule: Vec::new(),
        })
    }

    /// Tags packets arriving from now on with `tag` (tags only grow).
    pub fn set_tag(&self, tag: u64) {
        self.control.tag.fetch_max(tag, Ordering::SeqCst);
    }

    /// Also tags each arriving packet with what `source` returns when the hold receives it
    /// (the larger of that and [`set_tag`](Self::set_tag)'s tag). Set once; a second call
    /// returns false and changes nothing.
    pub fn set_tag_source(&self, source: TagSource) -> bool {
        self.control.source.set(source).is_ok()
    }

    /// The current tag.
    pub fn tag(&self) -> u64 {
        self.control.current_tag()
    }

    /// Releases every held packet tagged at most `tag`, and those arriving later with such tags.
    pub fn release_upto(&self, tag: u64) {
        if self.control.released.fetch_max(tag, Ordering::SeqCst) < tag {
            self.control.wake();
        }
    }

    /// Lets everything through, held packets and later ones, until [`hold_again`]
    /// (no backup: the container runs unprotected).
    ///
    /// [`hold_again`]: Self::hold_again
    pub fn release_all(&self) {
        if !self.control.passthrough.swap(true, Ordering::SeqCst) {
            self.control.wake();
        }
    }

    /// Ends [`release_all`](Self::release_all): packets arriving from now on are held again
    /// until their tag is released (a backup is paired again). Packets already let through
    /// are gone; the caller takes a checkpoint before relying on the hold.
    pub fn hold_again(&self) {
        self.control.passthrough.store(false, Ordering::SeqCst);
    }

    /// Whether everything passes (after [`release_all`](Self::release_all)).
    pub fn is_passthrough(&self) -> bool {
        self.control.passthrough.load(Ordering::SeqCst)
    }

    /// Packets queued so far.
    pub fn queued(&self) -> u64 {
        self.control.stats.queued.load(Ordering::SeqCst)
    }

    /// Packets released so far.
    pub fn released(&self) -> u64 {
        self.control.stats.released.load(Ordering::SeqCst)
    }

    /// Mean time a released packet spent held, in microseconds (0 before any release).
    pub fn mean_hold_us(&self) -> f64 {
        let n = self.released();
        if n == 0 {
            return 0.0;
        }
        self.control.stats.held_ns.load(Ordering::SeqCst) as f64 / n as f64 / 1000.0
    }

    /// Packets held right now.
    pub fn held(&self) -> u64 {
        self.queued().saturating_sub(self.released())
    }

    /// Removes the rule, then stops holding (packets still held are dropped by the kernel, and
    /// retransmitted by TCP to whoever holds the address next).
    pub fn stop(mut self) -> Result<(), HoldError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), HoldError> {
        let mut result = Ok(());
        if !self.rule.is_empty() {
            let mut del = vec!["-D".to_string()];
            del.append(&mut self.rule);
            result = iptables(&self.netns, &del);
        }
        self.control.stop.store(true, Ordering::SeqCst);
        self.control.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        result
    }
}

impl Drop for OutputHold {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("stopping the output hold: {e}");
        }
    }
}

/// The OUTPUT-chain rule (without `-A`/`-D`) that sends packets leaving through `interface`
/// (every interface but `lo` when None) to NFQUEUE `queue`.
pub fn nfqueue_rule(interface: Option<&str>, queue: u16) -> Vec<String> {
    let mut rule = vec!["OUTPUT".to_string()];
    match interface {
        Some(i) => rule.extend(["-o".into(), i.to_string()]),
        None => rule.extend(["!".into(), "-o".into(), "lo".into()]),
    }
    rule.extend([
        "-j".into(),
        "NFQUEUE".into(),
        "--queue-num".into(),
        queue.to_string(),
    ]);
    rule
}

fn hold_loop(mut q: NfQueue, c: &Control) {
    // (packet id, tag, arrival), in arrival (= id) order.
    let mut held: VecDeque<(u32, u64, std::time::Instant)> = VecDeque::new();
    let mut ids = Vec::new();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: q.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: c.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            tracing::error!(
                "output hold: poll failed: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        if c.stop.load(Ordering::SeqCst) {
            return;
        }
        if fds[1].revents != 0 {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from our eventfd (non-blocking).
            let _ = unsafe {
                libc::read(
                    c.wake.as_raw_fd(),
                    std::ptr::addr_of_mut!(v).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
        }
        ids.clear();
        if let Err(e) = q.recv_ids(&mut ids) {
            tracing::warn!("output hold: receiving packets: {e}");
        }
        let tag = c.current_tag();
        c.stats
            .queued
            .fetch_add(u64::try_from(ids.len()).unwrap_or(0), Ordering::SeqCst);
        let now = std::time::Instant::now();
        held.extend(ids.iter().map(|&id| (id, tag, now)));

        let released = if c.passthrough.load(Ordering::SeqCst) {
            u64::MAX
        } else {
            c.released.load(Ordering::SeqCst)
        };
        let mut last = None;
        let mut n = 0u64;
        let mut waited = 0u128;
        let released_at = std::time::Instant::now();
        while let Some(&(id, t, at)) = held.front() {
            if t > released {
                break;
            }
            last = Some(id);
            n += 1;
            waited += released_at.duration_since(at).as_nanos();
            held.pop_front();
        }
        c.stats
            .held_ns
            .fetch_add(u64::try_from(waited).unwrap_or(u64::MAX), Ordering::SeqCst);
        if let Some(id) = last {
            match q.accept_upto(id) {
                Ok(()) => {
                    c.stats.released.fetch_add(n, Ordering::SeqCst);
                }
                Err(e) => tracing::error!("output hold: releasing packets up to {id}: {e}"),
            }
        }
    }
}
