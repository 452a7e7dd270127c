//! Consistent selection, measured: the share of new flows that go to another backend
//! when one of N backends goes, with the Maglev tables the agent computes
//! (`lb_userspace::dataplane::plan::maglev`, the cells the datapath reads) and with
//! `hash % count` over the slots (what a frontend without a table does), against the
//! ideal 1/N. Flow hashes are drawn as the datapath's are (uniform 32-bit values), so
//! no kernel is needed; the kernel test
//! `maglev_moves_about_one_nth_of_the_flows_when_one_of_n_backends_goes` checks the same
//! through the real program at N = 4.
use std::net::Ipv4Addr;

use lb_userspace::{
    dataplane::plan::maglev::{moved_share, populate, resize, table_size, Member},
    model::{BackendAddr, Protocol},
};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct ConsistencyRow {
    pub backends: usize,
    pub table_cells: u32,
    /// 1/N: the flows of the backend that went.
    pub ideal: f64,
    pub maglev: f64,
    pub modulo: f64,
}

fn members(n: usize) -> Vec<Member> {
    (0..n as u32)
        .map(|i| Member {
            backend: BackendAddr {
                ip: Ipv4Addr::from(0x0af4_0000 + i).into(),
                port: 8080,
                proto: Protocol::Tcp,
                remote: false,
            },
            id: 1 + i,
            slot: 1 + i,
        })
        .collect()
}

/// The share of `flows` hashes whose slot changes when the backend in the middle slot
/// goes: the slots are swap-removed as the planner does (the last one takes its place).
fn modulo_moved(n: usize, flows: &[u32]) -> f64 {
    let before: Vec<u32> = (1..=n as u32).collect();
    let mut after = before.clone();
    after.swap_remove(n / 2);
    let moved = flows
        .iter()
        .filter(|&&h| before[(h % n as u32) as usize] != after[(h % (n as u32 - 1)) as usize])
        .count();
    moved as f64 / flows.len() as f64
}

/// The rows for these backend counts, over `flows` random flow hashes each.
pub fn measure(counts: &[usize], flows: usize) -> Vec<ConsistencyRow> {
    let mut x = 0x2545_f491u32;
    let hashes: Vec<u32> = (0..flows)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        })
        .collect();
    counts
        .iter()
        .map(|&n| {
            let all = members(n);
            let m = table_size(n);
            let before = populate(&all, m);
            let mut rest = all.clone();
            rest.remove(n / 2);
            let after = populate(&rest, resize(rest.len(), m));
            ConsistencyRow {
                backends: n,
                table_cells: m,
                ideal: 1.0 / n as f64,
                maglev: moved_share(&before, &after, &hashes),
                modulo: modulo_moved(n, &hashes),
            }
        })
        .collect()
}

/// The markdown section.
pub fn markdown(rows: &[ConsistencyRow]) -> String {
    let mut o = String::from(
        "\n#### Consistent selection (share of new flows moved when one of N backends goes)\n\n\
         | backends | Maglev table cells | ideal 1/N | Maglev | Maglev / ideal | hash % count |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in rows {
        o.push_str(&format!(
            "| {} | {} | {:.4} | {:.4} | {:.2} | {:.4} |\n",
            r.backends,
            r.table_cells,
            r.ideal,
            r.maglev,
            r.maglev / r.ideal,
            r.modulo
        ));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maglev_moves_near_the_ideal_where_modulo_moves_most_flows() {
        let rows = measure(&[10, 100], 50_000);
        for r in &rows {
            assert!(r.maglev >= r.ideal * 0.8, "{r:?}");
            assert!(r.maglev < r.modulo / 5.0, "{r:?}");
            assert!(r.modulo > 0.8, "{r:?}");
        }
        assert!(markdown(&rows).contains("| 10 | 509 |"));
    }
}
