//! Unit tests of the verifier: a consistent log passes, and each check catches a hand-made log
//! that violates it.

#![allow(clippy::unwrap_used)]

use crate::testutil::*;
use crate::verify::{nr, ClockKey, StreamRebuilder, MAX_VIOLATIONS};
use crate::*;

fn violations(records: &[Record]) -> Vec<Violation> {
    verify(records).violations
}

fn clock(clock: i32, sec: i64, nsec: i64) -> Event {
    Event::Time(Time::ClockGettime { clock, sec, nsec })
}

fn ingress(seq: u64, thread: Thread, interval_ns: u64) -> Record {
    Record::Event(EventRecord {
        seq,
        thread,
        interval_ns,
        event: Event::IngressPacket { bytes: vec![1] },
    })
}

fn signal_at(seq: u64) -> Event {
    Event::Signal {
        signo: 10,
        delivered_at: Delivery::Syscall { seq },
        siginfo: vec![],
    }
}

#[test]
fn a_consistent_log_passes() {
    let entries: Vec<_> = every_kind()
        .into_iter()
        .map(|(t, e)| (t, if t.is_none() { 0 } else { 7 }, e))
        .collect();
    let (bytes, _) = write_log(1, &[entries.clone(), entries[..1].to_vec()], true);
    let records = Reader::new(&bytes).read_all().unwrap();
    let report = verify(&records);
    assert!(report.is_ok(), "{:?}", report.violations);
    assert_eq!(report.segments, 2);
    assert_eq!(report.events, entries.len() as u64 + 1);
    assert_eq!(report.records, entries.len() as u64 + 5);
    assert_eq!(report.threads, 3);
    assert_eq!(report.kinds["time"], 5);
    assert_eq!(report.kinds["syscall-result"], 2);
}

#[test]
fn gaps_are_reported() {
    let v = violations(&[start(1, &[T1]), ev(1, T1, futex(1)), ev(3, T1, futex(1))]);
    assert_eq!(
        v,
        [Violation::Gap {
            expected: 2,
            found: 3
        }]
    );
    // A duplicate: a gap, and the thread's order broken.
    let v = violations(&[start(1, &[T1]), ev(1, T1, futex(1)), ev(1, T1, futex(1))]);
    assert_eq!(
        v,
        [
            Violation::Gap {
                expected: 2,
                found: 1
            },
            Violation::ThreadOutOfOrder {
                seq: 1,
                thread: T1,
                previous: 1
            }
        ]
    );
    // A segment end that disagrees.
    let v = violations(&[start(5, &[T1]), ev(5, T1, futex(1)), end(7)]);
    assert_eq!(
        v,
        [Violation::Gap {
            expected: 6,
            found: 7
        }]
    );
}

#[test]
fn a_thread_out_of_order_is_reported() {
    let v = violations(&[
        start(1, &[T1, T2]),
        ev(1, T2, futex(1)),
        ev(3, T1, futex(1)),
        ev(2, T1, futex(1)),
    ]);
    assert!(v.contains(&Violation::ThreadOutOfOrder {
        seq: 2,
        thread: T1,
        previous: 3
    }));
}

#[test]
fn a_record_before_its_thread_is_created_is_reported() {
    let v = violations(&[
        start(1, &[T1]),
        ev(1, T2, futex(1)),
        ev(
            2,
            T1,
            Event::ThreadCreate {
                child_tid: 2,
                flags: 0,
            },
        ),
        ev(3, T2, futex(1)),
    ]);
    assert_eq!(v, [Violation::NotAlive { seq: 1, thread: T2 }]);
    // A process's main thread before its fork.
    let child = Thread::main(9);
    let v = violations(&[
        start(1, &[T1]),
        ev(1, child, futex(1)),
        ev(
            2,
            T1,
            Event::ProcessFork {
                child_pid: 9,
                flags: 17,
            },
        ),
        ev(3, child, futex(1)),
    ]);
    assert_eq!(
        v,
        [Violation::NotAlive {
            seq: 1,
            thread: child
        }]
    );
}

#[test]
fn a_record_after_its_thread_exits_is_reported() {
    let v = violations(&[
        start(1, &[T1, T2]),
        ev(1, T2, Event::ThreadExit { status: 0 }),
        ev(2, T1, futex(1)),
        ev(3, T2, futex(1)),
    ]);
    assert_eq!(v, [Violation::NotAlive { seq: 3, thread: T2 }]);
}

#[test]
fn creating_a_live_thread_is_reported() {
    let v = violations(&[
        start(1, &[T1, T2]),
        ev(
            1,
            T1,
            Event::ThreadCreate {
                child_tid: 2,
                flags: 0,
            },
        ),
        ev(
            2,
            T1,
            Event::ProcessFork {
                child_pid: 1,
                flags: 17,
            },
        ),
    ]);
    assert_eq!(
        v,
        [
            Violation::AlreadyAlive { seq: 1, thread: T2 },
            Violation::AlreadyAlive { seq: 2, thread: T1 },
        ]
    );
}

#[test]
fn exec_ends_the_other_threads_and_renames_the_caller() {
    let t3 = Thread::new(1, 3);
    let records = [
        start(1, &[T1, T2, t3]),
        ev(1, T2, futex(1)),
        ev(
            2,
            T2,
            Event::Exec {
                path: b"/x".to_vec(),
            },
        ),
        // The caller is now 1/1; 1/2 and 1/3 are gone.
        ev(3, T1, futex(1)),
        ev(4, t3, futex(1)),
        ev(5, T2, futex(1)),
    ];
    assert_eq!(
        violations(&records),
        [
            Violation::NotAlive { seq: 4, thread: t3 },
            Violation::NotAlive { seq: 5, thread: T2 },
        ]
    );
}

#[test]
fn a_monotonic_clock_going_back_in_a_thread_is_reported() {
    let v = violations(&[
        start(1, &[T1, T2]),
        ev(1, T1, clock(1, 5, 0)),
        ev(2, T2, clock(1, 4, 0)), // another thread: not comparable
        ev(3, T1, clock(0, 1, 0)), // CLOCK_REALTIME may go back
        ev(4, T1, clock(0, 0, 0)),
        ev(5, T1, clock(1, 4, 999_999_999)),
        ev(6, T1, Event::Time(Time::Rdtsc { tsc: 100 })),
        ev(7, T1, Event::Time(Time::Rdtscp { tsc: 99, aux: 0 })),
    ]);
    assert_eq!(
        v,
        [
            Violation::ClockWentBack {
                seq: 5,
                thread: T1,
                clock: ClockKey::Clock(1),
                previous: 5_000_000_000,
                found: 4_999_999_999
            },
            Violation::ClockWentBack {
                seq: 7,
                thread: T1,
                clock: ClockKey::Tsc,
                previous: 100,
                found: 99
            },
        ]
    );
}

#[test]
fn misattributed_records_are_reported() {
    let v = violations(&[
        start(1, &[T1]),
        ingress(1, Thread::NONE, 0),
        ingress(2, T1, 0),
        ingress(3, Thread::NONE, 5),
        ev(4, Thread::NONE, futex(1)),
    ]);
    assert_eq!(v.len(), 3, "{v:?}");
    assert!(v
        .iter()
        .all(|v| matches!(v, Violation::BadAttribution { .. })));
}

#[test]
fn a_signal_delivery_point_must_be_the_threads_latest_syscall() {
    let records = [
        start(10, &[T1, T2]),
        ev(10, T1, futex(1)),
        ev(11, T2, futex(1)),
        ev(12, T1, signal_at(10)), // fine
        ev(13, T2, signal_at(10)), // T1's syscall
        ev(14, T1, signal_at(15)), // the future
        ev(15, Thread::new(1, 2), futex(1)),
    ];
    let v = violations(&records);
    assert_eq!(
        v,
        [
            Violation::BadDeliveryPoint {
                seq: 13,
                thread: T2,
                point: 10,
                latest: Some(11)
            },
            Violation::BadDeliveryPoint {
                seq: 14,
                thread: T1,
                point: 15,
                latest: Some(10)
            },
        ]
    );
    // A thread with no syscall in the log yet: the point must be before the log.
    let v = violations(&[start(10, &[T1]), ev(10, T1, signal_at(9))]);
    assert!(v.is_empty(), "{v:?}");
    let v = violations(&[start(10, &[T1]), ev(10, T1, signal_at(10))]);
    assert_eq!(v.len(), 1);
}

#[test]
fn segment_structure_is_checked() {
    let v = violations(&[ev(1, T1, futex(1))]);
    assert!(matches!(
        v[..],
        [
            Violation::Structure { seq: Some(1), .. },
            Violation::NotAlive { .. }
        ]
    ));
    let v = violations(&[start(1, &[T1]), start(1, &[T1])]);
    assert!(v.contains(&Violation::Structure {
        seq: None,
        what: "segment start inside an open segment"
    }));
    let v = violations(&[start(1, &[T1]), end(1), end(1)]);
    assert_eq!(
        v,
        [Violation::Structure {
            seq: None,
            what: "segment end outside a segment"
        }]
    );
    // The next segment continues the sequence and the live threads.
    let ok = [
        start(1, &[T1]),
        ev(
            1,
            T1,
            Event::ThreadCreate {
                child_tid: 2,
                flags: 0,
            },
        ),
        end(2),
        start(2, &[T2, T1]),
        ev(2, T2, futex(1)),
    ];
    assert!(violations(&ok).is_empty());
    let mut bad = ok.to_vec();
    bad[3] = start(3, &[T1, Thread::new(1, 5)]);
    bad[4] = ev(3, T1, futex(1));
    assert_eq!(
        violations(&bad),
        [
            Violation::Gap {
                expected: 2,
                found: 3
            },
            Violation::LiveSetMismatch {
                base_seq: 3,
                missing: vec![T2],
                unexpected: vec![Thread::new(1, 5)]
            }
        ]
    );
}

#[test]
fn violations_are_capped() {
    let mut records = vec![start(1, &[T1])];
    for seq in 1..=250 {
        records.push(ev(seq, T2, futex(1)));
    }
    let report = verify(&records);
    assert_eq!(report.violations.len(), MAX_VIOLATIONS);
    assert_eq!(report.omitted, 150);
    assert!(!report.is_ok());
}

fn result(nr: u64, args: Vec<u64>, ret: i64, writes: &[(u64, &[u8])]) -> Event {
    Event::SyscallResult {
        nr,
        args,
        ret,
        writes: writes
            .iter()
            .map(|&(addr, b)| MemWrite {
                addr,
                bytes: b.to_vec(),
            })
            .collect(),
    }
}

#[test]
fn received_streams_are_rebuilt_per_descriptor_and_connection() {
    let other = Thread::main(20);
    let records = [
        start(1, &[T1, T2, other]),
        ev(1, T1, result(nr::ACCEPT4, vec![3, 0, 0, 0], 5, &[])),
        ev(2, T1, read(5, b"GET ")),
        // A peek is not consumed.
        ev(
            3,
            T2,
            result(
                nr::RECVFROM,
                vec![5, 0x2000, 64, 2, 0, 0],
                3,
                &[(0x2000, b"/in")],
            ),
        ),
        // readv: two iovecs.
        ev(
            4,
            T2,
            result(
                nr::READV,
                vec![5, 0x3000, 2],
                6,
                &[(0x10, b"/in"), (0x20, b"dex")],
            ),
        ),
        // recvmsg: the data, then the msghdr fields it wrote.
        ev(
            5,
            T1,
            result(
                nr::RECVMSG,
                vec![5, 0x4000, 0],
                2,
                &[(0x10, b"\r\n"), (0x4008, &[0, 0, 0, 0])],
            ),
        ),
        // recvfrom with a short buffer write list: only `ret` bytes count.
        ev(
            6,
            T1,
            result(nr::RECVFROM, vec![5, 0x10, 64, 0], 1, &[(0x10, b"\nXYZ")]),
        ),
        // Another process's fd 5 is another stream.
        ev(7, other, read(5, b"other")),
        // A failed read adds nothing.
        ev(8, T1, result(nr::READ, vec![5, 0x10, 64], -11, &[])),
        ev(9, T1, read(5, b"")),
        // fd 5 accepted again: a new connection.
        ev(10, T1, result(nr::ACCEPT, vec![3, 0, 0], 5, &[])),
        ev(11, T1, read(5, b"second")),
        // Not the read family.
        ev(12, T1, result(1, vec![5, 0x10, 3], 3, &[(0x10, b"nop")])),
        // The second connection ends; fd 5 is then reused for a file (open is not in the
        // log): its data is a stream of its own, not more of the connection's.
        ev(13, T1, read(5, b"")),
        ev(14, T1, read(5, b"1 (server) R")),
    ];
    assert!(verify(&records).is_ok());
    let streams = received_streams(&records);
    assert!(streams.problems.is_empty(), "{:?}", streams.problems);
    let mine: Vec<_> = streams.of(1, 5).collect();
    assert_eq!(mine.len(), 3);
    assert_eq!(mine[2].data, b"1 (server) R");
    assert_eq!(mine[2].accepted_at, None);
    assert_eq!(mine[0].data, b"GET /index\r\n\n");
    assert_eq!(mine[0].accepted_at, Some(1));
    assert_eq!(mine[0].reads, 4);
    assert!(mine[0].eof);
    assert_eq!(mine[1].data, b"second");
    assert_eq!(mine[1].accepted_at, Some(10));
    assert!(mine[1].eof);
    let theirs: Vec<_> = streams.of(20, 5).collect();
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].data, b"other");
    assert_eq!(theirs[0].accepted_at, None);
    assert_eq!(streams.accepted().count(), 2);
}

#[test]
fn incomplete_results_are_reported_by_the_rebuild() {
    let records = [
        start(1, &[T1]),
        ev(
            1,
            T1,
            result(nr::READ, vec![4, 0x10, 64], 10, &[(0x10, b"abc")]),
        ),
        ev(2, T1, result(nr::READ, vec![], 1, &[(0x10, b"a")])),
    ];
    let streams = received_streams(&records);
    assert_eq!(
        streams.problems,
        [
            Violation::MissingBytes {
                seq: 1,
                ret: 10,
                recorded: 3
            },
            Violation::NoFd { seq: 2 }
        ]
    );
    assert_eq!(streams.streams[0].data, b"abc");
}

#[test]
fn a_client_stream_survives_the_wire_and_a_byte_by_byte_decoder() {
    // What a client sent, received by the application in uneven pieces.
    let sent: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut w = writer(Vec::new(), 1, &[T1]);
    w.append(T1, 3, &result(nr::ACCEPT, vec![3, 0, 0], 7, &[]))
        .unwrap();
    let mut off = 0;
    let mut n = 1;
    while off < sent.len() {
        let take = n.min(sent.len() - off);
        w.append(T1, 3, &read(7, &sent[off..off + take])).unwrap();
        w.append(T1, 1, &futex(0x10)).unwrap();
        off += take;
        n = n * 3 % 1021 + 1;
    }
    let bytes = w.finish().unwrap();

    let mut d = Decoder::new();
    let mut verifier = verify::Verifier::new();
    let mut rebuild = StreamRebuilder::new();
    for b in &bytes {
        d.push(std::slice::from_ref(b));
        while let Some(r) = d.next().unwrap() {
            verifier.check(&r);
            rebuild.feed(&r);
        }
    }
    d.finish().unwrap();
    assert!(verifier.finish().is_ok());
    let streams = rebuild.finish();
    let got: Vec<_> = streams.accepted().collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, sent);
}
