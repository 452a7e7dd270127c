//! kube-proxy's rule structures for the same services, as pure text generators:
//! - iptables mode: the `nat` table as `iptables-restore` input (kube-proxy loads the
//!   whole table in one go): PREROUTING/OUTPUT -> KUBE-SERVICES -> KUBE-SVC-* (one rule
//!   per endpoint with `-m statistic --mode random --probability 1/(n-i)`) -> KUBE-SEP-*
//!   (hairpin masquerade mark + DNAT), KUBE-POSTROUTING masquerading marked packets.
//!   A NodePort: KUBE-SERVICES' last rule (`--dst-type LOCAL`) -> KUBE-NODEPORTS ->
//!   KUBE-EXT-* (short-circuits for pod and node sources) -> KUBE-SVL-* (the local
//!   endpoints, `externalTrafficPolicy: Local`) -> KUBE-SEP-*.
//! - nftables mode: `table ip kube-proxy` as `nft -f` input: a `service-ips` verdict map
//!   keyed by `ip daddr . meta l4proto . th dport`, a chain per service port choosing an
//!   endpoint with `numgen random mod N vmap`, a chain per endpoint with the dnat. A
//!   NodePort: `ip daddr @nodeport-ips` and the `service-nodeports` verdict map keyed by
//!   `meta l4proto . th dport` -> `external-*` -> `local-*` -> `endpoint-*`.
//!
//! Chain names follow kube-proxy's shape (a 16-character base32 tag); the tag here
//! comes from a bijective mix of an index rather than a SHA-256, so it is unique by
//! construction. Like kube-proxy in "large cluster mode" (more than 1000 endpoints),
//! per-endpoint comments are left out above that size. Only the `nat` rules are
//! generated (kube-proxy's filter-table chains, KUBE-FORWARD and the firewall checks,
//! are not), and the services of a workload have one port each.
use std::{fmt::Write, net::Ipv4Addr};

use super::workload::{Svc, CLUSTER_CIDR, NAMESPACE};

const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 16 base32 characters (RFC 4648 alphabet), unique for each `n`.
pub fn tag(n: u64) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let v = splitmix(n) as u128 | ((n as u128 & 0xffff) << 64);
    (0..16)
        .map(|i| ALPHABET[((v >> (5 * i)) & 31) as usize] as char)
        .collect()
}

/// Where the ClusterIP rules of the services under test sit in KUBE-SERVICES.
/// kube-proxy writes that chain in the iteration order of its service map, which has
/// nothing to do with a service's age (in kube-proxy a Go map, in random order): a
/// service can be anywhere in the chain. The middle is where it is on average; last is
/// the worst case (every other service's rule is tried first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Middle,
    Last,
}

/// The order of `svcs` in KUBE-SERVICES: the others in their order, with the services
/// under test (`Svc::under_test`) after all of them or in their middle.
pub fn kube_services_order(svcs: &[Svc], placement: Placement) -> Vec<usize> {
    let (tested, others): (Vec<usize>, Vec<usize>) =
        (0..svcs.len()).partition(|&i| svcs[i].under_test);
    let at = match placement {
        Placement::Middle => others.len() / 2,
        Placement::Last => others.len(),
    };
    let mut order = others[..at].to_vec();
    order.extend(&tested);
    order.extend(&others[at..]);
    order
}

/// `iptables-restore` input for the nat table, with the ClusterIP rules of the services
/// under test at `placement` in KUBE-SERVICES.
pub fn iptables_restore(svcs: &[Svc], placement: Placement) -> String {
    let large = super::workload::endpoint_count(svcs) > LARGE_CLUSTER_ENDPOINTS;
    let mut chains = String::new();
    let mut rules = String::new();
    let mut svc_rules = String::new();
    let mut node_ports = String::new();
    // KUBE-SERVICES' rule for each service, by service index.
    let mut portals = Vec::with_capacity(svcs.len());
    let mut ep_index: u64 = 0;
    chains.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    chains.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    rules.push_str(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for (i, s) in svcs.iter().enumerate() {
        let svc_chain = format!("KUBE-SVC-{}", tag(i as u64));
        let pn = s.port_name();
        let proto = s.proto();
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        portals.push(format!(
            "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"{pn} cluster IP\" -m {proto} --dport {} -j {svc_chain}\n",
            s.ip, s.port
        ));
        let _ = writeln!(
            svc_rules,
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {}/32 -p {proto} -m comment --comment \"{pn} cluster IP\" -m {proto} --dport {} -j KUBE-MARK-MASQ",
            s.ip, s.port
        );
        let n = s.endpoints.len();
        let mut seps = Vec::with_capacity(n);
        for (j, (ip, port)) in s.endpoints.iter().enumerate() {
            ep_index += 1;
            let sep = format!("KUBE-SEP-{}", tag(ep_index));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let comment = if large {
                String::new()
            } else {
                format!(" -m comment --comment \"{pn} -> {ip}:{port}\"")
            };
            if j + 1 < n {
                let p = 1.0 / (n - j) as f64;
                let _ = writeln!(svc_rules, "-A {svc_chain}{comment} -m statistic --mode random --probability {p:.10} -j {sep}");
            } else {
                let _ = writeln!(svc_rules, "-A {svc_chain}{comment} -j {sep}");
            }
            let c = if large {
                String::new()
            } else {
                format!(" -m comment --comment {pn}")
            };
            let _ = writeln!(svc_rules, "-A {sep} -s {ip}/32{c} -j KUBE-MARK-MASQ");
            let _ = writeln!(
                svc_rules,
                "-A {sep} -p {proto}{c} -m {proto} -j DNAT --to-destination {ip}:{port}"
            );
            seps.push(sep);
        }
        if let Some(node_port) = s.node_port {
            // externalTrafficPolicy: Local. Every endpoint of a workload with NodePorts
            // runs on this node (see workload::to_config_on_node), so all are local.
            let ext = format!("KUBE-EXT-{}", tag(i as u64));
            let svl = format!("KUBE-SVL-{}", tag(i as u64));
            let _ = writeln!(chains, ":{ext} - [0:0]\n:{svl} - [0:0]");
            let _ = writeln!(
                node_ports,
                "-A KUBE-NODEPORTS -p {proto} -m comment --comment \"{pn}\" -m {proto} --dport {node_port} -j {ext}"
            );
            let _ = writeln!(svc_rules, "-A {ext} -s {CLUSTER_CIDR} -m comment --comment \"pod traffic for {pn} external destinations\" -j {svc_chain}");
            let _ = writeln!(svc_rules, "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {pn} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ");
            let _ = writeln!(svc_rules, "-A {ext} -m comment --comment \"route LOCAL traffic for {pn} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}");
            let _ = writeln!(svc_rules, "-A {ext} -j {svl}");
            for (j, sep) in seps.iter().enumerate() {
                let (ip, port) = s.endpoints[j];
                let comment = if large {
                    String::new()
                } else {
                    format!(" -m comment --comment \"{pn} -> {ip}:{port}\"")
                };
                if j + 1 < n {
                    let p = 1.0 / (n - j) as f64;
                    let _ = writeln!(svc_rules, "-A {svl}{comment} -m statistic --mode random --probability {p:.10} -j {sep}");
                } else {
                    let _ = writeln!(svc_rules, "-A {svl}{comment} -j {sep}");
                }
            }
        }
    }
    for i in kube_services_order(svcs, placement) {
        rules.push_str(&portals[i]);
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    chains + &rules + &node_ports + &svc_rules + "COMMIT\n"
}

/// `nft -f` input for `table ip kube-proxy` (deletes an older one first, in the same
/// transaction, as a resync does). NodePorts open on `node_ips` (kube-proxy's
/// `nodeport-ips` set: the node's addresses).
pub fn nft_script(svcs: &[Svc], node_ips: &[Ipv4Addr]) -> String {
    let mut o = String::new();
    o.push_str("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\ndelete table ip kube-proxy\n");
    o.push_str("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n");
    o.push_str(
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; }\n",
    );
    o.push_str("add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n");
    o.push_str(
        "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority srcnat ; }\n",
    );
    o.push_str("add chain ip kube-proxy mark-for-masquerade\nadd rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n");
    o.push_str("add chain ip kube-proxy masquerading\n");
    o.push_str("add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n");
    o.push_str("add rule ip kube-proxy masquerading mark set mark xor 0x4000\n");
    o.push_str("add rule ip kube-proxy masquerading masquerade fully-random\n");
    o.push_str("add chain ip kube-proxy services\n");
    o.push_str(
        "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n",
    );
    o.push_str(
        "add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }\n",
    );
    o.push_str(
        "add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n",
    );
    o.push_str("add rule ip kube-proxy nat-prerouting jump services\n");
    o.push_str("add rule ip kube-proxy nat-output jump services\n");
    o.push_str("add rule ip kube-proxy nat-postrouting jump masquerading\n");
    o.push_str(
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    o.push_str(
        "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n",
    );
    for ip in node_ips {
        let _ = writeln!(o, "add element ip kube-proxy nodeport-ips {{ {ip} }}");
    }
    let mut elements = Vec::with_capacity(svcs.len());
    let mut node_port_elements = Vec::new();
    let mut ep_index: u64 = 0;
    for (i, s) in svcs.iter().enumerate() {
        let proto = s.proto();
        let base = format!("{NAMESPACE}/{}/{proto}/{}", s.name, s.port_label());
        let hash = &tag(i as u64)[..8];
        let chain = format!("service-{hash}-{base}");
        let _ = writeln!(o, "add chain ip kube-proxy {chain}");
        let _ = writeln!(
            o,
            "add rule ip kube-proxy {chain} ip daddr {} {proto} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            s.ip, s.port
        );
        let mut vmap = Vec::with_capacity(s.endpoints.len());
        for (j, (ip, port)) in s.endpoints.iter().enumerate() {
            ep_index += 1;
            let ep = format!("endpoint-{}-{base}__{ip}/{port}", &tag(ep_index)[..8]);
            let _ = writeln!(o, "add chain ip kube-proxy {ep}");
            let _ = writeln!(
                o,
                "add rule ip kube-proxy {ep} ip saddr {ip} jump mark-for-masquerade"
            );
            let _ = writeln!(
                o,
                "add rule ip kube-proxy {ep} meta l4proto {proto} dnat to {ip}:{port}"
            );
            vmap.push(format!("{j} : goto {ep}"));
        }
        let vmap = format!(
            "numgen random mod {} vmap {{ {} }}",
            vmap.len(),
            vmap.join(" , ")
        );
        if !s.endpoints.is_empty() {
            let _ = writeln!(o, "add rule ip kube-proxy {chain} {vmap}");
        }
        if let (Some(node_port), false) = (s.node_port, s.endpoints.is_empty()) {
            // externalTrafficPolicy: Local, every endpoint on this node (see iptables).
            let ext = format!("external-{hash}-{base}");
            let local = format!("local-{hash}-{base}");
            let _ = writeln!(o, "add chain ip kube-proxy {ext}");
            let _ = writeln!(
                o,
                "add rule ip kube-proxy {ext} ip saddr {CLUSTER_CIDR} goto {chain} comment \"short-circuit pod traffic\""
            );
            let _ = writeln!(
                o,
                "add rule ip kube-proxy {ext} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
            );
            let _ = writeln!(
                o,
                "add rule ip kube-proxy {ext} fib saddr type local goto {chain} comment \"short-circuit local traffic\""
            );
            let _ = writeln!(o, "add chain ip kube-proxy {local}");
            let _ = writeln!(o, "add rule ip kube-proxy {local} {vmap}");
            let _ = writeln!(o, "add rule ip kube-proxy {ext} goto {local}");
            node_port_elements.push(format!("{proto} . {node_port} : goto {ext}"));
        }
        elements.push(format!("{} . {proto} . {} : goto {chain}", s.ip, s.port));
    }
    for chunk in elements.chunks(1000) {
        let _ = writeln!(
            o,
            "add element ip kube-proxy service-ips {{ {} }}",
            chunk.join(" , ")
        );
    }
    for chunk in node_port_elements.chunks(1000) {
        let _ = writeln!(
            o,
            "add element ip kube-proxy service-nodeports {{ {} }}",
            chunk.join(" , ")
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, net::Ipv4Addr};

    use super::*;
    use crate::bench::workload::{forwarding_services, services, Endpoints, SINK_NODE_PORT};

    fn small() -> Vec<Svc> {
        services(
            5,
            Endpoints::Mixed,
            &[Ipv4Addr::new(10, 244, 0, 12), Ipv4Addr::new(10, 244, 0, 13)],
            Ipv4Addr::new(10, 244, 0, 15),
        )
    }

    #[test]
    fn tags_are_unique_and_base32() {
        let tags: HashSet<String> = (0..100_000).map(tag).collect();
        assert_eq!(tags.len(), 100_000);
        assert!(tags.iter().all(|t| t.len() == 16
            && t.chars()
                .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c))));
    }

    #[test]
    fn iptables_has_kube_proxy_structure() {
        let t = iptables_restore(&small(), Placement::Last);
        assert!(t.starts_with("*nat\n") && t.ends_with("COMMIT\n"));
        let services: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d"))
            .collect();
        assert_eq!(services.len(), 5);
        assert!(
            services[3].contains("-d 10.96.0.10/32") && services[3].contains("--dport 80"),
            "web is late in the chain"
        );
        // Web has two endpoints: the first with probability 1/2, the second unconditional.
        assert!(t.contains("--comment \"bench/web:http -> 10.244.0.12:8080\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-"));
        let last = t
            .lines()
            .find(|l| l.contains("bench/web:http -> 10.244.0.13:8080"))
            .unwrap();
        assert!(!last.contains("statistic"));
        assert!(t.contains("-j DNAT --to-destination 10.244.0.13:8080"));
        // A filler with 4 endpoints: 1/4, 1/3, 1/2, then the rest.
        assert!(
            t.contains("--probability 0.2500000000") && t.contains("--probability 0.3333333333")
        );
        assert!(t.lines().last().is_some());
        let nodeports = t
            .lines()
            .position(|l| l.contains("-j KUBE-NODEPORTS"))
            .unwrap();
        let last_svc = t
            .lines()
            .position(|l| l.contains("10.96.0.20/32 -p tcp -m comment"))
            .unwrap();
        assert!(
            nodeports > last_svc,
            "the nodeports rule closes KUBE-SERVICES"
        );
        // Every chain jumped to is declared.
        let declared: HashSet<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        for l in t.lines().filter(|l| l.starts_with("-A ")) {
            let target = l.rsplit(" -j ").next().unwrap().split(' ').next().unwrap();
            if target.starts_with("KUBE-") {
                assert!(declared.contains(target), "{target} undeclared");
            }
        }
    }

    #[test]
    fn nft_has_kube_proxy_structure() {
        let t = nft_script(&small(), &[]);
        assert!(t.contains("vmap @service-ips"));
        assert!(t.contains("type ipv4_addr . inet_proto . inet_service : verdict"));
        assert!(t.contains("10.96.0.10 . tcp . 80 : goto service-"));
        let web = t
            .lines()
            .find(|l| l.contains("/web/tcp/http numgen random mod 2 vmap"))
            .unwrap();
        assert!(web.contains("0 : goto endpoint-") && web.contains("1 : goto endpoint-"));
        assert!(t.contains("__10.244.0.13/8080 meta l4proto tcp dnat to 10.244.0.13:8080"));
        let chains = t
            .lines()
            .filter(|l| l.starts_with("add chain ip kube-proxy endpoint-"))
            .count();
        assert_eq!(chains, crate::bench::workload::endpoint_count(&small()));
    }

    /// The KUBE-SERVICES rules (ClusterIP portals and the NodePort jump), in order.
    fn kube_services(t: &str) -> Vec<&str> {
        t.lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .collect()
    }

    #[test]
    fn services_under_test_go_last_or_in_the_middle() {
        let web = [Ipv4Addr::new(10, 244, 0, 12)];
        let svcs = services(1000, Endpoints::Mixed, &web, web[0]);
        let position = |t: &str, ip: &str| {
            kube_services(t)
                .iter()
                .position(|l| l.contains(&format!("-d {ip}/32 ")))
                .unwrap()
        };
        let last = iptables_restore(&svcs, Placement::Last);
        let middle = iptables_restore(&svcs, Placement::Middle);
        // 998 fillers, then web and iperf; or 499 fillers, web, iperf, 499 fillers.
        assert_eq!(
            (position(&last, "10.96.0.10"), position(&last, "10.96.0.20")),
            (998, 999)
        );
        assert_eq!(
            (
                position(&middle, "10.96.0.10"),
                position(&middle, "10.96.0.20")
            ),
            (499, 500)
        );
        for t in [&last, &middle] {
            let ks = kube_services(t);
            assert_eq!(ks.len(), 1001);
            assert!(
                ks[1000].contains("-j KUBE-NODEPORTS"),
                "the NodePort jump stays last"
            );
            // The same rule set, only the order of KUBE-SERVICES differs.
            let mut a: Vec<&str> = t.lines().collect();
            let mut b: Vec<&str> = last.lines().collect();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
        }
        // Both fillers around the tested services keep their relative order.
        let order = kube_services_order(&svcs, Placement::Middle);
        assert_eq!(&order[497..502], &[497, 498, 998, 999, 499]);
        assert_eq!(
            kube_services_order(&svcs, Placement::Last),
            (0..1000).collect::<Vec<_>>()
        );
    }

    #[test]
    fn node_ports_follow_kube_proxy_with_local_policy() {
        let sink = Ipv4Addr::new(10, 244, 0, 11);
        let node = Ipv4Addr::new(192, 168, 50, 1);
        let svcs = forwarding_services(5, sink);
        let t = iptables_restore(&svcs, Placement::Last);
        let np: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("-A KUBE-NODEPORTS "))
            .collect();
        assert_eq!(np.len(), 1);
        assert!(np[0].starts_with(&format!(
            "-A KUBE-NODEPORTS -p udp -m comment --comment \"bench/sink:udp\" -m udp --dport {SINK_NODE_PORT} -j KUBE-EXT-"
        )));
        let ext = np[0].rsplit(' ').next().unwrap();
        let ext_rules: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with(&format!("-A {ext} ")))
            .collect();
        assert_eq!(ext_rules.len(), 4);
        assert!(ext_rules[0].contains("-s 10.244.0.0/16") && ext_rules[0].contains("-j KUBE-SVC-"));
        assert!(ext_rules[1].contains("--src-type LOCAL -j KUBE-MARK-MASQ"));
        let svl = ext_rules[3].rsplit(' ').next().unwrap();
        assert!(
            svl.starts_with("KUBE-SVL-"),
            "external traffic goes to the local endpoints"
        );
        let sep = t
            .lines()
            .find(|l| l.starts_with(&format!("-A {svl} ")))
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap();
        assert!(t.contains(&format!(
            "-A {sep} -p udp -m comment --comment bench/sink:udp -m udp -j DNAT --to-destination 10.244.0.11:9"
        )));
        // Every chain jumped to is declared.
        let declared: HashSet<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        for c in [ext, svl, sep] {
            assert!(declared.contains(c), "{c} undeclared");
        }

        let n = nft_script(&svcs, &[node]);
        assert!(n.contains("add element ip kube-proxy nodeport-ips { 192.168.50.1 }"));
        assert!(n.contains(
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
        ));
        let element = n
            .lines()
            .find(|l| l.starts_with("add element ip kube-proxy service-nodeports"))
            .unwrap();
        assert!(element.contains(&format!("udp . {SINK_NODE_PORT} : goto external-")));
        let ext = element
            .split("goto ")
            .nth(1)
            .unwrap()
            .trim_end_matches(" }");
        assert!(ext.ends_with("-bench/sink/udp/udp"));
        let ext_rules: Vec<&str> = n
            .lines()
            .filter(|l| l.starts_with(&format!("add rule ip kube-proxy {ext} ")))
            .collect();
        assert_eq!(ext_rules.len(), 4);
        let local = ext_rules[3].rsplit("goto ").next().unwrap();
        assert!(local.starts_with("local-"));
        assert!(n.contains(&format!(
            "add rule ip kube-proxy {local} numgen random mod 1 vmap"
        )));
        assert!(n.contains("meta l4proto udp dnat to 10.244.0.11:9"));
        // The fillers keep their TCP ClusterIPs only.
        assert_eq!(n.matches("add chain ip kube-proxy external-").count(), 1);
        assert!(n.contains("10.100.0.1 . tcp . 80 : goto service-"));
    }
}
