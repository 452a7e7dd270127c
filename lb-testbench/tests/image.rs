//! The agent's container image (`lb_testbench::image`, `cargo xtask image`): the OCI
//! archive made from the `lb` binary next to this test, inspected blob by blob (digests,
//! entrypoint, labels, architecture, the files of its layer), unpacked by umoci and run
//! by runc in a container of its own namespaces (no network): `lb --version` and
//! `lb check` on examples/services.yaml. Then deploy/Dockerfile, which must build the
//! same image. The loads into podman and containerd are `cargo xtask image --check`
//! (ignored here: they need those installed). Needs root (runc).
use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use lb_testbench::{agent::lb_binary, image};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

static N: AtomicUsize = AtomicUsize::new(0);

const CREATED: &str = "2026-01-02T03:04:05Z";

/// A folder of this test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("lbt-image-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tag() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

fn build(dir: &Path) -> (PathBuf, image::Written) {
    let out = dir.join("lb-agent.oci.tar");
    let spec = image::Spec {
        lb: lb_binary().unwrap(),
        tag: tag(),
        revision: "0123456789abcdef".into(),
        created: CREATED.into(),
    };
    let w = image::write_archive(&spec, &out).expect("writing the archive");
    (out, w)
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every file of a tar by name.
fn tar_files(bytes: &[u8]) -> BTreeMap<String, (tar::EntryType, Vec<u8>, Option<String>)> {
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(bytes);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let kind = e.header().entry_type();
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.insert(name, (kind, data, link));
    }
    out
}

fn blob<'a>(
    files: &'a BTreeMap<String, (tar::EntryType, Vec<u8>, Option<String>)>,
    digest: &str,
) -> &'a [u8] {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let (_, bytes, _) = files
        .get(&format!("blobs/sha256/{hex}"))
        .unwrap_or_else(|| panic!("no blob {digest}"));
    assert_eq!(sha256(bytes), hex, "blob {digest} holds other bytes");
    bytes
}

#[test]
fn the_archive_holds_lb_and_its_libraries_with_its_entrypoint_and_labels() {
    let dir = TempDir::new();
    let (path, written) = build(&dir.0);
    let files = tar_files(&std::fs::read(&path).unwrap());
    assert_eq!(
        files["oci-layout"].1,
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()
    );
    let index: Value = serde_json::from_slice(&files["index.json"].1).unwrap();
    let m = &index["manifests"][0];
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(m["digest"], json!(written.manifest_digest));
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        json!(tag())
    );
    assert_eq!(
        m["annotations"]["io.containerd.image.name"],
        json!(format!("docker.io/library/lb-agent:{}", tag()))
    );
    let manifest_bytes = blob(&files, m["digest"].as_str().unwrap());
    assert_eq!(m["size"], json!(manifest_bytes.len()));
    let manifest: Value = serde_json::from_slice(manifest_bytes).unwrap();
    let config_bytes = blob(&files, manifest["config"]["digest"].as_str().unwrap());
    let config: Value = serde_json::from_slice(config_bytes).unwrap();

    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["Entrypoint"], json!(["/usr/local/bin/lb"]));
    assert_eq!(config["config"]["Cmd"], json!(["--help"]));
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.title"], "lb-agent");
    assert_eq!(labels["org.opencontainers.image.version"], json!(tag()));
    assert_eq!(
        labels["org.opencontainers.image.revision"],
        "0123456789abcdef"
    );
    assert_eq!(labels["org.opencontainers.image.created"], CREATED);
    assert_eq!(
        labels["org.opencontainers.image.licenses"],
        "MIT OR Apache-2.0"
    );

    // One layer, gzip, whose uncompressed digest is the config's diff_id.
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let gz = blob(&files, layers[0]["digest"].as_str().unwrap());
    assert_eq!(layers[0]["size"], json!(gz.len()));
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"],
        json!([format!("sha256:{}", sha256(&tar_bytes))])
    );
    let layer = tar_files(&tar_bytes);
    let lb = std::fs::read(lb_binary().unwrap()).unwrap();
    let (kind, bytes, _) = &layer["usr/local/bin/lb"];
    assert_eq!(*kind, tar::EntryType::Regular);
    assert!(*bytes == lb, "the layer's lb is not this lb");
    // Exactly the binary, its libraries and the loader (a link to its file), nothing else.
    let mut wanted: Vec<String> = vec!["usr/local/bin/lb".into()];
    for (asked, _) in image::shared_libraries(&lb_binary().unwrap()).unwrap() {
        let name = asked.trim_start_matches('/').to_string();
        if let Some((tar::EntryType::Symlink, _, Some(target))) = layer.get(&name) {
            wanted.push(target.trim_start_matches('/').into());
        }
        wanted.push(name);
    }
    wanted.sort();
    wanted.dedup();
    let shipped: Vec<String> = layer
        .iter()
        .filter(|(_, (k, _, _))| *k != tar::EntryType::Directory)
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(shipped, wanted);
    assert!(
        shipped.iter().any(|n| n.ends_with("/libc.so.6")),
        "{shipped:?}"
    );

    // docker's own manifest.json names the same blobs.
    let docker: Value = serde_json::from_slice(&files["manifest.json"].1).unwrap();
    assert_eq!(
        docker[0]["RepoTags"],
        json!([format!("lb-agent:{}", tag())])
    );
    let cfg_path = docker[0]["Config"].as_str().unwrap();
    assert_eq!(files[cfg_path].1, config_bytes);
    let layer_path = docker[0]["Layers"][0].as_str().unwrap();
    assert_eq!(files[layer_path].1, gz);

    // Reproducible: the same binary gives the same archive.
    let again = dir.0.join("again.tar");
    let spec = image::Spec {
        lb: lb_binary().unwrap(),
        tag: tag(),
        revision: "0123456789abcdef".into(),
        created: CREATED.into(),
    };
    image::write_archive(&spec, &again).unwrap();
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&path).unwrap());
}

/// A container of the archive's image (umoci's runtime bundle), run by runc; removed on
/// drop.
struct Bundle {
    dir: PathBuf,
    id: String,
    /// umoci's config.json, as it wrote it.
    config: Value,
}

impl Bundle {
    fn unpack(archive: &Path, dir: &Path) -> Self {
        let layout = dir.join("layout");
        std::fs::create_dir_all(&layout).unwrap();
        let f = std::fs::File::open(archive).unwrap();
        tar::Archive::new(f).unpack(&layout).unwrap();
        let bundle = dir.join("bundle");
        let st = Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{}", layout.display(), tag()))
            .arg(&bundle)
            .status()
            .expect("umoci (cargo xtask setup installs it)");
        assert!(st.success(), "umoci unpack");
        let config =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        Self {
            config,
            dir: bundle,
            id: format!(
                "lbt-image-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ),
        }
    }

    /// Runs `args` in a fresh container (network, pid, mount, ipc and uts namespaces of
    /// its own, as umoci's config makes them), with `mounts` (host file, container path)
    /// bound read-only; returns (success, stdout, stderr).
    fn run(&self, args: &[&str], mounts: &[(&Path, &str)]) -> (bool, String, String) {
        let mut config = self.config.clone();
        let namespaces: Vec<&str> = config["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(namespaces.contains(&"network"), "{namespaces:?}");
        // The image's entrypoint and command, as umoci read them.
        assert_eq!(
            config["process"]["args"],
            json!(["/usr/local/bin/lb", "--help"])
        );
        config["process"]["terminal"] = json!(false);
        config["process"]["args"] = json!(args);
        let list = config["mounts"].as_array_mut().unwrap();
        for (from, to) in mounts {
            list.push(json!({"destination": to, "type": "bind",
                "source": from, "options": ["bind", "ro"]}));
        }
        std::fs::write(self.dir.join("config.json"), config.to_string()).unwrap();
        let out = Command::new("runc")
            .args(["run", "--bundle"])
            .arg(&self.dir)
            .arg(&self.id)
            .output()
            .expect("runc (cargo xtask setup installs it)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .output();
    }
}

#[test]
fn lb_runs_from_the_image_in_a_container_without_network() {
    let dir = TempDir::new();
    let (archive, _) = build(&dir.0);
    let bundle = Bundle::unpack(&archive, &dir.0);
    let (ok, out, err) = bundle.run(&["/usr/local/bin/lb", "--version"], &[]);
    assert!(ok, "lb --version in the container: {err}");
    assert_eq!(out.trim(), format!("lb {}", tag()));
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/services.yaml");
    let (ok, out, err) = bundle.run(
        &[
            "/usr/local/bin/lb",
            "check",
            "--config",
            "/etc/lb/services.yaml",
        ],
        &[(&examples, "/etc/lb/services.yaml")],
    );
    assert!(ok, "lb check in the container: {err}");
    let host = Command::new(lb_binary().unwrap())
        .arg("check")
        .arg("--config")
        .arg(&examples)
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(out.contains("10.96.0.10:80/TCP"), "{out}");
    assert_eq!(
        out, host,
        "the container's lb check differs from the host's"
    );
}

#[test]
fn the_dockerfile_builds_the_same_image() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile"),
    )
    .unwrap();
    let last_from = text
        .lines()
        .rfind(|l| l.starts_with("FROM "))
        .expect("a FROM line");
    assert_eq!(last_from.trim(), "FROM scratch", "the runtime stage");
    let runtime = &text[text.rfind("FROM scratch").unwrap()..];
    let line = |word: &str| -> Value {
        let l = runtime
            .lines()
            .find(|l| l.starts_with(word))
            .unwrap_or_else(|| panic!("no {word} in the runtime stage"));
        serde_json::from_str(l[word.len()..].trim()).unwrap()
    };
    assert_eq!(line("ENTRYPOINT"), json!([image::ENTRYPOINT]));
    assert_eq!(line("CMD"), json!(image::CMD));
    // Its files are the ones `lb-testbench image` chooses.
    assert!(
        text.contains("lb-testbench image --lb target/release/lb --rootfs /out/rootfs"),
        "{text}"
    );
    assert!(
        runtime.contains("COPY --from=builder /out/rootfs/ /"),
        "{runtime}"
    );
    for label in [
        "org.opencontainers.image.title",
        "org.opencontainers.image.version",
        "org.opencontainers.image.licenses",
    ] {
        assert!(
            runtime.contains(label),
            "{label} missing from the Dockerfile"
        );
    }
}

/// Loads the archive into podman and containerd, as on a node, and runs it with podman
/// (`--network none`). `cargo xtask image --check` installs both and runs this.
#[test]
#[ignore = "needs podman and containerd: cargo xtask image --check"]
fn podman_and_containerd_load_the_archive() {
    let dir = TempDir::new();
    let (archive, written) = build(&dir.0);
    let reference = format!("lb-agent:{}", tag());

    // podman, in a storage of its own.
    let root = dir.0.join("podman");
    let podman = |args: &[&str]| {
        let out = Command::new("podman")
            .arg("--root")
            .arg(root.join("root"))
            .arg("--runroot")
            .arg(root.join("run"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"])
            .args(args)
            .output()
            .expect("podman");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    /// Resets podman's storage and lifts the mount its overlay driver makes there, also
    /// when the test fails, so the folder can go.
    struct Storage(PathBuf);
    impl Drop for Storage {
        fn drop(&mut self) {
            let _ = Command::new("podman")
                .arg("--root")
                .arg(self.0.join("root"))
                .arg("--runroot")
                .arg(self.0.join("run"))
                .args(["system", "reset", "--force"])
                .output();
            let _ = Command::new("umount")
                .arg(self.0.join("root/overlay"))
                .output();
        }
    }
    let _storage = Storage(root.clone());
    let (ok, out, err) = podman(&["load", "-i", archive.to_str().unwrap()]);
    assert!(ok, "podman load: {out}{err}");
    // Named from the archive's annotations, as on a node.
    let name = format!("docker.io/library/{reference}");
    assert!(out.contains(&format!("Loaded image: {name}")), "{out}");
    let (ok, out, err) = podman(&[
        "image",
        "inspect",
        "--format",
        "{{.Architecture}} {{.Os}} {{.Digest}}",
        &name,
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        format!("amd64 linux {}", written.manifest_digest)
    );
    // podman's default rlimits (nofile and nproc of 1048576) are above this machine's
    // hard limits: ask for less.
    let (ok, out, err) = podman(&[
        "run",
        "--rm",
        "--pull",
        "never",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        &name,
        "--version",
    ]);
    assert!(ok, "podman run: {err}");
    assert_eq!(out.trim(), format!("lb {}", tag()));

    // containerd (its own root, state and socket; no CRI), as `ctr -n k8s.io images import`.
    let cd = dir.0.join("containerd");
    std::fs::create_dir_all(&cd).unwrap();
    let sock = cd.join("containerd.sock");
    let cfg = cd.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{1}\"\n",
            cd.display(),
            sock.display()
        ),
    )
    .unwrap();
    struct Daemon(std::process::Child);
    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _daemon = Daemon(
        Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("containerd"),
    );
    let t0 = std::time::Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed().as_secs() < 20, "containerd did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let ctr = |args: &[&str]| {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&sock)
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
            .expect("ctr");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = ctr(&["images", "import", archive.to_str().unwrap()]);
    assert!(ok, "ctr images import: {out}{err}");
    let (ok, out, err) = ctr(&["images", "ls"]);
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.contains(&format!("docker.io/library/{reference}")))
        .unwrap_or_else(|| panic!("ctr images ls: {out}"));
    assert!(line.contains(&written.manifest_digest), "{line}");
    assert!(line.contains("linux/amd64"), "{line}");
}
