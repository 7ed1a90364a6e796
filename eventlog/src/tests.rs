//! Unit tests of the format, the writer, the readers and positions.

#![allow(clippy::unwrap_used)]

use std::io;

use crate::testutil::*;
use crate::wire::{HEADER_LEN, MAX_RECORD};
use crate::*;

fn sample_log() -> (Vec<u8>, Vec<Record>) {
    let entries: Vec<_> = every_kind()
        .into_iter()
        .map(|(t, e)| (t, if t.is_none() { 0 } else { 1234 }, e))
        .collect();
    write_log(1, &[entries], true)
}

/// Every record's byte offset in an encoded log (headers excluded).
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        if bytes[pos..].starts_with(&wire::MAGIC) {
            pos += HEADER_LEN;
        }
        offsets.push(pos);
        let (_, used) = wire::decode_record(&bytes[pos..]).unwrap().unwrap();
        pos += used;
    }
    offsets
}

/// Rewrites the record at `at` with a new body and a valid checksum.
fn replace_body(bytes: &mut Vec<u8>, at: usize, body: &[u8]) {
    let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let mut rec = (body.len() as u32).to_le_bytes().to_vec();
    rec.extend_from_slice(body);
    let crc = crc32c::crc32c(&rec);
    rec.extend_from_slice(&crc.to_le_bytes());
    bytes.splice(at..at + 4 + len + 4, rec).for_each(drop);
}

fn body_of(record: &Record) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode_record(record, &mut out).unwrap();
    out[4..out.len() - 4].to_vec()
}

#[test]
fn every_kind_round_trips_through_writer_and_reader() {
    let (bytes, expected) = sample_log();
    let got = Reader::new(&bytes).read_all().unwrap();
    assert_eq!(got, expected);
    assert_eq!(got.len(), every_kind().len() + 2);
    // And through the stateless functions, record by record.
    for (off, want) in record_offsets(&bytes).into_iter().zip(&expected) {
        let (r, _) = wire::decode_record(&bytes[off..]).unwrap().unwrap();
        assert_eq!(&r, want);
    }
}

#[test]
fn example_bytes() {
    // The example of FORMAT.md.
    let mut w = Writer::new(
        Vec::new(),
        SegmentStart {
            base_seq: 1,
            epoch: 0,
            container_id: "c".into(),
            live: vec![Thread::main(7)],
        },
    )
    .unwrap();
    let seq = w
        .append(
            Thread::main(7),
            0,
            &Event::SyscallResult {
                nr: 318,
                args: vec![0x1000, 4, 0],
                ret: 4,
                writes: vec![MemWrite {
                    addr: 0x1000,
                    bytes: vec![0xde, 0xad, 0xbe, 0xef],
                }],
            },
        )
        .unwrap();
    assert_eq!(seq, 1);
    let bytes = w.finish().unwrap();
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex.join(" "),
        "52 52 43 45 56 4c 4f 47 02 00 2e b3 5f 9a \
         08 00 00 00 01 01 00 01 63 01 07 07 ea a1 6b a9 \
         15 00 00 00 10 01 07 07 00 be 02 03 80 20 04 00 08 01 80 20 04 de ad be ef 99 fe 28 3b \
         02 00 00 00 02 02 50 9c d8 4a"
    );
}

#[test]
fn empty_input_is_an_empty_log() {
    assert_eq!(Reader::new(&[]).next().unwrap(), None);
    let d = Decoder::new();
    d.finish().unwrap();
    assert_eq!(d.position(), Position::NONE);
}

#[test]
fn bad_magic_is_refused_early() {
    let err = Reader::new(b"GET / HTTP/1.1\r\n").next().unwrap_err();
    assert!(
        matches!(&err, EventLogError::BadMagic { offset: 0, found } if found == b"GET / HT"),
        "{err}"
    );
    // A stream decoder refuses on the first wrong byte, without waiting for a whole header.
    let mut d = Decoder::new();
    d.push(b"RX");
    assert!(matches!(d.next(), Err(EventLogError::BadMagic { .. })));
    // And keeps refusing.
    d.push(b"more");
    assert!(matches!(d.next(), Err(EventLogError::BadMagic { .. })));
}

/// `bytes` with its first segment header declaring `version` (checksum fixed).
fn with_version(mut bytes: Vec<u8>, version: u16) -> Vec<u8> {
    bytes[8..10].copy_from_slice(&version.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..10]);
    bytes[10..14].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn unknown_version_is_refused_with_a_clear_error() {
    let bytes = with_version(sample_log().0, 3);
    let err = Reader::new(&bytes).next().unwrap_err();
    assert!(
        matches!(
            err,
            EventLogError::UnknownVersion {
                offset: 0,
                found: 3,
                supported: 2
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("version 3"), "{err}");
    assert!(err.to_string().contains("reads versions 1 to 2"), "{err}");
    // Refused as soon as the version is there, before the header's checksum.
    assert!(matches!(
        wire::decode_header(&bytes[..10]),
        Err(EventLogError::UnknownVersion { found: 3, .. })
    ));
    let zero = with_version(sample_log().0, 0);
    assert!(matches!(
        Reader::new(&zero).next(),
        Err(EventLogError::UnknownVersion { found: 0, .. })
    ));
}

#[test]
fn a_version_1_log_is_still_read() {
    // Version 1 is version 2 without gap records: a log of the older writer reads the same.
    let (bytes, expected) = sample_log();
    let v1: Vec<Record> = expected
        .iter()
        .filter(|r| !matches!(r, Record::Event(e) if matches!(e.event, Event::Gap { .. })))
        .cloned()
        .collect();
    let mut w = None;
    for r in &v1 {
        match r {
            Record::SegmentStart(s) if w.is_none() => {
                w = Some(Writer::new(Vec::new(), s.clone()).unwrap());
            }
            Record::Event(e) => {
                if let Some(w) = w.as_mut() {
                    w.append(e.thread, e.interval_ns, &e.event).unwrap();
                }
            }
            _ => {}
        }
    }
    let written = w.unwrap().finish().unwrap();
    let old = with_version(written, 1);
    let read = Reader::new(&old).read_all().expect("a version 1 log reads");
    let events = |rs: &[Record]| -> Vec<(Thread, u64, Event)> {
        rs.iter()
            .filter_map(|r| match r {
                Record::Event(e) => Some((e.thread, e.interval_ns, e.event.clone())),
                _ => None,
            })
            .collect()
    };
    assert_eq!(events(&read), events(&v1));
    assert!(matches!(read.last(), Some(Record::SegmentEnd(_))));
    let _ = bytes;
}

#[test]
fn a_gap_round_trips_and_a_bad_one_is_refused() {
    let start = SegmentStart {
        base_seq: 1,
        epoch: 0,
        container_id: "c".into(),
        live: vec![Thread::main(7)],
    };
    let gap = Event::Gap {
        what: GapKind::ForeignAbi,
        ip: 0x401000,
        detail: "syscall 4 through the i386 ABI".into(),
    };
    let mut w = Writer::new(Vec::new(), start).unwrap();
    w.append(Thread::main(7), 5, &gap).unwrap();
    let bytes = w.finish().unwrap();
    let records = Reader::new(&bytes).read_all().unwrap();
    assert!(matches!(&records[1], Record::Event(e) if e.event == gap));
    assert!(!gap.is_syscall());
    assert_eq!(gap.kind_name(), "gap");
    // A gap kind this build does not know is malformed, not guessed at.
    let body_at = records_offsets(&bytes)[1];
    let mut bad = bytes.clone();
    // The kind byte of the gap follows the record's length (4), kind (1), seq, thread and
    // interval (one byte each here): offset 4 + 1 + 4.
    bad[body_at + 9] = 99;
    let err = Reader::new(&bad).read_all().unwrap_err();
    assert!(
        matches!(
            err,
            EventLogError::Corrupt { .. } | EventLogError::Malformed { .. }
        ),
        "{err}"
    );
}

/// The byte offset of every record after the header.
fn records_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = wire::HEADER_LEN;
    while at + 4 <= bytes.len() {
        out.push(at);
        let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        at += 4 + len as usize + 4;
    }
    out
}

#[test]
fn corrupt_header_and_record_are_refused() {
    let (bytes, _) = sample_log();
    let mut h = bytes.clone();
    h[12] ^= 1;
    assert!(matches!(
        Reader::new(&h).next(),
        Err(EventLogError::Corrupt { offset: 0, .. })
    ));

    let offsets = record_offsets(&bytes);
    let at = offsets[3];
    let mut r = bytes.clone();
    r[at + 6] ^= 0x40;
    let mut reader = Reader::new(&r);
    for _ in 0..3 {
        reader.next().unwrap().unwrap();
    }
    let err = reader.next().unwrap_err();
    match err {
        EventLogError::Corrupt {
            offset,
            expected,
            found,
        } => {
            assert_eq!(offset, at as u64);
            assert_ne!(expected, found);
        }
        other => panic!("{other}"),
    }
    // The error is final.
    assert!(matches!(reader.next(), Err(EventLogError::Corrupt { .. })));
}

#[test]
fn oversized_length_is_refused_before_the_body_arrives() {
    let mut bytes = Vec::new();
    wire::encode_header(&mut bytes);
    bytes.extend_from_slice(&(MAX_RECORD as u32 + 1).to_le_bytes());
    let mut d = Decoder::new();
    d.push(&bytes);
    assert!(matches!(
        d.next(),
        Err(EventLogError::TooLarge {
            offset: 14,
            len
        }) if len == MAX_RECORD as u64 + 1
    ));
    // The limit itself is accepted (the decoder waits for the body).
    let mut ok = Vec::new();
    wire::encode_header(&mut ok);
    ok.extend_from_slice(&(MAX_RECORD as u32).to_le_bytes());
    let mut d = Decoder::new();
    d.push(&ok);
    assert!(d.next().unwrap().is_none());
}

#[test]
fn a_truncated_file_is_refused_after_the_intact_records() {
    let (bytes, expected) = sample_log();
    let offsets = record_offsets(&bytes);
    let last = *offsets.last().unwrap();
    for cut in [last + 1, last + 4, last + 5, bytes.len() - 1] {
        let mut reader = Reader::new(&bytes[..cut]);
        for want in &expected[..expected.len() - 1] {
            assert_eq!(&reader.next().unwrap().unwrap(), want);
        }
        let err = reader.next().unwrap_err();
        assert!(
            matches!(err, EventLogError::Truncated { offset } if offset == last as u64),
            "cut {cut}: {err}"
        );
    }
    // Part of a header, a header alone, part of the segment start after it.
    for (cut, at) in [
        (3, 0),
        (10, 0),
        (HEADER_LEN, 0),
        (HEADER_LEN + 2, HEADER_LEN as u64),
    ] {
        let err = Reader::new(&bytes[..cut]).next().unwrap_err();
        assert!(
            matches!(err, EventLogError::Truncated { offset } if offset == at),
            "cut {cut}: {err}"
        );
    }
    // Cut exactly between records: a log with an open segment, which is fine.
    let got = Reader::new(&bytes[..last]).read_all().unwrap();
    assert_eq!(got, expected[..expected.len() - 1]);
}

#[test]
fn a_stream_waits_for_more_and_finish_reports_truncation() {
    let (bytes, expected) = sample_log();
    let mid = record_offsets(&bytes)[5] + 3;
    let mut d = Decoder::new();
    d.push(&bytes[..mid]);
    let mut got = Vec::new();
    while let Some(r) = d.next().unwrap() {
        got.push(r);
    }
    assert_eq!(got, expected[..5]);
    assert_eq!(d.buffered(), 3);
    assert_eq!(d.position(), Position::new(4));
    assert!(matches!(
        d.finish(),
        Err(EventLogError::Truncated { offset }) if offset == mid as u64 - 3
    ));
    d.push(&bytes[mid..]);
    while let Some(r) = d.next().unwrap() {
        got.push(r);
    }
    assert_eq!(got, expected);
    d.finish().unwrap();
    assert_eq!(d.offset(), bytes.len() as u64);
    assert_eq!(d.position(), Position::new(every_kind().len() as u64));

    // A header without its segment start is not a clean end either.
    let mut d = Decoder::new();
    d.push(&bytes[..HEADER_LEN]);
    assert!(d.next().unwrap().is_none());
    assert!(matches!(
        d.finish(),
        Err(EventLogError::Truncated { offset: 0 })
    ));
}

#[test]
fn gaps_duplicates_and_reorderings_are_refused() {
    let records = vec![
        start(10, &[T1]),
        ev(10, T1, futex(1)),
        ev(11, T1, futex(1)),
        ev(12, T1, futex(1)),
    ];
    let good = encode_all(&records);
    assert_eq!(Reader::new(&good).read_all().unwrap(), records);

    for (bad_seq, i) in [(13u64, 2usize), (10, 2), (12, 2), (9, 1)] {
        let mut recs = records.clone();
        if let Record::Event(e) = &mut recs[i] {
            e.seq = bad_seq;
        }
        let bytes = encode_all(&recs);
        let err = Reader::new(&bytes).read_all().unwrap_err();
        let expected = 10 + (i as u64 - 1);
        assert!(
            matches!(
                err,
                EventLogError::Gap { expected: e, found, .. } if e == expected && found == bad_seq
            ),
            "{err}"
        );
    }

    // A segment end that disagrees with the events, and a next segment that does not continue
    // where the previous one ended.
    for tail in [vec![end(14)], vec![end(13), start(14, &[T1])]] {
        let mut recs = records.clone();
        recs.extend(tail);
        let err = Reader::new(&encode_all(&recs)).read_all().unwrap_err();
        assert!(matches!(
            err,
            EventLogError::Gap {
                expected: 13,
                found: 14,
                ..
            }
        ));
    }
    let mut recs = records;
    recs.extend([end(13), start(13, &[T1]), ev(13, T1, futex(1))]);
    Reader::new(&encode_all(&recs)).read_all().unwrap();
}

#[test]
fn records_out_of_place_are_refused() {
    // An event right after a header.
    let mut bytes = Vec::new();
    wire::encode_header(&mut bytes);
    wire::encode_record(&ev(1, T1, futex(1)), &mut bytes).unwrap();
    assert!(matches!(
        Reader::new(&bytes).next(),
        Err(EventLogError::OutOfPlace { offset: 14, .. })
    ));
    // A segment start inside an open segment.
    let mut bytes = encode_all(&[start(1, &[T1]), ev(1, T1, futex(1))]);
    wire::encode_record(&start(2, &[T1]), &mut bytes).unwrap();
    let err = Reader::new(&bytes).read_all().unwrap_err();
    assert!(matches!(err, EventLogError::OutOfPlace { .. }), "{err}");
    // A record after a segment end, without a header: not a header.
    let mut bytes = encode_all(&[start(1, &[T1]), end(1)]);
    wire::encode_record(&ev(1, T1, futex(1)), &mut bytes).unwrap();
    let err = Reader::new(&bytes).read_all().unwrap_err();
    assert!(matches!(err, EventLogError::BadMagic { .. }), "{err}");
}

#[test]
fn malformed_bodies_with_good_checksums_are_refused() {
    let good = encode_all(&[start(1, &[T1]), ev(1, T1, read(3, b"ab"))]);
    let at = record_offsets(&good)[1];
    let body = body_of(&ev(1, T1, read(3, b"ab")));

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown kind", {
            let mut b = body.clone();
            b[0] = 0x7f;
            b
        }),
        ("trailing byte", {
            let mut b = body.clone();
            b.push(0);
            b
        }),
        ("empty body", vec![]),
        ("non-canonical varint seq", {
            let mut b = vec![body[0], 0x81, 0x00];
            b.extend_from_slice(&body[2..]);
            b
        }),
        ("seq 0", {
            let mut b = body.clone();
            b[1] = 0;
            b
        }),
        ("varint over 64 bits", {
            let mut b = vec![body[0]];
            b.extend_from_slice(&[0xff; 9]);
            b.push(0x02);
            b.extend_from_slice(&body[2..]);
            b
        }),
        ("body cut short", body[..body.len() - 1].to_vec()),
    ];
    // Seven arguments.
    let mut b = vec![0x10, 1, 1, 1, 0, 0, 7];
    b.extend_from_slice(&[0; 7]);
    b.extend_from_slice(&[0, 0]);
    cases.push(("seven arguments", b));
    // A write count larger than the bytes left.
    cases.push((
        "huge count",
        vec![0x10, 1, 1, 1, 0, 0, 0, 0, 0xff, 0xff, 0x03],
    ));
    // A tgid over 32 bits.
    cases.push((
        "tgid over 32 bits",
        vec![0x15, 1, 0x80, 0x80, 0x80, 0x80, 0x10, 1, 0, 0],
    ));
    // Unknown time source, delivery kind, instruction.
    cases.push(("time source 9", vec![0x11, 1, 1, 1, 0, 9, 0]));
    cases.push(("delivery 2", vec![0x16, 1, 1, 1, 0, 10, 2, 0]));
    cases.push(("instruction 5", vec![0x19, 1, 1, 1, 0, 5, 0]));

    for (what, body) in cases {
        let mut bytes = good.clone();
        replace_body(&mut bytes, at, &body);
        let err = Reader::new(&bytes).read_all().unwrap_err();
        assert!(
            matches!(err, EventLogError::Malformed { offset, .. } if offset == at as u64),
            "{what}: {err}"
        );
    }

    // A container id that is not UTF-8.
    let mut bytes = good.clone();
    replace_body(&mut bytes, HEADER_LEN, &[0x01, 1, 0, 1, 0xff, 0]);
    let err = Reader::new(&bytes).read_all().unwrap_err();
    assert!(err.to_string().contains("UTF-8"), "{err}");
    // A segment starting at 0.
    let mut bytes = good;
    replace_body(&mut bytes, HEADER_LEN, &[0x01, 0, 0, 0, 0]);
    let err = Reader::new(&bytes).read_all().unwrap_err();
    assert!(matches!(err, EventLogError::Malformed { .. }), "{err}");
}

#[test]
fn the_writer_refuses_what_it_could_not_read_back() {
    let mut w = writer(Vec::new(), 1, &[T1]);
    let before = w.get_ref().len();
    let seven = Event::SyscallResult {
        nr: 0,
        args: vec![0; 7],
        ret: 0,
        writes: vec![],
    };
    assert!(matches!(
        w.append(T1, 0, &seven),
        Err(EventLogError::Unencodable(_))
    ));
    let huge = Event::IngressPacket {
        bytes: vec![0; MAX_RECORD],
    };
    assert!(matches!(
        w.append(Thread::NONE, 0, &huge),
        Err(EventLogError::Unencodable(_))
    ));
    assert_eq!(w.get_ref().len(), before, "nothing written");
    // Still usable, and numbering did not move.
    assert_eq!(w.append(T1, 0, &futex(1)).unwrap(), 1);
    // Just under the limit is fine.
    let big = Event::IngressPacket {
        bytes: vec![0; MAX_RECORD - 20],
    };
    assert_eq!(w.append(Thread::NONE, 0, &big).unwrap(), 2);
    let bytes = w.finish().unwrap();
    assert_eq!(Reader::new(&bytes).read_all().unwrap().len(), 4);

    for base_seq in [0, u64::MAX] {
        let err = Writer::new(
            Vec::new(),
            SegmentStart {
                base_seq,
                epoch: 0,
                container_id: String::new(),
                live: vec![],
            },
        )
        .unwrap_err();
        assert!(matches!(err, EventLogError::Unencodable(_)), "{err}");
    }

    // Segment bookkeeping.
    let mut w = Writer::new(
        Vec::new(),
        SegmentStart {
            base_seq: 5,
            epoch: 3,
            container_id: "c".into(),
            live: vec![],
        },
    )
    .unwrap();
    assert!(w.start_segment(4, vec![]).is_err());
    w.end_segment().unwrap();
    assert!(w.end_segment().is_err());
    assert!(w.append(T1, 0, &futex(1)).is_err());
    w.start_segment(4, vec![]).unwrap();
    assert_eq!(w.epoch(), 4);
    assert!(w.is_open());
}

#[test]
fn the_writer_stops_after_an_output_error() {
    struct Failing(usize);
    impl io::Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("disk full"));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut w = writer(Failing(60), 1, &[T1]);
    let err = w.append(T1, 0, &read(3, &[0; 100])).unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(matches!(
        w.append(T1, 0, &futex(1)),
        Err(EventLogError::WriterFailed)
    ));
    assert!(matches!(w.finish(), Err(EventLogError::WriterFailed)));
}

#[test]
fn positions_and_cuts() {
    assert!(Position::NONE < Position::new(1));
    assert_eq!(Position::before(1), Position::NONE);
    assert_eq!(Position::before(0), Position::NONE);
    let p = Position::new(41);
    assert!(p.covers(41) && p.covers(1) && !p.covers(42));
    assert_eq!(p.next_seq(), 42);
    assert_eq!(Position::from_le_bytes(p.to_le_bytes()), p);
    assert_eq!(p.to_string(), "#41");

    let cut = CheckpointCut::at(10);
    assert!(cut.discards(9) && !cut.discards(10));
    assert_eq!(cut.covers(), Position::new(9));
    assert_eq!(cut.first_seq(), 10);
}

#[test]
fn positions_follow_the_writer_and_the_readers() {
    let mut w = writer(Vec::new(), 100, &[T1]);
    assert_eq!(w.position(), Position::new(99));
    w.append(T1, 0, &futex(1)).unwrap();
    assert_eq!(w.position(), Position::new(100));
    let bytes = w.into_inner();
    let mut r = Reader::new(&bytes);
    assert_eq!(r.position(), Position::NONE);
    r.next().unwrap();
    assert_eq!(r.position(), Position::new(99));
    r.next().unwrap();
    assert_eq!(r.position(), Position::new(100));
    assert_eq!(r.offset(), bytes.len());
}

#[test]
fn discarding_before_a_committed_checkpoint_drops_whole_segments() {
    // Segments [1, 4), [4, 7), and an open one from 7.
    let mut w = writer(Vec::new(), 1, &[T1]);
    let mut cuts = Vec::new();
    for epoch in 1..=2 {
        for _ in 0..3 {
            w.append(T1, 5, &futex(8)).unwrap();
        }
        cuts.push(w.rotate(epoch, vec![T1]).unwrap());
    }
    w.append(T1, 5, &futex(8)).unwrap();
    assert_eq!(cuts, [CheckpointCut::at(4), CheckpointCut::at(7)]);
    let open = w.into_inner();

    let spans = segments(&open).unwrap();
    assert_eq!(spans.len(), 3);
    assert_eq!(spans[0].range.start, 0);
    assert_eq!(spans[0].range.end, spans[1].range.start);
    assert_eq!(spans[1].range.end, spans[2].range.start);
    assert_eq!(spans[2].range.end, open.len());
    assert_eq!(
        spans.iter().map(|s| s.next_seq).collect::<Vec<_>>(),
        [Some(4), Some(7), None]
    );
    assert_eq!(spans[1].start.epoch, 1);

    let keep = |seq: u64, log: &[u8]| CheckpointCut::at(seq).keep_from(log).unwrap();
    assert_eq!(keep(1, &open), 0);
    assert_eq!(keep(3, &open), 0);
    assert_eq!(keep(4, &open), spans[1].range.start);
    assert_eq!(keep(5, &open), spans[1].range.start);
    assert_eq!(keep(7, &open), spans[2].range.start);
    assert_eq!(
        keep(1000, &open),
        spans[2].range.start,
        "an open segment is kept"
    );

    // What is kept reads on its own, from the cut.
    let kept = &open[keep(7, &open)..];
    let records = Reader::new(kept).read_all().unwrap();
    assert_eq!(records[0], {
        let mut s = start(7, &[T1]);
        if let Record::SegmentStart(s) = &mut s {
            s.epoch = 2;
            s.container_id = "c".into();
        }
        s
    });
    assert_eq!(records[1].seq(), Some(7));

    // A closed log whose every segment is before the cut: all of it goes.
    let mut closed = open.clone();
    wire::encode_record(&end(8), &mut closed).unwrap();
    assert_eq!(keep(8, &closed), closed.len());
    assert_eq!(keep(7, &closed), spans[2].range.start);
}

#[test]
fn flipping_any_byte_of_an_encoded_log_is_detected() {
    let (bytes, expected) = sample_log();
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= mask;
            match Reader::new(&b).read_all() {
                Err(_) => {}
                Ok(records) => panic!(
                    "byte {i} ^ {mask:#x} went unnoticed: {} records (expected an error; \
                     originally {})",
                    records.len(),
                    expected.len()
                ),
            }
        }
    }
}

#[test]
fn errors_say_where_and_what() {
    let e = EventLogError::Corrupt {
        offset: 77,
        expected: 1,
        found: 2,
    };
    assert!(e.to_string().contains("byte 77"), "{e}");
    let e = EventLogError::Truncated { offset: 5 };
    assert!(e.to_string().contains("truncated"), "{e}");
    let e = EventLogError::Gap {
        offset: 1,
        expected: 3,
        found: 5,
    };
    assert!(
        e.to_string()
            .contains("expected sequence number 3, found 5"),
        "{e}"
    );
}
