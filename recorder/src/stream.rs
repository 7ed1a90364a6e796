//! Recording for a replicated container: the log streamed to the shim, the position published
//! for the output hold, and the packets entering the container logged in the same order.
//!
//! * [`StreamSink`] wraps an [`EventlogSink`] writing through a [`PublishingWriter`]: every
//!   record reaches the output (a pipe the shim reads) with one `write`, then the output's
//!   length is published in the [`SharedPosition`], before the recorded thread resumes. When
//!   the attach barrier is passed it says so there ([`STATE_ATTACHED`]): the shim starts the
//!   container only then.
//! * [`spawn_ingress`] runs a thread that binds an NFQUEUE inside the container's network
//!   namespace (the shim sends every packet entering it there, from the `raw` table's
//!   PREROUTING chain: before conntrack, routing and TCP see it), appends each packet to the
//!   same log, and only then lets the kernel have it. A packet the log cannot take is never
//!   accepted.
//!
//! * [`scan_report`] puts what the code scanner ([`crate::scan`]) finds into the same log.
//!
//! The sink sits behind a mutex shared by the tracing, ingress and scanner threads; that mutex
//! is the container-wide order of their records.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rrc_output_hold::netlink::NfQueue;

use crate::event::{Cut, Event, Sink};
use crate::eventlog::{EventlogSink, SinkStats};
use crate::position::{PublishingWriter, SharedPosition, STATE_ATTACHED, STATE_ENDED};
use crate::scan::{Finding, Report};

/// The log behind its mutex.
pub type SharedLog<W> = Arc<Mutex<EventlogSink<PublishingWriter<W>>>>;

/// The sink of a replicated container's recorder (see the module docs).
pub struct StreamSink<W: io::Write> {
    log: SharedLog<W>,
    position: Arc<SharedPosition>,
}

fn poisoned() -> io::Error {
    io::Error::other("the event log's lock was poisoned by a panic on another thread")
}

impl<W: io::Write> StreamSink<W> {
    /// Records the log of container `container_id` into `out`, publishing in `position`.
    pub fn new(out: W, container_id: &str, position: Arc<SharedPosition>) -> Self {
        let writer = PublishingWriter::new(out, position.clone());
        StreamSink {
            log: Arc::new(Mutex::new(EventlogSink::new(writer, container_id))),
            position,
        }
    }

    /// The log, for the ingress thread.
    pub fn log(&self) -> SharedLog<W> {
        self.log.clone()
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, EventlogSink<PublishingWriter<W>>>> {
        self.log.lock().map_err(|_| poisoned())
    }

    /// What the log did so far.
    pub fn stats(&self) -> SinkStats {
        self.lock().map(|l| l.stats().clone()).unwrap_or_default()
    }
}

impl<W: io::Write> Sink for StreamSink<W> {
    fn record(&mut self, event: Event) -> io::Result<()> {
        self.lock()?.record(event)
    }

    fn flush(&mut self) -> io::Result<()> {
        let r = self.lock()?.flush();
        self.position.set_state(STATE_ENDED);
        r
    }

    fn attached(&mut self) -> io::Result<()> {
        self.lock()?.attached()?;
        self.position.set_state(STATE_ATTACHED);
        Ok(())
    }

    fn checkpoint(&mut self, epoch: u64) -> io::Result<Cut> {
        self.lock()?.checkpoint(epoch)
    }

    fn checkpoint_done(&mut self) -> io::Result<()> {
        self.lock()?.checkpoint_done()
    }
}

/// Errors starting the ingress log.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The network namespace could not be opened or entered.
    #[error("entering the network namespace {path}: {err}")]
    Netns {
        /// The namespace.
        path: String,
        /// Why.
        err: io::Error,
    },
    /// The queue could not be bound.
    #[error("binding NFQUEUE {queue} for the ingress log: {err}")]
    Bind {
        /// The queue.
        queue: u16,
        /// Why.
        err: io::Error,
    },
    /// The thread could not be started.
    #[error("starting the ingress thread: {0}")]
    Thread(io::Error),
}

/// Starts the ingress thread: binds NFQUEUE `queue` (whole packets) inside `netns` and logs
/// every packet into `log` before accepting it. Returns once the queue is bound. The thread
/// ends when `stop` is set (checked every 200 ms) or when the log refuses a packet (then no
/// packet is accepted any more: the kernel drops what the queue holds once it is unbound).
pub fn spawn_ingress<W: io::Write + Send + 'static>(
    netns: &Path,
    queue: u16,
    log: SharedLog<W>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, IngressError> {
    let ns = File::open(netns).map_err(|err| IngressError::Netns {
        path: netns.display().to_string(),
        err,
    })?;
    let path = netns.display().to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("rrc-ingress".into())
        .spawn(move || {
            // SAFETY: setns with a valid netns descriptor; it moves only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = ready_tx.send(Err(IngressError::Netns {
                    path,
                    err: io::Error::last_os_error(),
                }));
                return;
            }
            match NfQueue::bind_copy(queue, 1 << 16) {
                Ok(q) => {
                    let _ = ready_tx.send(Ok(()));
                    ingress_loop(q, &log, &stop);
                }
                Err(err) => {
                    let _ = ready_tx.send(Err(IngressError::Bind { queue, err }));
                }
            }
        })
        .map_err(IngressError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(IngressError::Thread(io::Error::other(
            "the ingress thread died while starting",
        ))),
    }
}

fn ingress_loop<W: io::Write>(mut q: NfQueue, log: &SharedLog<W>, stop: &AtomicBool) {
    let mut packets: Vec<(u32, Vec<u8>)> = Vec::new();
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if packets.is_empty() {
            let mut fds = [libc::pollfd {
                fd: q.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: polls one valid pollfd.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, 200) };
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                log::error!("ingress log: poll failed: {}", io::Error::last_os_error());
                return;
            }
        }
        if let Err(e) = q.recv_packets(&mut packets) {
            log::warn!("ingress log: receiving packets: {e}");
        }
        if packets.is_empty() {
            continue;
        }
        let mut logged = 0usize;
        {
            let Ok(mut l) = log.lock() else {
                log::error!("ingress log: {}", poisoned());
                return;
            };
            for (_, p) in &packets {
                match l.ingress(p) {
                    Ok(true) => logged += 1,
                    // The segment is not open yet: keep the rest for later.
                    Ok(false) => break,
                    Err(e) => {
                        log::error!(
                            "ingress log: the log refused a packet ({e}); no more packets are \
                             let in"
                        );
                        return;
                    }
                }
            }
        }
        if logged > 0 {
            let last = packets[logged - 1].0;
            if let Err(e) = q.accept_upto(last) {
                log::error!("ingress log: accepting packets up to {last}: {e}");
            }
            packets.drain(..logged);
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Where the code scanner's findings go: into the log, and a summary line on stderr.
pub fn scan_report<W: io::Write + Send + 'static>(log: SharedLog<W>) -> Report {
    Box::new(move |pid, findings| {
        let Ok(mut l) = log.lock() else {
            return true;
        };
        match l.scan_findings(pid, findings) {
            Ok(false) => return false,
            Ok(true) => {}
            Err(e) => {
                eprintln!("rrc-recorder: logging what the code scan found in process {pid}: {e}");
                return true;
            }
        }
        drop(l);
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        for f in findings {
            match f {
                Finding::Site { site, .. } => {
                    *counts.entry(crate::scan::name(site.what)).or_default() += 1
                }
                Finding::Gap { detail, .. } => eprintln!("rrc-recorder: process {pid}: {detail}"),
            }
        }
        if !counts.is_empty() {
            let list: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
            eprintln!(
                "rrc-recorder: process {pid}: its code holds {} site(s), which cannot be \
                 trapped here (logged as unrecordable; a replay may diverge if one runs)",
                list.join(", ")
            );
        }
        true
    })
}
