//! Helpers for the tests: hand-made records and proptest strategies.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use crate::*;

pub const T1: Thread = Thread::main(1);
pub const T2: Thread = Thread::new(1, 2);

pub fn start(base_seq: u64, live: &[Thread]) -> Record {
    Record::SegmentStart(SegmentStart {
        base_seq,
        epoch: 0,
        container_id: "c1".into(),
        live: live.to_vec(),
    })
}

/// A writer into `out` whose first segment starts at `base_seq` (epoch 0, container "c") with
/// the threads `live`.
pub fn writer<W: std::io::Write>(out: W, base_seq: u64, live: &[Thread]) -> Writer<W> {
    Writer::new(
        out,
        SegmentStart {
            base_seq,
            epoch: 0,
            container_id: "c".into(),
            live: live.to_vec(),
        },
    )
    .unwrap()
}

pub fn end(next_seq: u64) -> Record {
    Record::SegmentEnd(SegmentEnd { next_seq })
}

pub fn ev(seq: u64, thread: Thread, event: Event) -> Record {
    Record::Event(EventRecord {
        seq,
        thread,
        interval_ns: 10,
        event,
    })
}

/// A `read(fd, 0x1000, 4096)` that returned `data`.
pub fn read(fd: u64, data: &[u8]) -> Event {
    Event::SyscallResult {
        nr: verify::nr::READ,
        args: vec![fd, 0x1000, 4096],
        ret: data.len() as i64,
        writes: vec![MemWrite {
            addr: 0x1000,
            bytes: data.to_vec(),
        }],
    }
}

pub fn futex(addr: u64) -> Event {
    Event::SyncOrder {
        nr: verify::nr::FUTEX,
        addr,
        op: 0,
        ret: 0,
    }
}

/// Encodes records (headers before segment starts) into one byte string.
pub fn encode_all(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        if matches!(r, Record::SegmentStart(_)) {
            wire::encode_header(&mut out);
        }
        wire::encode_record(r, &mut out).unwrap();
    }
    out
}

/// A sample of every kind of event.
pub fn every_kind() -> Vec<(Thread, Event)> {
    vec![
        (T1, read(3, b"hello")),
        (
            T1,
            Event::Time(Time::ClockGettime {
                clock: 1,
                sec: 5,
                nsec: 999_999_999,
            }),
        ),
        (T1, Event::Time(Time::Gettimeofday { sec: -1, usec: 7 })),
        (T1, Event::Time(Time::Time { sec: 1_700_000_000 })),
        (T1, Event::Time(Time::Rdtsc { tsc: 1 << 40 })),
        (
            T1,
            Event::Time(Time::Rdtscp {
                tsc: u64::MAX,
                aux: u32::MAX,
            }),
        ),
        (
            T1,
            Event::ThreadCreate {
                child_tid: 2,
                flags: 0x3d0f00,
            },
        ),
        (T2, futex(0x7fff_0000)),
        (
            T2,
            Event::Signal {
                signo: 10,
                delivered_at: Delivery::Syscall { seq: 8 },
                siginfo: vec![10, 0, 0, 0],
            },
        ),
        (
            T2,
            Event::Signal {
                signo: 14,
                delivered_at: Delivery::BetweenSyscalls,
                siginfo: vec![0; 128],
            },
        ),
        (
            T2,
            Event::Unrecordable {
                what: Unrecordable::Cpuid,
                ip: 0x40_1000,
            },
        ),
        (
            T2,
            Event::Gap {
                what: GapKind::IncompleteCapture,
                ip: 0,
                detail: "recvmsg: the control data could not be read back".into(),
            },
        ),
        (T2, Event::ThreadExit { status: 0 }),
        (
            T1,
            Event::ProcessFork {
                child_pid: 9,
                flags: 17,
            },
        ),
        (
            Thread::NONE,
            Event::IngressPacket {
                bytes: vec![0x45; 60],
            },
        ),
        (
            Thread::main(9),
            Event::Exec {
                path: b"/bin/\xffsh".to_vec(),
            },
        ),
        (Thread::main(9), Event::ThreadExit { status: -1 }),
    ]
}

// ---- strategies -----------------------------------------------------------------------------

pub fn thread() -> impl Strategy<Value = Thread> {
    prop_oneof![
        Just(Thread::NONE),
        (1u32..5, 1u32..5).prop_map(|(g, t)| Thread::new(g, t)),
        any::<(u32, u32)>().prop_map(|(g, t)| Thread::new(g, t)),
    ]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

pub fn time() -> impl Strategy<Value = Time> {
    prop_oneof![
        any::<(i32, i64, i64)>().prop_map(|(clock, sec, nsec)| Time::ClockGettime {
            clock,
            sec,
            nsec
        }),
        any::<(i64, i64)>().prop_map(|(sec, usec)| Time::Gettimeofday { sec, usec }),
        any::<i64>().prop_map(|sec| Time::Time { sec }),
        any::<u64>().prop_map(|tsc| Time::Rdtsc { tsc }),
        any::<(u64, u32)>().prop_map(|(tsc, aux)| Time::Rdtscp { tsc, aux }),
    ]
}

pub fn event() -> impl Strategy<Value = Event> {
    let writes = proptest::collection::vec(
        (any::<u64>(), bytes(64)).prop_map(|(addr, bytes)| MemWrite { addr, bytes }),
        0..4,
    );
    prop_oneof![
        4 => (
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..=MAX_ARGS),
            any::<i64>(),
            writes
        )
            .prop_map(|(nr, args, ret, writes)| Event::SyscallResult {
                nr,
                args,
                ret,
                writes
            }),
        2 => time().prop_map(Event::Time),
        1 => any::<(u32, u64)>()
            .prop_map(|(child_tid, flags)| Event::ThreadCreate { child_tid, flags }),
        1 => any::<(u32, u64)>()
            .prop_map(|(child_pid, flags)| Event::ProcessFork { child_pid, flags }),
        1 => bytes(32).prop_map(|path| Event::Exec { path }),
        1 => any::<i32>().prop_map(|status| Event::ThreadExit { status }),
        1 => (
            any::<u32>(),
            prop_oneof![
                Just(Delivery::BetweenSyscalls),
                any::<u64>().prop_map(|seq| Delivery::Syscall { seq })
            ],
            bytes(130)
        )
            .prop_map(|(signo, delivered_at, siginfo)| Event::Signal {
                signo,
                delivered_at,
                siginfo
            }),
        1 => any::<(u64, u64, u64, i64)>().prop_map(|(nr, addr, op, ret)| Event::SyncOrder {
            nr,
            addr,
            op,
            ret
        }),
        1 => bytes(200).prop_map(|bytes| Event::IngressPacket { bytes }),
        1 => (
            prop_oneof![
                Just(Unrecordable::Cpuid),
                Just(Unrecordable::Rdrand),
                Just(Unrecordable::Rdseed),
                Just(Unrecordable::Rdpid)
            ],
            any::<u64>()
        )
            .prop_map(|(what, ip)| Event::Unrecordable { what, ip }),
        1 => (
            prop_oneof![
                Just(GapKind::ForeignAbi),
                Just(GapKind::IoUring),
                Just(GapKind::VdsoUnpatched),
                Just(GapKind::RdtscUntrapped),
                Just(GapKind::IncompleteCapture),
                Just(GapKind::UnscannedCode),
                Just(GapKind::Other)
            ],
            any::<u64>(),
            ".{0,40}"
        )
            .prop_map(|(what, ip, detail)| Event::Gap { what, ip, detail }),
    ]
}

/// A thread, an interval and an event.
pub type Entry = (Thread, u64, Event);

/// An event with its thread and interval, before numbering.
pub fn entry() -> impl Strategy<Value = Entry> {
    (thread(), any::<u64>(), event())
}

/// One or more segments of events, as a writer would produce them: `(base_seq, epochs and
/// events per segment, whether the last segment is closed)`.
pub fn log() -> impl Strategy<Value = (u64, Vec<Vec<Entry>>, bool)> {
    (
        prop_oneof![Just(1u64), 1u64..1 << 40, Just(u64::MAX - 100)],
        proptest::collection::vec(proptest::collection::vec(entry(), 0..8), 1..4),
        any::<bool>(),
    )
}

/// Writes a generated log; returns its bytes and the records a reader must return.
pub fn write_log(base: u64, segments: &[Vec<Entry>], close: bool) -> (Vec<u8>, Vec<Record>) {
    let live = vec![T1];
    let mut expected = Vec::new();
    let mut w: Option<Writer<Vec<u8>>> = None;
    for (i, events) in segments.iter().enumerate() {
        let epoch = i as u64;
        match w.as_mut() {
            None => {
                let s = SegmentStart {
                    base_seq: base,
                    epoch,
                    container_id: "ctr".into(),
                    live: live.clone(),
                };
                expected.push(Record::SegmentStart(s.clone()));
                w = Some(Writer::new(Vec::new(), s).unwrap());
            }
            Some(w) => {
                let next = w.next_seq();
                let cut = w.rotate(epoch, live.clone()).unwrap();
                assert_eq!(cut.first_seq(), next);
                expected.push(Record::SegmentEnd(SegmentEnd { next_seq: next }));
                expected.push(Record::SegmentStart(SegmentStart {
                    base_seq: next,
                    epoch,
                    container_id: "ctr".into(),
                    live: live.clone(),
                }));
            }
        }
        let w = w.as_mut().unwrap();
        for (thread, interval_ns, event) in events {
            let seq = w.append(*thread, *interval_ns, event).unwrap();
            expected.push(Record::Event(EventRecord {
                seq,
                thread: *thread,
                interval_ns: *interval_ns,
                event: event.clone(),
            }));
        }
    }
    let mut w = w.unwrap();
    if close {
        expected.push(Record::SegmentEnd(SegmentEnd {
            next_seq: w.next_seq(),
        }));
        w.end_segment().unwrap();
    }
    (w.into_inner(), expected)
}
