//! `containerd-shim-rrc-v2`: the binary containerd runs for `--runtime io.containerd.rrc.v2`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};
use rrc_shim::service::{options_from_stdin, Service};
use rrc_shim::RUNTIME_NAME;

/// `-info`: what containerd's `RuntimeInfo` asks of a shim, with runc's OCI features.
fn info() -> anyhow::Result<()> {
    let opts = options_from_stdin().map_err(|e| anyhow::anyhow!("{e}"))?;
    let runc = if opts.binary_name.is_empty() {
        "runc".to_string()
    } else {
        opts.binary_name.clone()
    };
    let out = std::process::Command::new(&runc)
        .arg("features")
        .output()
        .with_context(|| format!("run {runc} features"))?;
    anyhow::ensure!(
        out.status.success(),
        "{runc} features failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut info = RuntimeInfo {
        name: "containerd-shim-rrc-v2".to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        features: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
                .to_string(),
            value: out.stdout,
            ..Default::default()
        }),
        ..Default::default()
    };
    info.annotations
        .insert("io.containerd.rrc.modes".into(), "off".into());
    let any = Any {
        type_url: "io.containerd.rrc.v2.Info".to_string(),
        value: info.write_to_bytes()?,
        ..Default::default()
    };
    std::io::stdout().write_all(&any.write_to_bytes()?)?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-rrc-v2: {e}");
            return ExitCode::FAILURE;
        }
    };
    if flags.version {
        println!("containerd-shim-rrc-v2:");
        println!("  Runtime: {RUNTIME_NAME}");
        println!("  Version: {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if flags.info {
        return match info() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("containerd-shim-rrc-v2 -info: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-rrc-v2: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(containerd_shim::asynchronous::run::<Service>(
        RUNTIME_NAME,
        None,
    ));
    ExitCode::SUCCESS
}
