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
        .map(|g| glob::Pattern::new(g).map_err(|e| Error::Config(format!("interface glob {g:?}: {e}"))))
        .collect()
}

fn apply(plane: &mut Dataplane, cfg: &Config) {
    let desired = desired_state(&cfg.services, &cfg.endpoint_slices);
    let report = plane.sync(&desired);
    for e in &report.errors {
        error!("map update failed: {e}");
    }
    info!(
        frontends = desired.frontends.len(),
        backends = desired.backend_count(),
        map_ops = report.ops,
        errors = report.errors.len(),
        "synced"
    );
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let patterns = compile_globs(&opts.interfaces)?;
    if patterns.is_empty() {
        return Err(Error::Config("--interfaces: give at least one name or glob".into()));
    }
    let mut last_text = std::fs::read(&opts.config)
        .map_err(|e| Error::Config(format!("{}: cannot read: {e}", opts.config.display())))?;
    let cfg = config::load(&opts.config)?;

    let (mut datapath, maps) = Datapath::load(&opts.load)?;
    let mut plane = Dataplane::new(maps)?;
    // Maps first, then attach: a new interface never sees a half-filled service table.
    apply(&mut plane, &cfg);
    datapath.prune_stale_link_pins();
    datapath.sync_interfaces(&patterns);
    info!(interfaces = ?datapath.attached().collect::<Vec<_>>(), "running");

    let mut tick = tokio::time::interval(opts.poll);
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Load(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Load(e.to_string()))?;
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
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    drop(plane);
    datapath.shutdown(opts.keep_pinned)
}
