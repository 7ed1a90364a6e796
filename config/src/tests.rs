use std::collections::HashMap;
use std::io::Write;

use super::*;

fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (format!("{ANNOTATION_PREFIX}{k}"), v.to_string()))
        .collect()
}

fn key_file(len: usize) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(&vec![7u8; len]).expect("write key");
    f
}

fn load(a: &HashMap<String, String>) -> Result<RrcConfig, ConfigError> {
    RrcConfig::load(a, None)
}

#[test]
fn no_settings_is_mode_off_with_defaults() {
    let mut a = HashMap::new();
    a.insert("io.kubernetes.cri.sandbox-id".to_string(), "x".to_string());
    let cfg = load(&a).expect("valid");
    assert_eq!(cfg.mode, Mode::Off);
    assert_eq!(cfg.epoch, DEFAULT_EPOCH);
    assert_eq!(DEFAULT_EPOCH, Duration::from_millis(1000));
    assert!(!cfg.is_configured());
}

#[test]
fn peer_implies_passive_and_requires_key() {
    let err = load(&ann(&[("peer", "198.18.0.3:7070")])).expect_err("needs key");
    assert!(err.to_string().contains("auth-key-file"), "{err}");
    let key = key_file(32);
    let path = key.path().to_str().expect("utf8").to_string();
    let cfg = load(&ann(&[
        ("peer", "198.18.0.3:7070"),
        ("auth-key-file", &path),
    ]))
    .expect("ok");
    assert_eq!(cfg.mode, Mode::Passive);
    assert_eq!(cfg.role, Role::Primary);
    assert_eq!(
        cfg.peer.as_ref().and_then(Address::socket_addr),
        Some("198.18.0.3:7070".parse().expect("addr"))
    );
}

#[test]
fn backup_gets_default_listen_address() {
    let key = key_file(16);
    let path = key.path().to_str().expect("utf8").to_string();
    let cfg = load(&ann(&[("role", "backup"), ("auth-key-file", &path)])).expect("ok");
    assert_eq!(cfg.role, Role::Backup);
    assert_eq!(cfg.listen.map(|a| a.port), Some(DEFAULT_LISTEN_PORT));
}

#[test]
fn unknown_key_under_prefix_is_refused() {
    let err = load(&ann(&[("epoch", "100")])).expect_err("unknown");
    let msg = err.to_string();
    assert!(msg.contains("io.containerd.rrc.epoch"), "{msg}");
    assert!(msg.contains("epoch-ms"), "lists known keys: {msg}");
}

#[test]
fn epoch_zero_and_garbage_are_refused() {
    for bad in ["0", "-5", "ten", "", "60001"] {
        let err = load(&ann(&[("epoch-ms", bad)])).expect_err(bad);
        assert!(
            matches!(
                err,
                ConfigError::InvalidValue {
                    key: "epoch-ms",
                    ..
                }
            ),
            "{bad}: {err}"
        );
        assert!(
            err.to_string().contains("io.containerd.rrc.epoch-ms"),
            "{err}"
        );
    }
    let cfg = load(&ann(&[("epoch-ms", "250")])).expect("valid");
    assert_eq!(cfg.epoch, Duration::from_millis(250));
    assert_eq!(cfg.mode, Mode::Off);
}

#[test]
fn bad_addresses_are_refused() {
    for bad in [
        "198.18.0.3",
        "198.18.0.3:0",
        "198.18.0.3:99999",
        "198.18.0:7070",
        ":7070",
        "bad host:7070",
        "-x:1",
        "[::1]",
    ] {
        let err = load(&ann(&[("peer", bad)])).expect_err(bad);
        assert!(
            matches!(err, ConfigError::InvalidValue { key: "peer", .. }),
            "{bad}: {err}"
        );
    }
    for good in ["backup.example:7070", "[fd00::1]:7070", "10.1.2.3:1"] {
        let a: Address = good.parse().expect(good);
        assert_eq!(a.to_string(), good);
    }
}

#[test]
fn unreadable_missing_short_or_relative_key_file_is_refused() {
    let short = key_file(8);
    let dir = tempfile::tempdir().expect("dir");
    for (path, what) in [
        ("/nonexistent/rrc.key".to_string(), "cannot read"),
        (short.path().display().to_string(), "at least 16"),
        ("relative/key".to_string(), "absolute"),
        (dir.path().display().to_string(), "regular file"),
    ] {
        let err = load(&ann(&[("auth-key-file", &path)])).expect_err(&path);
        let msg = err.to_string();
        assert!(msg.contains("auth-key-file") && msg.contains(what), "{msg}");
    }
}

#[test]
fn bad_enums_are_refused() {
    for (k, v) in [
        ("mode", "active"),
        ("role", "leader"),
        ("on-recorder-failure", "ignore"),
    ] {
        let err = load(&ann(&[(k, v)])).expect_err(v);
        assert!(err.to_string().contains(k), "{err}");
    }
}

#[test]
fn failover_timeout_must_exceed_heartbeat() {
    let key = key_file(32);
    let path = key.path().to_str().expect("utf8").to_string();
    let err = load(&ann(&[
        ("role", "backup"),
        ("auth-key-file", &path),
        ("heartbeat-ms", "100"),
        ("failover-timeout-ms", "100"),
    ]))
    .expect_err("inconsistent");
    assert!(matches!(err, ConfigError::Inconsistent(_)), "{err}");
}

#[test]
fn primary_without_peer_is_refused() {
    let key = key_file(32);
    let path = key.path().to_str().expect("utf8").to_string();
    let err = load(&ann(&[("mode", "hybrid"), ("auth-key-file", &path)])).expect_err("no peer");
    assert!(err.to_string().contains("peer"), "{err}");
}

#[test]
fn file_values_and_annotation_precedence() {
    let mut f = tempfile::NamedTempFile::new().expect("tmp");
    writeln!(f, "epoch-ms = 200\nheartbeat-ms = \"20\"").expect("write");
    let a = ann(&[("epoch-ms", "300")]);
    let cfg = RrcConfig::load(&a, Some(f.path())).expect("valid");
    assert_eq!(cfg.epoch, Duration::from_millis(300), "annotation wins");
    assert_eq!(cfg.heartbeat, Duration::from_millis(20), "file applies");
    assert!(matches!(
        cfg.sources.get("epoch-ms"),
        Some(Source::Annotation(_))
    ));
    assert!(matches!(
        cfg.sources.get("heartbeat-ms"),
        Some(Source::File(_))
    ));
}

#[test]
fn bad_files_are_refused_with_the_path() {
    let mut f = tempfile::NamedTempFile::new().expect("tmp");
    writeln!(f, "epoch-ms = [1, 2]").expect("write");
    let err = RrcConfig::load(&HashMap::new(), Some(f.path())).expect_err("array");
    assert!(matches!(err, ConfigError::BadFile { .. }), "{err}");

    let mut g = tempfile::NamedTempFile::new().expect("tmp");
    writeln!(g, "epoch-ms = ").expect("write");
    let err = RrcConfig::load(&HashMap::new(), Some(g.path())).expect_err("syntax");
    assert!(
        err.to_string().contains(&g.path().display().to_string()),
        "{err}"
    );

    let mut h = tempfile::NamedTempFile::new().expect("tmp");
    writeln!(h, "epochs = 5").expect("write");
    let err = RrcConfig::load(&HashMap::new(), Some(h.path())).expect_err("unknown");
    assert!(matches!(err, ConfigError::UnknownKey { .. }), "{err}");

    let err = RrcConfig::load(&HashMap::new(), Some(Path::new("/nonexistent/rrc.toml")))
        .expect_err("missing");
    assert!(matches!(err, ConfigError::ReadFile { .. }), "{err}");
}

#[test]
fn every_key_is_documented_and_parsed() {
    // Each documented key must be accepted by the parser (with some valid value).
    let key = key_file(32);
    let path = key.path().to_str().expect("utf8").to_string();
    let valid: HashMap<&str, &str> = [
        ("mode", "off"),
        ("role", "backup"),
        ("peer", "198.18.0.3:7070"),
        ("listen", "0.0.0.0:7070"),
        ("epoch-ms", "100"),
        ("auth-key-file", path.as_str()),
        ("heartbeat-ms", "50"),
        ("failover-timeout-ms", "500"),
        ("on-recorder-failure", "continue-unprotected"),
        ("recorder-cpu", "1"),
        ("log-archive", "/var/lib/rrc/logs"),
    ]
    .into_iter()
    .collect();
    for doc in KEYS {
        let v = valid.get(doc.key).expect("every key has a test value");
        // A replicated setting needs a peer and a key beside it.
        let pairs = [
            ("peer", "198.18.0.3:7070"),
            ("auth-key-file", path.as_str()),
            (doc.key, v),
        ];
        load(&ann(&pairs)).unwrap_or_else(|e| panic!("{}: {e}", doc.key));
    }
    assert_eq!(valid.len(), KEYS.len());
}

#[test]
fn recorder_cpu_is_a_cpu_number() {
    let cfg = load(&ann(&[("recorder-cpu", "3")])).expect("valid");
    assert_eq!(cfg.recorder_cpu, Some(3));
    for bad in ["-1", "one", "1024"] {
        let err = load(&ann(&[("recorder-cpu", bad)])).expect_err(bad);
        assert!(err.to_string().contains("recorder-cpu"), "{err}");
    }
}

#[test]
fn log_archive_is_an_absolute_directory() {
    let cfg = load(&ann(&[("log-archive", "/var/lib/rrc/logs")])).expect("valid");
    assert_eq!(cfg.log_archive, Some(PathBuf::from("/var/lib/rrc/logs")));
    let err = load(&ann(&[("log-archive", "logs")])).expect_err("relative");
    assert!(err.to_string().contains("absolute directory"), "{err}");
    let file = tempfile::NamedTempFile::new().expect("tmp");
    let err =
        load(&ann(&[("log-archive", &file.path().display().to_string())])).expect_err("a file");
    assert!(err.to_string().contains("not a directory"), "{err}");
}
