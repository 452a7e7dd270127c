//! Embeds the eBPF object built by `cargo xtask build-ebpf` (or the path in
//! `LB_EBPF_OBJECT`) into the binary, so one binary deploys.
//!
//! Without the object (a plain `cargo build` or `cargo test` on stable, before any
//! `cargo xtask` command ran) the crate still builds, so the pure tests run without
//! nightly or bpf-linker; the binary then refuses to load with a message that says how
//! to build the object, and this script prints a warning.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let src = env::var_os("LB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf"));
    // Watching the folder too: cargo then notices when the object appears.
    println!("cargo:rerun-if-changed={}", src.display());
    if let Some(dir) = src.parent().filter(|d| d.is_dir()) {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("lb-ebpf.o");
    match fs::copy(&src, &out) {
        Ok(_) => {}
        Err(e) => {
            println!(
                "cargo:warning=no eBPF object at {} ({e}): this build cannot load the \
                 dataplane; run `cargo xtask build-ebpf` (every `cargo xtask` command does it)",
                src.display()
            );
            println!("cargo:rustc-cfg=lb_no_ebpf_object");
        }
    }
}
