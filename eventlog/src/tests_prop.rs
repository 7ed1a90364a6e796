//! Property tests: arbitrary records and logs round-trip; a stream cut anywhere decodes to the
//! same records or asks for more; any damaged byte is detected; arbitrary bytes never panic.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use crate::testutil::*;
use crate::wire::{decode_header, decode_record, encode_record};
use crate::*;

fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        6 => (1u64..u64::MAX, entry()).prop_map(|(seq, (thread, interval_ns, event))| {
            Record::Event(EventRecord {
                seq,
                thread,
                interval_ns,
                event,
            })
        }),
        1 => (
            1u64..u64::MAX,
            any::<u64>(),
            ".{0,20}",
            proptest::collection::vec(thread(), 0..5)
        )
            .prop_map(|(base_seq, epoch, container_id, live)| {
                Record::SegmentStart(SegmentStart {
                    base_seq,
                    epoch,
                    container_id,
                    live,
                })
            }),
        1 => (1u64..=u64::MAX).prop_map(|next_seq| Record::SegmentEnd(SegmentEnd { next_seq })),
    ]
}

/// Decodes `bytes` pushed in the pieces `cuts` delimits, collecting every record.
fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> Result<Vec<Record>, EventLogError> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let to = to.clamp(from, bytes.len());
        d.push(&bytes[from..to]);
        from = to;
        while let Some(r) = d.next()? {
            out.push(r);
        }
    }
    d.finish()?;
    Ok(out)
}

proptest! {
    #[test]
    fn any_record_round_trips(r in record()) {
        let mut bytes = Vec::new();
        encode_record(&r, &mut bytes).unwrap();
        let (back, used) = decode_record(&bytes).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, r);
    }

    #[test]
    fn every_prefix_of_a_record_asks_for_more(r in record()) {
        let mut bytes = Vec::new();
        encode_record(&r, &mut bytes).unwrap();
        for n in 0..bytes.len() {
            prop_assert!(matches!(decode_record(&bytes[..n]), Ok(None)), "prefix {}", n);
        }
    }

    #[test]
    fn any_log_round_trips((base, segments, close) in log()) {
        let (bytes, expected) = write_log(base, &segments, close);
        prop_assert_eq!(Reader::new(&bytes).read_all().unwrap(), expected.clone());
        // In one piece and in arbitrary ones.
        prop_assert_eq!(decode_in_pieces(&bytes, &[]).unwrap(), expected);
    }

    #[test]
    fn any_split_of_a_stream_decodes_the_same(
        (base, segments, close) in log(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let (bytes, expected) = write_log(base, &segments, close);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_in_pieces(&bytes, &cuts).unwrap(), expected);
    }

    #[test]
    fn any_flipped_byte_is_detected(
        (base, segments, close) in log(),
        pos in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let (mut bytes, _) = write_log(base, &segments, close);
        let i = pos.index(bytes.len());
        bytes[i] ^= mask;
        prop_assert!(Reader::new(&bytes).read_all().is_err(), "byte {} ^ {:#x}", i, mask);
        prop_assert!(decode_in_pieces(&bytes, &[i]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        after_header in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut input = Vec::new();
        if after_header {
            wire::encode_header(&mut input);
        }
        input.extend_from_slice(&bytes);
        let _ = decode_header(&input);
        let _ = decode_record(&bytes);
        let mut reader = Reader::new(&input);
        let mut records = Vec::new();
        while let Ok(Some(r)) = reader.next() {
            records.push(r);
        }
        let _ = verify(&records);
        let _ = received_streams(&records);
        let _ = decode_in_pieces(&input, &[cut.index(input.len() + 1)]);
        let _ = segments(&input);
        let _ = CheckpointCut::at(3).keep_from(&input);
    }

    #[test]
    fn any_body_with_a_good_checksum_decodes_canonically_or_is_refused(
        body in proptest::collection::vec(any::<u8>(), 0..80),
        kind in prop_oneof![Just(0x01u8), Just(0x02), 0x10u8..=0x19, any::<u8>()],
    ) {
        let mut frame = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        frame.push(kind);
        frame.extend_from_slice(&body);
        let crc = crc32c::crc32c(&frame);
        frame.extend_from_slice(&crc.to_le_bytes());
        match decode_record(&frame) {
            Ok(Some((r, used))) => {
                prop_assert_eq!(used, frame.len());
                // Whatever decodes re-encodes to the same bytes: the encoding is canonical.
                let mut again = Vec::new();
                encode_record(&r, &mut again).unwrap();
                prop_assert_eq!(again, frame);
            }
            Ok(None) => prop_assert!(false, "a whole frame asked for more"),
            Err(e) => prop_assert!(matches!(e, EventLogError::Malformed { .. }), "{}", e),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn a_stream_cut_at_every_position_yields_the_same_records_or_asks_for_more(
        (base, segments, close) in log(),
    ) {
        let (bytes, expected) = write_log(base, &segments, close);
        for cut in 0..=bytes.len() {
            // The first piece alone: a prefix of the records, then "need more" (never an
            // error, never a record that is not in the log).
            let mut d = Decoder::new();
            d.push(&bytes[..cut]);
            let mut got = Vec::new();
            while let Some(r) = d.next().unwrap() {
                got.push(r);
            }
            prop_assert!(expected.starts_with(&got), "cut {}", cut);
            // A finished input cut there: the same prefix, then either a clean end (the cut is
            // between records) or a truncation.
            let mut reader = Reader::new(&bytes[..cut]);
            let mut read = Vec::new();
            let end = loop {
                match reader.next() {
                    Ok(Some(r)) => read.push(r),
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            prop_assert_eq!(&read, &got);
            match end {
                None => prop_assert!(d.finish().is_ok()),
                Some(e) => {
                    prop_assert!(matches!(e, EventLogError::Truncated { .. }), "{}", e);
                    prop_assert!(d.finish().is_err());
                }
            }
            // The rest: everything.
            d.push(&bytes[cut..]);
            while let Some(r) = d.next().unwrap() {
                got.push(r);
            }
            d.finish().unwrap();
            prop_assert_eq!(&got, &expected);
        }
    }
}
