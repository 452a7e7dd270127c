//! `lb show`: what is in the maps, read from the pins (works while the agent runs, and
//! after it exited with `--keep-pinned`).
use std::{fmt::Write as _, net::IpAddr, path::Path};

use lb_common::{CtValue, CT_DIR_FORWARD, CT_F_EXTERNAL, CT_STATE_CLOSING, CT_STATE_ESTABLISHED};

use crate::{
    dataplane::{
        plan::{backend_addr, frontend_addr, ip_addr},
        Maps,
    },
    model::{FrontendKind, Protocol},
    Result,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    Services,
    Backends,
    Conntrack,
    Counters,
    All,
}

pub fn render(pin_dir: &Path, what: What) -> Result<String> {
    let maps = Maps::from_pins(pin_dir)?;
    let mut out = String::new();
    let all = what == What::All;
    if all || what == What::Services {
        services(&maps, &mut out)?;
    }
    if all || what == What::Backends {
        backends(&maps, &mut out)?;
    }
    if all || what == What::Conntrack {
        conntrack(&maps, &mut out)?;
    }
    if all || what == What::Counters {
        counters(&maps, &mut out)?;
    }
    Ok(out)
}

/// `ip:port` of an address and a port as the maps hold them (IPv6 in brackets).
fn endpoint(a: &lb_common::Addr, port: u16) -> String {
    match ip_addr(a) {
        IpAddr::V4(ip) => format!("{ip}:{}", u16::from_be(port)),
        IpAddr::V6(ip) => format!("[{ip}]:{}", u16::from_be(port)),
    }
}

fn services(maps: &Maps, out: &mut String) -> Result<()> {
    let st = maps.read_state()?;
    let mut fes: Vec<_> = st.frontends.iter().collect();
    fes.sort_by_key(|(k, _)| frontend_addr(k));
    let _ = writeln!(
        out,
        "{:<24} {:<12} {:>6} {:>5}  BACKENDS (ready, in slot order)",
        "FRONTEND", "KIND", "ID", "READY"
    );
    for (k, f) in fes {
        let list: Vec<String> = st
            .slot_list(f)
            .iter()
            .map(|id| match st.backend(*id) {
                Some(b) => endpoint(&b.addr, b.port),
                None => format!("#{id}?"),
            })
            .collect();
        let fa = frontend_addr(k);
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:>6} {:>5}  {}",
            fa.to_string(),
            FrontendKind::from_flags(f.flags).to_string(),
            f.service_id,
            f.count,
            list.join(" ")
        );
    }
    let _ = writeln!(out);
    Ok(())
}

fn backends(maps: &Maps, out: &mut String) -> Result<()> {
    let st = maps.read_state()?;
    let bs: Vec<_> = st.backends().collect();
    let _ = writeln!(out, "{:>6}  BACKEND", "ID");
    for (id, b) in bs {
        let _ = writeln!(out, "{id:>6}  {}", backend_addr(b));
    }
    let _ = writeln!(out);
    Ok(())
}

fn state_name(v: &CtValue) -> String {
    let state = match v.state {
        CT_STATE_ESTABLISHED => "established",
        CT_STATE_CLOSING => "closing",
        _ => "new",
    };
    if v.flags & CT_F_EXTERNAL != 0 {
        format!("{state} external")
    } else {
        state.to_string()
    }
}

fn conntrack(maps: &Maps, out: &mut String) -> Result<()> {
    let mut entries = maps.conntrack_entries()?;
    entries.sort_by_key(|(k, v)| (v.dir, k.src_addr, k.src_port, k.dst_addr, k.dst_port));
    let _ = writeln!(out, "DIR      PROTO  SOURCE                 DESTINATION            NAT                    BACKEND  STATE");
    for (k, v) in entries {
        let ep = |a: lb_common::Addr, p: u16| endpoint(&a, p);
        let proto = Protocol::from_number(k.proto)
            .map(|p| p.to_string())
            .unwrap_or_else(|| k.proto.to_string());
        let dir = if v.dir == CT_DIR_FORWARD {
            "forward"
        } else {
            "reply"
        };
        let _ = writeln!(
            out,
            "{dir:<8} {proto:<6} {:<22} {:<22} {:<22} {:>7}  {}",
            ep(k.src_addr, k.src_port),
            ep(k.dst_addr, k.dst_port),
            ep(v.nat_addr, v.nat_port),
            v.backend_id,
            state_name(&v)
        );
    }
    let _ = writeln!(out);
    Ok(())
}

fn counters(maps: &Maps, out: &mut String) -> Result<()> {
    let _ = writeln!(out, "{:<28} {:>14}", "COUNTER", "PACKETS");
    for (name, v) in maps.counters()? {
        let _ = writeln!(out, "{name:<28} {v:>14}");
    }
    Ok(())
}
