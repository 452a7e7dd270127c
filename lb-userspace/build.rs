//! Embeds the eBPF object built by `cargo xtask build-ebpf` (or the path in
//! `LB_EBPF_OBJECT`) into the binary, so one binary deploys.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let src = env::var_os("LB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf"));
    println!("cargo:rerun-if-changed={}", src.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("lb-ebpf.o");
    if let Err(e) = fs::copy(&src, &out) {
        panic!(
            "the eBPF object {} is missing ({e}): run `cargo xtask build-ebpf` first \
             (every `cargo xtask` command does it for you)",
            src.display()
        );
    }
}
