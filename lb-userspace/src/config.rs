//! The standalone source: a YAML file with the same model as Kubernetes (see
//! `examples/services.yaml`). A malformed file is rejected whole, with the line and the
//! reason, and the running state stays as it was.
//!
//! A file whose first character is `{` is read as JSON (which is YAML too, so it means
//! the same): the JSON parser streams, where the YAML one holds every event of the
//! document at once (1.7 GiB for 100k Services with 10 endpoints each).
use std::{
    io::Read,
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::Path,
};

use crate::{
    model::{self, Config, NodePortRange},
    Error, Result,
};

/// `--max-config-bytes`' default: 256 MiB, several times the largest file measured
/// (100k Services x 10 endpoints as JSON).
pub const DEFAULT_MAX_CONFIG_BYTES: u64 = 256 << 20;

/// What reading and validating a file may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// A larger file is refused unread (`--max-config-bytes`).
    pub max_bytes: u64,
    /// The ports a nodePort may take (`--service-node-port-range`).
    pub node_ports: NodePortRange,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_CONFIG_BYTES,
            node_ports: NodePortRange::default(),
        }
    }
}

/// A UTF-8 byte-order mark, which some editors write first.
const BOM: &str = "\u{feff}";

/// Parses and validates a config's text with the default options; `origin` names it in
/// errors.
pub fn parse(origin: &str, text: &str) -> Result<Config> {
    parse_with(origin, text, &Options::default())
}

/// Parses and validates a config's text. A file that holds no document (empty, only
/// comments or blank lines: what an editor that truncates before it writes leaves for
/// a moment) is an error, never "no Services": that is written `services: []`.
pub fn parse_with(origin: &str, text: &str, opts: &Options) -> Result<Config> {
    let text = text.strip_prefix(BOM).unwrap_or(text);
    if is_blank(text) {
        return Err(Error::Config(format!(
            "{origin}: the file is empty (or only comments): refusing to remove every Service; \
             a file for no Services says `services: []`"
        )));
    }
    let cfg = if is_json(text.as_bytes()) {
        serde_json::from_str(text).map_err(|e| json_error(origin, e))?
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("line {} column {}: ", l.line(), l.column()))
                .unwrap_or_default();
            Error::Config(format!("{origin}: {at}{e}{}", hint(&e.to_string())))
        })?
    };
    validated(origin, cfg, opts)
}

/// Whether a YAML text holds no node: only blank lines, comments and document markers.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    })
}

/// What to do about a missing `services` key.
fn hint(e: &str) -> &'static str {
    if e.contains("missing field `services`") {
        " (a file must list its Services; for none, write `services: []`)"
    } else {
        ""
    }
}

fn validated(origin: &str, mut cfg: Config, opts: &Options) -> Result<Config> {
    for svc in &mut cfg.services {
        // `clusterIP` joins `clusterIPs` (a disagreement stays for validation to name).
        svc.normalize();
    }
    model::validate_config(&cfg, opts.node_ports)
        .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
    Ok(cfg)
}

fn is_json(head: &[u8]) -> bool {
    let head = head.strip_prefix(BOM.as_bytes()).unwrap_or(head);
    head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

fn json_error(origin: &str, e: serde_json::Error) -> Error {
    Error::Config(format!(
        "{origin}: line {} column {}: {e}{}",
        e.line(),
        e.column(),
        hint(&e.to_string())
    ))
}

/// What a file that is not a regular one is, for the error.
fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file (symlinks followed, as a ConfigMap
/// mount's are) of at most `max_bytes`. The type is checked before opening (opening a
/// FIFO blocks until a writer comes; opening some devices acts), and again on the open
/// file, which is opened non-blocking in case the path was swapped meanwhile.
pub fn open(path: &Path, max_bytes: u64) -> Result<std::fs::File> {
    let origin = path.display();
    let cannot = |e: std::io::Error| Error::Config(format!("{origin}: cannot read: {e}"));
    let check = |m: &std::fs::Metadata| {
        if !m.file_type().is_file() {
            return Err(Error::Config(format!(
                "{origin}: is {}: only a regular file is read",
                kind(m.file_type())
            )));
        }
        if m.len() > max_bytes {
            return Err(too_large(path, m.len(), max_bytes));
        }
        Ok(())
    };
    check(&std::fs::metadata(path).map_err(cannot)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(cannot)?;
    check(&file.metadata().map_err(cannot)?)?;
    Ok(file)
}

fn too_large(path: &Path, len: u64, max: u64) -> Error {
    Error::Config(format!(
        "{}: {len} bytes or more, over --max-config-bytes {max}: refused unread",
        path.display()
    ))
}

/// The file's bytes, read as `open` allows and never more than `max_bytes` (a file that
/// grows while it is read is refused too).
pub fn read(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    Bounded::new(open(path, max_bytes)?, path, max_bytes)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Config(format!("{}: cannot read: {e}", path.display())))?;
    Ok(bytes)
}

/// A reader that fails past `max` bytes.
struct Bounded<R> {
    inner: R,
    left: u64,
    error: String,
}

impl<R: Read> Bounded<R> {
    fn new(inner: R, path: &Path, max: u64) -> Self {
        Self {
            inner,
            left: max,
            error: too_large(path, max + 1, max).to_string(),
        }
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // One byte more than allowed tells a file that grew.
        let want = buf.len().min(self.left.saturating_add(1) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            return Err(std::io::Error::other(self.error.clone()));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Reads and validates the file at `path` with the default options.
pub fn load(path: &Path) -> Result<Config> {
    load_with(path, &Options::default())
}

/// Reads and validates the file at `path`: only a regular file of at most
/// `opts.max_bytes`; JSON streamed from the file, YAML read whole.
pub fn load_with(path: &Path, opts: &Options) -> Result<Config> {
    let origin = path.display().to_string();
    let cannot = |e: std::io::Error| Error::Config(format!("{origin}: cannot read: {e}"));
    let mut file = Bounded::new(open(path, opts.max_bytes)?, path, opts.max_bytes);
    let mut head = [0u8; 256];
    let n = read_head(&mut file, &mut head).map_err(cannot)?;
    if is_json(&head[..n]) {
        // Streamed from the file: the text is never held whole.
        let head = head[..n].strip_prefix(BOM.as_bytes()).unwrap_or(&head[..n]);
        let reader = std::io::BufReader::new(std::io::Cursor::new(head.to_vec()).chain(file));
        let cfg = serde_json::from_reader(reader).map_err(|e| json_error(&origin, e))?;
        return validated(&origin, cfg, opts);
    }
    let mut bytes = head[..n].to_vec();
    file.read_to_end(&mut bytes).map_err(cannot)?;
    let text =
        String::from_utf8(bytes).map_err(|e| Error::Config(format!("{origin}: not UTF-8: {e}")))?;
    parse_with(&origin, &text, opts)
}

/// Fills `head` as far as the file goes (one `read` may return less than there is).
fn read_head(r: &mut impl Read, head: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < head.len() {
        match r.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of this test's own, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!("lb-config-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn an_empty_or_comment_only_file_is_an_error_and_services_empty_is_no_services() {
        for text in [
            "",
            "\n\n",
            "# services: cut short by an editor\n  # indented comment\n",
            "---\n# nothing\n...\n",
            "\u{feff}",
            "  \t\n",
        ] {
            let e = parse("f", text).unwrap_err().to_string();
            assert!(
                e.contains("f: the file is empty") && e.contains("`services: []`"),
                "{text:?}: {e}"
            );
        }
        // A document without the key is no list of Services either.
        for text in ["node: {name: a}\n", "{}", "{\"node\": {\"name\": \"a\"}}"] {
            let e = parse("f", text).unwrap_err().to_string();
            assert!(
                e.contains("missing field `services`") && e.contains("write `services: []`"),
                "{text:?}: {e}"
            );
        }
        // Said explicitly, it is a file of no Services.
        for text in [
            "services: []\n",
            "# none on this node\nservices: []\nendpointSlices: []\n",
            "{\"services\": []}",
        ] {
            let cfg = parse("f", text).unwrap();
            assert!(cfg.services.is_empty() && cfg.endpoint_slices.is_empty());
        }
    }

    #[test]
    fn a_byte_order_mark_is_accepted_in_yaml_and_json() {
        let yaml = include_str!("../../examples/services.yaml");
        let cfg = parse("y", yaml).unwrap();
        assert_eq!(parse("b", &format!("\u{feff}{yaml}")).unwrap(), cfg);
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(parse("j", &format!("\u{feff}{json}")).unwrap(), cfg);
        let dir = TempDir::new("bom");
        for (name, text) in [("bom.yaml", yaml.to_string()), ("bom.json", json)] {
            let path = dir.0.join(name);
            std::fs::write(&path, format!("\u{feff}{text}")).unwrap();
            assert_eq!(load(&path).unwrap(), cfg, "{name}");
        }
    }

    #[test]
    fn a_node_port_outside_the_range_is_refused_and_the_range_is_a_flag() {
        let text = |np: u16| {
            format!(
                "services:\n  - {{name: web, clusterIP: 10.96.0.10, type: NodePort, ports: [{{name: http, port: 80, nodePort: {np}}}]}}\n"
            )
        };
        for np in [22, 8080, 29999, 32768, 61000] {
            let e = parse("f", &text(np)).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("invalid config: f: Service default/web: port \"http\": nodePort {np} is outside the node port range 30000-32767 (--service-node-port-range)")
            );
        }
        assert!(parse("f", &text(30000)).is_ok() && parse("f", &text(32767)).is_ok());
        let wide = Options {
            node_ports: "8000-9000".parse().unwrap(),
            ..Options::default()
        };
        assert!(parse_with("f", &text(8080), &wide).is_ok());
        assert!(parse_with("f", &text(30080), &wide).is_err());
        // The flag's own errors.
        for (bad, why) in [
            ("30000", ""),
            ("x-1", "is not a port"),
            ("1-70000", "is not a port"),
            ("32767-30000", "FIRST <= LAST"),
            ("0-100", "FIRST <= LAST"),
            ("30000-61000", "SNAT ports 61000-65535"),
        ] {
            match bad.parse::<NodePortRange>() {
                Ok(r) if why.is_empty() => assert_eq!((r.first, r.last), (30000, 30000)),
                Ok(r) => panic!("{bad} parsed as {r}"),
                Err(e) => assert!(!why.is_empty() && e.contains(why), "{bad}: {e}"),
            }
        }
    }

    #[test]
    fn only_regular_files_are_read_and_at_most_max_bytes() {
        let dir = TempDir::new("kinds");
        // A FIFO: opening it for reading would wait for a writer forever.
        let fifo = dir.0.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send((load(&f).map(|_| ()), read(&f, 1024).map(|_| ())));
        });
        let (loaded, read_) = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading a FIFO must not block");
        for e in [loaded.unwrap_err(), read_.unwrap_err()] {
            assert!(
                e.to_string()
                    .ends_with("fifo: is a FIFO: only a regular file is read"),
                "{e}"
            );
        }
        let e = load(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("/dev/zero: is a character device"), "{e}");
        let e = load(&dir.0).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        // A symlink to a regular file is read (a ConfigMap mount is made of them).
        let real = dir.0.join("real.yaml");
        std::fs::write(&real, "services: []\n").unwrap();
        let link = dir.0.join("link.yaml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(load(&link).unwrap().services.is_empty());
        // Over the bound: refused from its size, unread.
        let small = Options {
            max_bytes: 10,
            ..Options::default()
        };
        let e = load_with(&real, &small).unwrap_err().to_string();
        assert!(
            e.contains("13 bytes or more, over --max-config-bytes 10"),
            "{e}"
        );
        assert!(read(&real, 10).is_err() && read(&real, 13).is_ok());
        // A file that grows past the bound while it is read.
        let mut r = Bounded::new(std::io::repeat(b' '), &real, 1000);
        let mut sink = Vec::new();
        let e = r.read_to_end(&mut sink).unwrap_err().to_string();
        assert!(
            e.contains("1001 bytes or more, over --max-config-bytes 1000"),
            "{e}"
        );
        assert!(sink.len() <= 1000);
    }

    #[test]
    fn example_and_demo_configs_are_valid() {
        for (name, text) in [
            (
                "examples/services.yaml",
                include_str!("../../examples/services.yaml"),
            ),
            (
                "lb-testbench/src/demo.yaml",
                include_str!("../../lb-testbench/src/demo.yaml"),
            ),
        ] {
            let cfg = parse(name, text).unwrap();
            assert!(!cfg.services.is_empty(), "{name}");
        }
    }

    #[test]
    fn a_json_file_means_the_same_as_its_yaml() {
        let yaml = include_str!("../../examples/services.yaml");
        let cfg = parse("y", yaml).unwrap();
        let json = serde_json::to_string_pretty(&cfg).unwrap();
        assert_eq!(parse("j", &json).unwrap(), cfg);
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.json");
        // Leading whitespace, and a file longer than the sniffed head.
        std::fs::write(&path, format!("\n  {json}")).unwrap();
        let loaded = load(&path);
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{\"services\": [\n  {\"name\": 1}]}").unwrap();
        let e = load(&bad).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.unwrap(), cfg);
        assert!(e.contains("bad.json: line 2 column"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let text =
            "services:\n  - name: web\n    clusterIP: 10.96.0.300\n    ports: [{port: 80}]\n";
        let e = parse("f.yaml", text).unwrap_err().to_string();
        assert!(e.contains("f.yaml: line 3"), "{e}");
        assert!(e.contains("invalid IP address"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_protocols_are_rejected() {
        let e = parse(
            "f",
            "services:\n  - name: web\n    clusterIp: 10.96.0.1\n    ports: []\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `clusterIp`"), "{e}");
        let e = parse(
            "f",
            "services:\n  - name: web\n    clusterIP: 10.96.0.1\n    ports: [{port: 80, protocol: SCTP}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_object() {
        let text = "services:\n  - {name: a, clusterIP: 10.96.0.1, ports: [{port: 80}]}\n  - {name: a, clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
        let e = parse("f", text).unwrap_err().to_string();
        assert_eq!(e, "invalid config: f: Service default/a: defined twice");
    }

    #[test]
    fn node_section_node_ports_and_external_traffic_policy_parse() {
        let text = "\
node:
  name: node-a
  addresses: [192.168.1.1, 10.0.0.1]
services:
  - name: web
    clusterIP: 10.96.0.10
    type: NodePort
    externalTrafficPolicy: Local
    externalIPs: [203.0.113.5]
    ports: [{name: http, port: 80, nodePort: 30080}]
  - name: lb
    clusterIP: 10.96.0.11
    type: LoadBalancer
    loadBalancerIPs: [198.51.100.7]
    ports: [{port: 443, nodePort: 30443}]
endpointSlices:
  - name: web-1
    serviceName: web
    ports: [{name: http, port: 8080}]
    endpoints:
      - {addresses: [10.244.0.2], nodeName: node-a}
      - {addresses: [10.244.1.2], nodeName: node-b}
";
        let cfg = parse("f.yaml", text).unwrap();
        assert_eq!(
            cfg.node,
            model::Node {
                name: Some("node-a".into()),
                addresses: vec!["192.168.1.1".parse().unwrap(), "10.0.0.1".parse().unwrap()],
                zone: None,
                ..Default::default()
            }
        );
        let web = &cfg.services[0];
        assert_eq!(web.service_type, model::ServiceType::NodePort);
        assert_eq!(web.external_traffic_policy, model::TrafficPolicy::Local);
        assert_eq!(
            web.external_ips,
            vec!["203.0.113.5".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(web.ports[0].node_port, Some(30080));
        let lb = &cfg.services[1];
        assert_eq!(lb.service_type, model::ServiceType::LoadBalancer);
        assert_eq!(lb.external_traffic_policy, model::TrafficPolicy::Cluster);
        assert_eq!(lb.load_balancer_ips.len(), 1);
        let eps = &cfg.endpoint_slices[0].endpoints;
        assert_eq!(eps[0].node_name.as_deref(), Some("node-a"));
        assert_eq!(eps[1].node_name.as_deref(), Some("node-b"));
        // And the model opens what the file says: two NodePorts, the external IP, the LB IP;
        // web's (externalTrafficPolicy Local) also as the node's own sockets see them.
        let st = model::desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
        let kinds: Vec<String> = st
            .frontends
            .iter()
            .map(|(fe, f)| format!("{fe} {}", f.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                "10.0.0.1:30080/TCP NodePort",
                "10.0.0.1:30080/TCP@inside NodePort",
                "10.0.0.1:30443/TCP NodePort",
                "10.96.0.10:80/TCP ClusterIP",
                "10.96.0.11:443/TCP ClusterIP",
                "192.168.1.1:30080/TCP NodePort",
                "192.168.1.1:30080/TCP@inside NodePort",
                "192.168.1.1:30443/TCP NodePort",
                "198.51.100.7:443/TCP LoadBalancer",
                "203.0.113.5:80/TCP ExternalIP",
                "203.0.113.5:80/TCP@inside ExternalIP",
            ]
        );
    }

    #[test]
    fn bad_node_sections_and_service_types_are_rejected_with_the_line() {
        let e = parse(
            "f",
            "node:\n  name: node-a\n  address: [192.168.1.1]\nservices: []\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("f: line 3"), "{e}");
        assert!(e.contains("unknown field `address`"), "{e}");
        let e = parse(
            "f",
            "services:\n  - name: web\n    clusterIP: 10.96.0.1\n    type: ExternalName\n    ports: [{port: 80}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 4"), "{e}");
        let e = parse(
            "f",
            "services:\n  - name: web\n    clusterIP: 10.96.0.1\n    externalTrafficPolicy: local\n    ports: [{port: 80}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 4"), "{e}");
        // A node address that cannot be one names the node.
        let e = parse(
            "f",
            "node: {name: node-a, addresses: [224.0.0.1]}\nservices: []\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("Node") && e.contains("node-a") && e.contains("224.0.0.1"),
            "{e}"
        );
    }

    #[test]
    fn dual_stack_services_in_the_file_and_their_errors() {
        let text = "\
node: {name: node-a, addresses: [192.168.1.1, \"fd00:50::1\"]}
services:
  - name: dual
    clusterIPs: [10.96.0.10, \"fd00:10:96::a\"]
    ipFamilies: [IPv4, IPv6]
    ipFamilyPolicy: RequireDualStack
    ports: [{port: 80}]
  - name: v6
    clusterIP: \"fd00:10:96::b\"
    ports: [{port: 80}]
endpointSlices:
  - name: dual-v6
    serviceName: dual
    ports: [{port: 8080}]
    endpoints:
      - {addresses: [\"fd00:10:244::2\"]}
";
        let cfg = parse("f.yaml", text).unwrap();
        assert_eq!(cfg.services[0].cluster_ips.len(), 2);
        assert_eq!(
            cfg.services[1].cluster_ips,
            vec!["fd00:10:96::b".parse::<std::net::IpAddr>().unwrap()]
        );
        let st = model::desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
        let got: Vec<String> = st
            .frontends
            .iter()
            .map(|(fe, f)| format!("{fe} {}", f.active.len()))
            .collect();
        assert_eq!(
            got,
            [
                "10.96.0.10:80/TCP 0",
                "[fd00:10:96::a]:80/TCP 1",
                "[fd00:10:96::b]:80/TCP 0"
            ]
        );
        for (bad, why) in [
            (
                "services:\n  - {name: a, clusterIP: 10.96.0.1, clusterIPs: [10.96.0.2], ports: [{port: 80}]}\n",
                "clusterIP 10.96.0.1 is not clusterIPs' first address 10.96.0.2",
            ),
            (
                "services:\n  - {name: a, clusterIPs: [10.96.0.1, 10.96.0.2], ports: [{port: 80}]}\n",
                "at most one address per family",
            ),
            (
                "services:\n  - {name: a, clusterIPs: [10.96.0.1], ipFamilies: [IPv6], ports: [{port: 80}]}\n",
                "ipFamilies [IPv6] do not match",
            ),
            (
                "services:\n  - {name: a, clusterIP: \"fd00::1\", ipFamilyPolicy: RequireDualStack, ports: [{port: 80}]}\n",
                "RequireDualStack with 1 clusterIP",
            ),
            ("services:\n  - {name: a, ports: [{port: 80}]}\n", "has no clusterIP"),
            (
                "services:\n  - {name: a, clusterIP: \"ff02::1\", ports: [{port: 80}]}\n",
                "cannot be a Service address",
            ),
        ] {
            let e = parse("f", bad).unwrap_err().to_string();
            assert!(e.contains("Service default/a") && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_nodes_zone_and_zone_hints_parse_and_are_followed() {
        let text = "\
node: {name: node-a, zone: zone-a, addresses: [192.168.1.1]}
services:
  - {name: web, clusterIP: 10.96.0.10, ports: [{port: 80}]}
endpointSlices:
  - name: web-1
    serviceName: web
    ports: [{port: 8080}]
    endpoints:
      - {addresses: [10.244.0.2], nodeName: node-a, hints: {forZones: [{name: zone-a}]}}
      - {addresses: [10.244.1.2], nodeName: node-b, hints: {forZones: [{name: zone-b}]}}
";
        let cfg = parse("f.yaml", text).unwrap();
        assert_eq!(cfg.node.zone.as_deref(), Some("zone-a"));
        let st = model::desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
        let active: Vec<String> = st
            .frontends
            .values()
            .next()
            .unwrap()
            .active
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(active, ["10.244.0.2:8080/TCP"]);
        // The same as JSON, written back by serde.
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(
            json.contains("\"forZones\":[{\"name\":\"zone-a\"}]"),
            "{json}"
        );
        assert_eq!(parse("j", &json).unwrap(), cfg);
        let e = parse("f", "node: {name: a}\nendpointSlices:\n  - {name: s, serviceName: x, endpoints: [{addresses: [10.244.0.2], hints: {forZone: []}}]}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `forZone`"), "{e}");
    }
}
