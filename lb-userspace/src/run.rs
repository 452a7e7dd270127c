//! `lb run`: the standalone agent. Loads (or re-uses) the datapath, applies the config
//! file, and re-applies it as a diff whenever it changes; attaches the program to every
//! interface that matches the globs, including ones created later.
use std::{path::PathBuf, time::Duration};

use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::{
    config,
    dataplane::Dataplane,
    loader::{Datapath, LoadOptions},
    model::{desired_state, Config},
    Error, Result,
};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    pub interfaces: Vec<String>,
    pub load: LoadOptions,
    pub keep_pinned: bool,
    /// How often the file and the interface list are checked.
    pub poll: Duration,
}

pub fn compile_globs(globs: &[String]) -> Result<Vec<glob::Pattern>> {
    globs
        .iter()
        .flat_map(|g| g.split(','))
        .filter(|g| !g.is_empty())
        .map(|g| {
            glob::Pattern::new(g).map_err(|e| Error::Config(format!("interface glob {g:?}: {e}")))
        })
        .collect()
}

/// `compile_globs`, refusing an empty list (an agent that attaches nowhere is a mistake).
pub fn interface_patterns(globs: &[String]) -> Result<Vec<glob::Pattern>> {
    let patterns = compile_globs(globs)?;
    if patterns.is_empty() {
        return Err(Error::Config(
            "--interfaces: give at least one name or glob".into(),
        ));
    }
    Ok(patterns)
}

/// Loads (or re-uses) the datapath and wraps its maps in a writer seeded from them.
/// Shared by `lb run` and `lb agent`.
pub fn load_datapath(load: &LoadOptions) -> Result<(Datapath, Dataplane)> {
    let (datapath, maps) = Datapath::load(load)?;
    let plane = Dataplane::new(maps)?;
    Ok((datapath, plane))
}

/// First attachment, once the maps hold the state: removes link pins of interfaces that
/// are gone, then attaches to every matching interface.
pub fn start_attaching(datapath: &mut Datapath, patterns: &[glob::Pattern]) {
    datapath.prune_stale_link_pins();
    datapath.sync_interfaces(patterns);
    info!(interfaces = ?datapath.attached().collect::<Vec<_>>(), "running");
}

/// Resolves on SIGTERM or SIGINT.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::Load(format!("SIGTERM handler: {e}")))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| Error::Load(format!("SIGINT handler: {e}")))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

fn apply(plane: &mut Dataplane, cfg: &Config) {
    let desired = desired_state(&cfg.services, &cfg.endpoint_slices);
    let report = plane.sync(&desired);
    for e in &report.errors {
        error!("map update failed: {e}");
    }
    info!(
        frontends = desired.frontends.len(),
        backends = plane.state().backends.len(),
        map_ops = report.ops,
        errors = report.errors.len(),
        "synced"
    );
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let patterns = interface_patterns(&opts.interfaces)?;
    let mut last_text = std::fs::read(&opts.config)
        .map_err(|e| Error::Config(format!("{}: cannot read: {e}", opts.config.display())))?;
    let cfg = config::load(&opts.config)?;

    let (mut datapath, mut plane) = load_datapath(&opts.load)?;
    // Maps first, then attach: a new interface never sees a half-filled service table.
    apply(&mut plane, &cfg);
    start_attaching(&mut datapath, &patterns);

    let mut tick = tokio::time::interval(opts.poll);
    let shutdown = shutdown_signal()?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match std::fs::read(&opts.config) {
                    Ok(text) if text != last_text => {
                        last_text = text;
                        match config::load(&opts.config) {
                            Ok(cfg) => apply(&mut plane, &cfg),
                            Err(e) => error!("{e}; keeping the running state"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => warn!("{}: cannot read: {e}; keeping the running state", opts.config.display()),
                }
                datapath.sync_interfaces(&patterns);
            }
            _ = &mut shutdown => break,
        }
    }
    drop(plane);
    datapath.shutdown(opts.keep_pinned)
}
