//! `cargo xtask fuzz [TARGET] [--seconds N]`: the fuzz targets of `fuzz/` (cargo-fuzz,
//! libFuzzer, on nightly with AddressSanitizer), each for N seconds, on a corpus seeded
//! from `fuzz/seeds/<target>/` and, for the config parser, `examples/`. Installs
//! cargo-fuzz first if it is missing (once, like bpf-linker).
use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{nightly_sysroot, root, run};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The targets (`fuzz/fuzz_targets/<name>.rs`), what each reads, and libFuzzer flags of
/// their own.
pub const TARGETS: &[(&str, &str, &[&str])] = &[
    (
        "config",
        "the config file (YAML or JSON) to the model, the cache and the map plan",
        &["-max_len=65536"],
    ),
    (
        "k8s_objects",
        "Kubernetes Node, Service and EndpointSlice JSON through the translation to the model",
        &["-max_len=65536"],
    ),
    (
        "k8s_events",
        "sequences of watch events made from the bytes, through the translation, the \
         cache and the writer's incremental plans",
        // Long inputs from the start: a few bytes make one event, and the interesting
        // cases need dozens.
        &["-max_len=4096", "-len_control=0"],
    ),
];

#[derive(clap::Args)]
pub struct Args {
    /// One target (config, k8s_objects, k8s_events); every one when not given.
    target: Option<String>,
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

fn cargo_fuzz_ok() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
        })
        .unwrap_or(false)
}

fn setup_cargo_fuzz() -> Result<()> {
    if cargo_fuzz_ok() {
        return Ok(());
    }
    eprintln!("installing cargo-fuzz {CARGO_FUZZ_VERSION} (a minute or two, once)");
    run(Command::new("cargo").args([
        "+stable",
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// Copies the seeds into the corpus folder (files already there are kept: the corpus
/// grows from run to run).
fn seed(target: &str, corpus: &Path) -> Result<()> {
    std::fs::create_dir_all(corpus).with_context(|| corpus.display().to_string())?;
    let mut dirs = vec![root().join("fuzz/seeds").join(target)];
    if target == "config" {
        dirs.push(root().join("examples"));
    }
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten().filter(|e| e.path().is_file()) {
            let to = corpus.join(format!("seed-{}", e.file_name().to_string_lossy()));
            if !to.exists() {
                std::fs::copy(e.path(), &to)
                    .with_context(|| format!("{} -> {}", e.path().display(), to.display()))?;
            }
        }
    }
    Ok(())
}

pub fn fuzz(args: &Args) -> Result<()> {
    let targets: Vec<&str> = match &args.target {
        Some(t) if TARGETS.iter().any(|(n, ..)| n == t) => vec![t.as_str()],
        Some(t) => bail!(
            "no fuzz target {t:?}; the targets: {}",
            TARGETS
                .iter()
                .map(|(n, what, _)| format!("{n} ({what})"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => TARGETS.iter().map(|(n, ..)| *n).collect(),
    };
    nightly_sysroot()?;
    setup_cargo_fuzz()?;
    for target in targets {
        let flags = TARGETS
            .iter()
            .find(|(n, ..)| *n == target)
            .map(|(.., f)| *f)
            .unwrap_or_default();
        let corpus = root().join("fuzz/corpus").join(target);
        seed(target, &corpus)?;
        eprintln!("fuzzing {target} for {} s", args.seconds);
        run(Command::new("cargo")
            .current_dir(root())
            .args(["+nightly", "fuzz", "run", target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            // 10 s for one input is a hang.
            .args(flags)
            .args(["-timeout=10", "-print_final_stats=1"])
            .env_remove("RUSTFLAGS"))
        .with_context(|| {
            format!(
                "fuzz target {target} failed: the input that made it fail is in \
                 fuzz/artifacts/{target}/ (replay: cargo +nightly fuzz run {target} FILE)"
            )
        })?;
    }
    Ok(())
}
