//! Fuzzes the event log's decoders: a log from the network or from disk must never crash a
//! shim. Whatever decodes must re-encode to the same bytes (the encoding is canonical), the
//! streaming decoder must agree with the file reader however the bytes are split, and the
//! verifier must take whatever decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rrc_eventlog::{received_streams, verify, wire, CheckpointCut, Decoder, Reader, Record};

fuzz_target!(|data: &[u8]| {
    // One record on its own.
    if let Ok(Some((record, used))) = wire::decode_record(data) {
        let mut again = Vec::new();
        wire::encode_record(&record, &mut again).expect("decoded records re-encode");
        assert_eq!(&data[..used], &again[..]);
    }
    let _ = wire::decode_header(data);

    // As a file, and the same bytes behind a valid header.
    let mut with_header = Vec::new();
    wire::encode_header(&mut with_header);
    with_header.extend_from_slice(data);
    for input in [data, &with_header[..]] {
        let mut reader = Reader::new(input);
        let mut records: Vec<Record> = Vec::new();
        let file_end = loop {
            match reader.next() {
                Ok(Some(r)) => records.push(r),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        let _ = verify(&records);
        let _ = received_streams(&records);
        let _ = CheckpointCut::at(2).keep_from(input);

        // As a stream in pieces whose sizes come from the data itself.
        let mut d = Decoder::new();
        let mut streamed = Vec::new();
        let mut stream_err = None;
        let mut pos = 0;
        let mut i = 0;
        while pos < input.len() && stream_err.is_none() {
            let step = 1 + usize::from(data.get(i).copied().unwrap_or(7)) % 64;
            i += 1;
            let to = (pos + step).min(input.len());
            d.push(&input[pos..to]);
            pos = to;
            loop {
                match d.next() {
                    Ok(Some(r)) => streamed.push(r),
                    Ok(None) => break,
                    Err(e) => {
                        stream_err = Some(e);
                        break;
                    }
                }
            }
        }
        assert_eq!(streamed, records, "stream and file readers disagree");
        let stream_end = match stream_err {
            Some(e) => Err(e),
            None => d.finish(),
        };
        assert_eq!(file_end.is_ok(), stream_end.is_ok());
    }
});
