//! `lb run`: the standalone agent. Loads (or re-uses) the datapath, hands the config file
//! to the writer thread, and hands it again whenever it changes (the writer writes only
//! the difference); attaches the program to every interface that matches the globs,
//! including ones created later.
use std::{path::PathBuf, time::Duration};

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tracing::{error, info, warn};

use crate::{
    config,
    dataplane::{
        gc,
        writer::{Status, Update, Writer, WriterOptions},
        Dataplane,
    },
    loader::{Datapath, Hook, LoadOptions},
    podpath::PodPath,
    Error, Result,
};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    /// How the file is read and validated (its size bound, the node port range).
    pub config_options: config::Options,
    pub interfaces: Vec<String>,
    pub external_interfaces: Vec<String>,
    pub load: LoadOptions,
    pub keep_pinned: bool,
    /// How often the file and the interface list are checked.
    pub poll: Duration,
    /// Conntrack's collector.
    pub conntrack: gc::GcOptions,
    /// How often the maps are checked against what was written (`None`: never).
    pub resync: Option<Duration>,
    /// The socket programs (connect-time balancing, host-network clients).
    pub sockets: crate::sockets::SockOptions,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_that_match_no_interface_are_named_with_their_flag() {
        let i = Interfaces::new(&["veth*,lxc*".into()], &["eth0".into(), "ens*".into()]).unwrap();
        let names = ["lo", "eth0", "veth12ab"].map(String::from);
        let unmatched: Vec<(&str, &str)> = i
            .unmatched(&names)
            .into_iter()
            .map(|(f, p)| (f, p.as_str()))
            .collect();
        assert_eq!(
            unmatched,
            [("--interfaces", "lxc*"), ("--external-interfaces", "ens*")]
        );
    }

    #[test]
    fn each_hook_is_wanted_where_its_flag_matches() {
        let i = Interfaces::new(&["lxc*".into()], &["eth0".into()]).unwrap();
        for hook in Hook::POD {
            assert!(i.wants(hook, "lxc-a"));
            assert!(!i.wants(hook, "eth0"));
            assert!(!i.wants(hook, "veth1"));
        }
        for hook in Hook::EXTERNAL {
            assert!(i.wants(hook, "eth0"));
            assert!(!i.wants(hook, "lxc-a"));
        }
    }
}

/// Which interfaces get which program: the pods' host-side veths get the tc program,
/// the node's external interfaces the XDP program.
#[derive(Clone, Debug)]
pub struct Interfaces {
    pub pods: Vec<glob::Pattern>,
    pub external: Vec<glob::Pattern>,
}

impl Interfaces {
    /// Refuses an empty pod list (an agent that attaches nowhere is a mistake); the
    /// external list may be empty (no NodePort from outside, and no XDP).
    pub fn new(pods: &[String], external: &[String]) -> Result<Self> {
        let pods = compile_globs(pods)?;
        if pods.is_empty() {
            return Err(Error::Config(
                "--interfaces: give at least one name or glob".into(),
            ));
        }
        let external = compile_globs(external)?;
        if let Some(p) = external.iter().find(|p| pods.iter().any(|q| q == *p)) {
            return Err(Error::Config(format!(
                "{p} is given both as a pod interface and as an external one"
            )));
        }
        Ok(Self { pods, external })
    }

    /// Whether `hook` is attached to the interface `name`: the pods' hooks where
    /// `--interfaces` matches, the external ones where `--external-interfaces` does.
    pub fn wants(&self, hook: Hook, name: &str) -> bool {
        let globs = if Hook::POD.contains(&hook) {
            &self.pods
        } else {
            &self.external
        };
        globs.iter().any(|p| p.matches(name))
    }

    /// The globs that match none of `names`, with their flag.
    pub fn unmatched<'a>(&'a self, names: &[String]) -> Vec<(&'static str, &'a glob::Pattern)> {
        let flagged = self
            .pods
            .iter()
            .map(|p| ("--interfaces", p))
            .chain(self.external.iter().map(|p| ("--external-interfaces", p)));
        flagged
            .filter(|(_, p)| !names.iter().any(|n| p.matches(n)))
            .collect()
    }

    /// Attaches to new interfaces and forgets vanished ones, for every hook (the pods'
    /// only with `pods`: `podpath` decides).
    pub fn sync(&self, datapath: &mut Datapath, pods: bool) {
        if pods {
            for hook in Hook::POD {
                datapath.sync_interfaces(hook, &self.pods);
            }
        }
        if !self.external.is_empty() {
            for hook in Hook::EXTERNAL {
                datapath.sync_interfaces(hook, &self.external);
            }
        }
    }
}

/// Loads (or re-uses) the datapath and wraps its maps in a writer seeded from them.
/// Shared by `lb run` and `lb agent`.
pub fn load_datapath(load: &LoadOptions) -> Result<(Datapath, Dataplane)> {
    let (datapath, maps) = Datapath::load(load)?;
    let plane = Dataplane::new(maps)?;
    Ok((datapath, plane))
}

/// Starts conntrack's collector on handles of its own: what the writer sends purges to,
/// and the collector's counters. The thread ends when the sender is dropped (with the
/// writer).
pub fn start_gc(
    plane: &Dataplane,
    opts: &gc::GcOptions,
    sockets: Option<crate::sockets::SockKiller>,
) -> Result<(
    std::sync::mpsc::Sender<gc::GcWork>,
    std::sync::Arc<gc::GcStats>,
)> {
    let maps = plane.maps.gc_maps()?;
    let max = plane
        .maps
        .conntrack_handle()
        .map(|c| c.max_entries())
        .unwrap_or(0);
    let mut collector = gc::Gc::new(maps, opts.timeouts);
    if let Some(mut killer) = sockets {
        collector = collector.on_purge(Box::new(move |gone| {
            if let Err(e) = killer.destroy(gone) {
                warn!("destroying the sockets of backends that left: {e}");
            }
        }));
    }
    let stats = collector.stats.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    gc::spawn(collector, opts.interval, max, rx)
        .map_err(|e| Error::Load(format!("starting the conntrack collector: {e}")))?;
    Ok((tx, stats))
}

/// First attachment, once the maps hold the state: removes link pins of interfaces that
/// are gone, then attaches to every matching interface, and tells the collector (which
/// may then build the conntrack filter: no program of an earlier build is left where
/// this agent attaches).
pub fn start_attaching(
    datapath: &mut Datapath,
    interfaces: &Interfaces,
    pods: &mut PodPath,
    status: &watch::Receiver<Status>,
    gc: &std::sync::mpsc::Sender<gc::GcWork>,
) {
    datapath.prune_stale_link_pins(|hook, name| interfaces.wants(hook, name));
    sync_interfaces(datapath, interfaces, pods, status);
    let names: Vec<String> = crate::loader::interfaces()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for (flag, glob) in interfaces.unmatched(&names) {
        warn!(
            "{flag} {:?} matches no interface of this network namespace (it has: {}); \
             check the name against `ip link` (interfaces that appear later and match \
             are attached as they come)",
            glob.as_str(),
            names.join(", ")
        );
    }
    info!(
        interfaces = ?datapath.attached(Hook::Pod).collect::<Vec<_>>(),
        external = ?datapath.attached(Hook::External).collect::<Vec<_>>(),
        "running"
    );
    let _ = gc.send(gc::GcWork::Attached);
}

/// Attaches to new interfaces and forgets vanished ones, the pods' hooks as `pods`
/// decides (`podpath`), told by the writer's `status` whether the maps hold source
/// ranges.
pub fn sync_interfaces(
    datapath: &mut Datapath,
    interfaces: &Interfaces,
    pods: &mut PodPath,
    status: &watch::Receiver<Status>,
) {
    let source_ranges = status.borrow().source_ranges;
    pods.sync(datapath, source_ranges, |d, p| interfaces.sync(d, p));
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

/// Length and hash of the file's bytes: enough to tell an edit.
fn fingerprint(text: &[u8]) -> (usize, u64) {
    // Fixed keys: the same bytes give the same hash for the life of the process.
    let h = ahash::RandomState::with_seeds(1, 2, 3, 4).hash_one(text);
    (text.len(), h)
}

/// What `stat` says of the file (size, modification time, inode): polled cheaply, so
/// the file itself is read only when this changes (a large file is tens of MiB).
fn stat(path: &std::path::Path) -> std::io::Result<(u64, i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.size(), m.mtime(), m.mtime_nsec(), m.ino()))
}

/// Reads and validates the file off the async runtime's threads (a large file takes
/// seconds to parse).
async fn load(path: &std::path::Path, opts: config::Options) -> Result<crate::model::Config> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || config::load_with(&path, &opts))
        .await
        .map_err(|e| Error::Config(format!("reading the config failed: {e}")))?
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let interfaces = Interfaces::new(&opts.interfaces, &opts.external_interfaces)?;
    let copts = opts.config_options;
    let mut last_stat = stat(&opts.config).ok();
    let text = config::read(&opts.config, copts.max_bytes)?;
    // A fingerprint of the file, not a copy of it (a large config is tens of MiB).
    let mut last_seen = fingerprint(&text);
    drop(text);
    let cfg = load(&opts.config, copts).await?;

    let (mut datapath, plane) = load_datapath(&opts.load)?;
    let sockets = datapath.attach_sockets(&opts.sockets)?;
    let localhost_nodeports = sockets.is_some() && opts.sockets.localhost_nodeports;
    let covers_pods = sockets.as_ref().map(|s| s.covers_pods);
    let (purges, gc_stats) = start_gc(&plane, &opts.conntrack, sockets.and_then(|s| s.killer))?;
    let mut pods = PodPath::new(
        &opts.load.pin_dir,
        covers_pods,
        !interfaces.external.is_empty(),
        &datapath,
        gc_stats,
    );
    let gc = purges.clone();
    let writer = Writer::spawn(
        plane,
        WriterOptions {
            purges: Some(purges),
            resync: opts.resync,
            localhost_nodeports,
            ..Default::default()
        },
        Box::new(|_| {}),
    )
    .map_err(|e| Error::Load(format!("starting the writer thread: {e}")))?;
    let mut status = writer.status();
    writer.send(Update::Replace(cfg));
    // Maps first, then attach: a new interface never sees a half-filled service table.
    let _ = status.wait_for(|s| s.syncs > 0).await;
    start_attaching(&mut datapath, &interfaces, &mut pods, &status, &gc);

    let mut tick = tokio::time::interval(opts.poll);
    let shutdown = shutdown_signal()?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = stat(&opts.config).ok();
                if now.is_some() && now == last_stat {
                    sync_interfaces(&mut datapath, &interfaces, &mut pods, &status);
                    continue;
                }
                last_stat = now;
                // (A file cut short, made a FIFO or grown past the bound is an error
                // like a malformed one: logged, and the maps keep what they hold.)
                match config::read(&opts.config, copts.max_bytes).map(|text| fingerprint(&text)) {
                    Ok(seen) if seen != last_seen => {
                        last_seen = seen;
                        match load(&opts.config, copts).await {
                            Ok(cfg) => {
                                info!(services = cfg.services.len(), "{}: applying the changed file", opts.config.display());
                                writer.send(Update::Replace(cfg));
                            }
                            Err(e) => error!("{e}; keeping the running state"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => warn!("{e}; keeping the running state"),
                }
                sync_interfaces(&mut datapath, &interfaces, &mut pods, &status);
            }
            _ = &mut shutdown => break,
        }
    }
    // The writer finishes what was queued; its maps close before the pins go.
    drop(tokio::task::block_in_place(|| writer.stop()));
    datapath.shutdown(opts.keep_pinned)
}
