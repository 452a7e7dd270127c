//! The agent's container image, made here with nothing pulled from a registry
//! (`cargo xtask image`): the `lb` binary and exactly the shared libraries it links
//! (what `ldd` names: glibc, libm, libgcc_s and the dynamic loader; the benchmarked
//! glibc build, not a static one, whose allocator and `malloc_trim` the memory figures
//! rely on), in one layer on an empty base, written as an OCI archive that `podman
//! load`, `docker load` and `ctr images import` read:
//!
//! ```text
//! oci-layout  index.json  manifest.json  blobs/sha256/<layer.tar.gz>  <config>  <manifest>
//! ```
//!
//! `index.json` is the OCI layout's (with the names containerd and docker read from its
//! annotations); `manifest.json` is docker's own format, for `docker load` before 25.
//! The archive is reproducible: every time in it is the commit's (`created`), every
//! owner root, and the same binary gives the same digests. `write_rootfs` puts the same
//! files in a folder, for deploy/Dockerfile's `FROM scratch` stage.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Where the binary goes in the image.
pub const ENTRYPOINT: &str = "/usr/local/bin/lb";
/// The command when none is given (the DaemonSet gives its own).
pub const CMD: &[&str] = &["--help"];
/// The image's name.
pub const NAME: &str = "lb-agent";

/// What goes into the image's configuration.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The `lb` binary to ship.
    pub lb: PathBuf,
    /// The tag (the crate's version).
    pub tag: String,
    /// The commit it was built from.
    pub revision: String,
    /// RFC 3339 time of that commit: every time in the archive.
    pub created: String,
}

/// One file of the layer: its path in the image and where its bytes come from, or the
/// target of a symbolic link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    File {
        path: String,
        from: PathBuf,
        mode: u32,
    },
    Link {
        path: String,
        target: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::File { path, .. } | Entry::Link { path, .. } => path,
        }
    }
}

fn err(what: impl std::fmt::Display) -> Error {
    Error::Sandbox(format!("image: {what}"))
}

/// The shared libraries `ldd` says `binary` loads, with the dynamic loader: (the path
/// the binary asks for, the file on this machine).
pub fn shared_libraries(binary: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| err(format!("running ldd: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(err(format!(
            "ldd {}: {}{}",
            binary.display(),
            text,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", or the loader
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        let path = match line.split_once(" => ") {
            Some((_, rest)) => rest.split(' ').next().unwrap_or(""),
            None => line.split(' ').next().unwrap_or(""),
        };
        if path.starts_with('/') {
            let real =
                std::fs::canonicalize(path).map_err(|e| err(format!("{path} (from ldd): {e}")))?;
            libs.push((path.to_string(), real));
        } else if line.contains("not found") {
            return Err(err(format!("ldd {}: {line}", binary.display())));
        }
    }
    libs.sort();
    Ok(libs)
}

/// Every file of the image: the binary and its libraries. The loader is kept at the
/// path the binary names (PT_INTERP) as a link to its real file, like the system does.
pub fn entries(lb: &Path) -> Result<Vec<Entry>> {
    let mut out = vec![Entry::File {
        path: ENTRYPOINT.into(),
        from: lb.to_path_buf(),
        mode: 0o755,
    }];
    for (asked, real) in shared_libraries(lb)? {
        let file_name = real.file_name().unwrap().to_string_lossy().into_owned();
        let asked_name = Path::new(&asked).file_name().unwrap().to_string_lossy();
        if asked_name == file_name.as_str() && !asked.starts_with("/lib64/") {
            out.push(Entry::File {
                path: asked,
                from: real,
                mode: 0o755,
            });
        } else {
            // The loader (/lib64/ld-linux-x86-64.so.2 -> the multiarch folder).
            let dir = Path::new(&asked)
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let real_dir = if dir == "/lib64" {
                "/lib/x86_64-linux-gnu".to_string()
            } else {
                dir
            };
            let target = format!("{real_dir}/{file_name}");
            out.push(Entry::File {
                path: target.clone(),
                from: real,
                mode: 0o755,
            });
            out.push(Entry::Link {
                path: asked,
                target,
            });
        }
    }
    out.sort_by(|a, b| a.path().cmp(b.path()));
    out.dedup_by(|a, b| a.path() == b.path());
    Ok(out)
}

/// Seconds since the epoch of an RFC 3339 time.
fn epoch(created: &str) -> Result<u64> {
    let t: jiff::Timestamp = created
        .parse()
        .map_err(|e| err(format!("not an RFC 3339 time: {created:?}: {e}")))?;
    u64::try_from(t.as_second()).map_err(|_| err(format!("before 1970: {created:?}")))
}

/// The folders above `path` ("usr/", "usr/local/", ...), outermost first.
fn parents(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    for i in 1..parts.len() {
        out.push(format!("{}/", parts[..i].join("/")));
    }
    out
}

/// The layer as an uncompressed tar: folders, files and links, all root's, all at `mtime`.
fn layer_tar(entries: &[Entry], mtime: u64) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    let mut dirs: Vec<String> = entries.iter().flat_map(|e| parents(e.path())).collect();
    dirs.sort();
    dirs.dedup();
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for d in &dirs {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, d, std::io::empty())
            .map_err(|e| err(format!("{d}: {e}")))?;
    }
    for e in entries {
        let name = e.path().trim_start_matches('/');
        match e {
            Entry::File { from, mode, .. } => {
                let bytes = std::fs::read(from)
                    .map_err(|e| err(format!("reading {}: {e}", from.display())))?;
                let mut h = header(tar::EntryType::Regular, *mode, bytes.len() as u64);
                b.append_data(&mut h, name, bytes.as_slice())
                    .map_err(|e| err(format!("{name}: {e}")))?;
            }
            Entry::Link { target, .. } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, name, target)
                    .map_err(|e| err(format!("{name}: {e}")))?;
            }
        }
    }
    b.into_inner().map_err(err)
}

fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The image configuration (OCI image-spec config).
pub fn config(spec: &Spec, diff_id: &str) -> Value {
    json!({
        "created": spec.created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [ENTRYPOINT],
            "Cmd": CMD,
            "Env": ["PATH=/usr/local/bin"],
            "Labels": labels(spec),
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        "history": [{"created": spec.created, "created_by": "cargo xtask image"}],
    })
}

/// The labels (OCI's pre-defined annotation keys).
pub fn labels(spec: &Spec) -> Value {
    json!({
        "org.opencontainers.image.title": NAME,
        "org.opencontainers.image.description": "lb: a kube-proxy replacement with an eBPF dataplane (lb agent)",
        "org.opencontainers.image.version": spec.tag,
        "org.opencontainers.image.revision": spec.revision,
        "org.opencontainers.image.created": spec.created,
        "org.opencontainers.image.licenses": "MIT OR Apache-2.0",
    })
}

/// What was written.
#[derive(Clone, Debug)]
pub struct Written {
    pub path: PathBuf,
    /// `sha256:<hex>` of the image manifest.
    pub manifest_digest: String,
    /// `lb-agent:<tag>`.
    pub reference: String,
}

/// Writes the OCI archive of `spec` to `out`.
pub fn write_archive(spec: &Spec, out: &Path) -> Result<Written> {
    let mtime = epoch(&spec.created)?;
    let layer = layer_tar(&entries(&spec.lb)?, mtime)?;
    let diff_id = sha256(&layer);
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer).map_err(err)?;
    let layer_gz = gz.finish().map_err(err)?;
    let layer_digest = sha256(&layer_gz);
    let config = serde_json::to_vec(&config(spec, &diff_id)).unwrap();
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer_gz.len(),
        }],
        "annotations": {"org.opencontainers.image.created": spec.created},
    }))
    .unwrap();
    let manifest_digest = sha256(&manifest);
    let reference = format!("{NAME}:{}", spec.tag);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                // containerd (ctr images import) and docker 25+ read this name,
                "io.containerd.image.name": format!("docker.io/library/{reference}"),
                // OCI tools (podman, skopeo, umoci) the tag.
                "org.opencontainers.image.ref.name": spec.tag,
            },
        }],
    }))
    .unwrap();
    let docker_manifest = serde_json::to_vec(&json!([{
        "Config": format!("blobs/sha256/{config_digest}"),
        "RepoTags": [reference],
        "Layers": [format!("blobs/sha256/{layer_digest}")],
    }]))
    .unwrap();

    use tar::EntryType::{Directory, Regular};
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, bytes: &[u8], kind: tar::EntryType| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == Directory { 0o755 } else { 0o644 });
        h.set_size(bytes.len() as u64);
        h.set_mtime(mtime);
        b.append_data(&mut h, name, bytes)
            .map_err(|e| err(format!("{name}: {e}")))
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, Regular)?;
    add("index.json", &index, Regular)?;
    add("manifest.json", &docker_manifest, Regular)?;
    add("blobs/", &[], Directory)?;
    add("blobs/sha256/", &[], Directory)?;
    for (digest, bytes) in [
        (&layer_digest, &layer_gz),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        add(&format!("blobs/sha256/{digest}"), bytes, Regular)?;
    }
    let archive = b.into_inner().map_err(err)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    }
    std::fs::write(out, archive).map_err(|e| err(format!("{}: {e}", out.display())))?;
    Ok(Written {
        path: out.to_path_buf(),
        manifest_digest: format!("sha256:{manifest_digest}"),
        reference,
    })
}

/// The image's files in `dir` (for deploy/Dockerfile's `FROM scratch` stage, which
/// copies it whole).
pub fn write_rootfs(lb: &Path, dir: &Path) -> Result<()> {
    for e in entries(lb)? {
        let to = dir.join(e.path().trim_start_matches('/'));
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| err(format!("{}: {e}", parent.display())))?;
        }
        let _ = std::fs::remove_file(&to);
        match &e {
            Entry::File { from, mode, .. } => {
                std::fs::copy(from, &to).map_err(|e| err(format!("{}: {e}", to.display())))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(*mode))
                    .map_err(|e| err(format!("{}: {e}", to.display())))?;
            }
            Entry::Link { target, .. } => std::os::unix::fs::symlink(target, &to)
                .map_err(|e| err(format!("{}: {e}", to.display())))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_above_a_path_come_outermost_first() {
        assert_eq!(
            parents("/usr/local/bin/lb"),
            ["usr/", "usr/local/", "usr/local/bin/"]
        );
        assert!(parents("/lb").is_empty());
    }
}
