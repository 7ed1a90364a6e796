//! The `rrc-recorder` binary: record into an event log, `verify` it, and refuse a truncated, a
//! corrupted and a foreign file with a clear error naming the byte offset.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rrc-recorder"))
}

fn verify(path: &Path) -> (i32, String, String) {
    let out: Output = bin().arg("verify").arg(path).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn verify_accepts_a_recording_and_refuses_damaged_copies() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("rec.log");
    let st = bin()
        .args(["--container-id", "cli-test", "--out"])
        .arg(&log)
        .args([
            "--exec",
            "--",
            "/bin/sh",
            "-c",
            "head -c 64 /dev/urandom | od -An -tx1 >/dev/null; exit 4",
        ])
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(4), "the command's exit status");

    let (code, stdout, stderr) = verify(&log);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("consistent"), "{stdout}");
    assert!(stdout.contains("process-fork"), "{stdout}");
    let bytes = std::fs::read(&log).unwrap();
    let records = rrc_eventlog::Reader::new(&bytes).read_all().unwrap();
    match &records[0] {
        rrc_eventlog::Record::SegmentStart(s) => assert_eq!(s.container_id, "cli-test"),
        other => panic!("{other:?}"),
    }

    // The offset of a record in the middle: a reader's offset after half of the records.
    let mut reader = rrc_eventlog::Reader::new(&bytes);
    for _ in 0..records.len() / 2 {
        reader.next().unwrap();
    }
    let mid = reader.offset();
    assert!(mid > 14 && mid < bytes.len());

    // Truncated inside that record.
    let cut = dir.path().join("cut.log");
    std::fs::write(&cut, &bytes[..mid + 6]).unwrap();
    let (code, _, stderr) = verify(&cut);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "truncated: the input ends inside the header or record at byte {mid}"
        )),
        "{stderr}"
    );

    // One bit flipped in that record's body.
    let bad = dir.path().join("bad.log");
    let mut damaged = bytes.clone();
    damaged[mid + 5] ^= 0x10;
    std::fs::write(&bad, &damaged).unwrap();
    let (code, _, stderr) = verify(&bad);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("checksum mismatch at byte {mid}")),
        "{stderr}"
    );

    // Not an event log at all: the debug format.
    let json = dir.path().join("rec.jsonl");
    let st = bin()
        .args(["--format", "jsonl", "--out"])
        .arg(&json)
        .args(["--exec", "--", "/bin/true"])
        .status()
        .unwrap();
    assert!(st.success());
    let text = std::fs::read_to_string(&json).unwrap();
    assert!(text.lines().all(|l| l.starts_with("{\"seq\":")), "{text}");
    let (code, _, stderr) = verify(&json);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("not an rrc event log at byte 0"),
        "{stderr}"
    );

    // Usage errors.
    let out = bin().arg("verify").output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    let out = bin()
        .args(["--format", "xml", "--out", "-"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
}
