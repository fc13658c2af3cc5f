//! Compiles `proto/**/*.proto` with protox (a pure-Rust protobuf compiler) and prost-build,
//! so a fresh machine builds with `cargo build` alone: no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut files: Vec<PathBuf> = Vec::new();
    collect_protos(&PathBuf::from("proto"), &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(&files, ["proto"])?;
    let mut config = prost_build::Config::new();
    // Payloads are shared between a frame and its retransmissions without copying.
    config.bytes(["."]);
    // Store objects are snapshotted on every manager: ordered maps make their encoding
    // identical everywhere.
    config.btree_map([".flotilla.objects"]);
    // The CA key must never reach a log through `{:?}`: its Debug is written by hand
    // (src/proto.rs) and prints no key bytes.
    config.skip_debug([".flotilla.objects.RootCaKey"]);
    config.compile_fds(descriptors)?;
    Ok(())
}

fn collect_protos(dir: &PathBuf, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
