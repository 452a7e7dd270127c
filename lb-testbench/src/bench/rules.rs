//! kube-proxy's rule structures for the same services, as pure text generators:
//! - iptables mode: the `nat` table as `iptables-restore` input (kube-proxy loads the
//!   whole table in one go): PREROUTING/OUTPUT -> KUBE-SERVICES -> KUBE-SVC-* (one rule
//!   per endpoint with `-m statistic --mode random --probability 1/(n-i)`) -> KUBE-SEP-*
//!   (hairpin masquerade mark + DNAT), KUBE-POSTROUTING masquerading marked packets.
//! - nftables mode: `table ip kube-proxy` as `nft -f` input: a `service-ips` verdict map
//!   keyed by `ip daddr . meta l4proto . th dport`, a chain per service port choosing an
//!   endpoint with `numgen random mod N vmap`, a chain per endpoint with the dnat.
//!
//! Chain names follow kube-proxy's shape (a 16-character base32 tag); the tag here
//! comes from a bijective mix of an index rather than a SHA-256, so it is unique by
//! construction. Like kube-proxy in "large cluster mode" (more than 1000 endpoints),
//! per-endpoint comments are left out above that size.
use std::fmt::Write;

use super::workload::{Svc, CLUSTER_CIDR};

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

/// `iptables-restore` input for the nat table.
pub fn iptables_restore(svcs: &[Svc]) -> String {
    let large = super::workload::endpoint_count(svcs) > LARGE_CLUSTER_ENDPOINTS;
    let mut chains = String::new();
    let mut rules = String::new();
    let mut svc_rules = String::new();
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
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{pn} cluster IP\" -m tcp --dport {} -j {svc_chain}",
            s.ip, s.port
        );
        let _ = writeln!(
            svc_rules,
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{pn} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
            s.ip, s.port
        );
        let n = s.endpoints.len();
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
                "-A {sep} -p tcp{c} -m tcp -j DNAT --to-destination {ip}:{port}"
            );
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    chains + &rules + &svc_rules + "COMMIT\n"
}

/// `nft -f` input for `table ip kube-proxy` (deletes an older one first, in the same
/// transaction, as a resync does).
pub fn nft_script(svcs: &[Svc]) -> String {
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
    o.push_str("add rule ip kube-proxy nat-prerouting jump services\n");
    o.push_str("add rule ip kube-proxy nat-output jump services\n");
    o.push_str("add rule ip kube-proxy nat-postrouting jump masquerading\n");
    o.push_str(
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    let mut elements = Vec::with_capacity(svcs.len());
    let mut ep_index: u64 = 0;
    for (i, s) in svcs.iter().enumerate() {
        let base = format!("{}/{}/tcp/http", super::workload::NAMESPACE, s.name);
        let chain = format!("service-{}-{base}", &tag(i as u64)[..8]);
        let _ = writeln!(o, "add chain ip kube-proxy {chain}");
        let _ = writeln!(
            o,
            "add rule ip kube-proxy {chain} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
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
                "add rule ip kube-proxy {ep} meta l4proto tcp dnat to {ip}:{port}"
            );
            vmap.push(format!("{j} : goto {ep}"));
        }
        if !vmap.is_empty() {
            let _ = writeln!(
                o,
                "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
                vmap.len(),
                vmap.join(" , ")
            );
        }
        elements.push(format!("{} . tcp . {} : goto {chain}", s.ip, s.port));
    }
    for chunk in elements.chunks(1000) {
        let _ = writeln!(
            o,
            "add element ip kube-proxy service-ips {{ {} }}",
            chunk.join(" , ")
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, net::Ipv4Addr};

    use super::*;
    use crate::bench::workload::{services, Endpoints};

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
        let t = iptables_restore(&small());
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
        let t = nft_script(&small());
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
}
