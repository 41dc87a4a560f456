//! Choosing among a rule's set of equally preferred primaries
//! (`primary_regions`): affinity by rendezvous hashing, `least_loaded` and
//! `weighted` draws, `priority` order. Pure: the loads come in with the
//! view, the draw is a number the caller passes in.
//!
//! **Why a draw and not the minimum.** Capacity is advertised once per
//! heartbeat, so every entry region sees the same (up to two heartbeats
//! old) loads. If each sent every task of a burst to the least loaded
//! member, all of them would pile onto the same region until the next
//! advertisements, then all onto the other one (herding). Instead each
//! task draws a member with probability proportional to its
//! [`Load::weight`] (slots discounted by utilisation): a burst splits in
//! proportion to free capacity whatever the staleness, and the less loaded
//! member still gets the larger share. `tests/balance.rs` and this
//! module's tests measure the split.
//!
//! **Affinity** keeps tasks with the same attribute value in one member:
//! each available member scores `mix(digest, region)` and the highest
//! wins (rendezvous hashing), so a member leaving moves only the keys it
//! held, and they come back when it returns. Every entry region computes
//! the same answer: the hash is FNV-1a over the value's SHA-256 digest and
//! the region name, stable across processes and versions.
//!
//! **Ties** (equal weights, members without any capacity advertised) and
//! the order members are tried after the chosen one fails go by the
//! regions' `priority`, lower first, then by name.

use sha2::{Digest, Sha256};

use super::decision::{BalanceNote, Load, LoadSeen};
use super::{AttrValue, Attributes, Balance, Rule};

/// One eligible member (alive, compliant, not full, not held down).
pub(crate) struct Member {
    /// Its position in the rule's `primaries`.
    pub(crate) index: usize,
    /// Its advertised load.
    pub(crate) load: Option<Load>,
}

/// The eligible members in the order they are to be tried (the chosen one
/// first), as positions in the rule's `primaries`, and the note that
/// explains it.
pub(crate) fn order(
    rule: &Rule,
    attrs: &Attributes,
    members: &[Member],
    draw: u64,
) -> (Vec<usize>, BalanceNote) {
    let name = |i: usize| rule.primaries[i].as_str();
    // (priority, name): the tie order.
    let key = |i: usize| (rule.primary_priorities[i], name(i));
    let mut note = BalanceNote {
        mode: rule.balance.as_str(),
        affinity: None,
        affinity_digest: None,
        draw_ppm: None,
        loads: members
            .iter()
            .map(|m| LoadSeen {
                region: rule.shared_primaries[m.index].clone(),
                advertised: m.load.is_some(),
                total_slots: m.load.map_or(0, |l| l.total_slots),
                free_slots: m.load.map_or(0, |l| l.free_slots),
                queue_depth: m.load.map_or(0, |l| l.queue_depth),
                share_ppm: 0,
            })
            .collect(),
        why: String::new(),
    };
    if members.is_empty() {
        note.why = "no member of the set is available".into();
        return (Vec::new(), note);
    }

    if let Some(attr) = &rule.affinity {
        note.affinity = Some(attr.clone());
        if let Some(value) = attrs.get(attr) {
            let digest = affinity_digest(attr, value);
            let mut scored: Vec<(u64, usize)> = members
                .iter()
                .map(|m| (rendezvous(&digest, name(m.index)), m.index))
                .collect();
            // Highest score first; equal scores (never in practice) by name.
            scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(name(a.1).cmp(name(b.1))));
            let out: Vec<usize> = scored.into_iter().map(|(_, i)| i).collect();
            let short = hex::encode(&digest[..16]);
            note.mode = "affinity";
            note.why = format!(
                "affinity on `{attr}` (digest {}): {} ranks first among the available members by rendezvous hashing",
                &short[..16],
                name(out[0])
            );
            note.affinity_digest = Some(short);
            return (out, note);
        }
        note.why = format!("affinity attribute `{attr}` absent; ");
    }

    if rule.balance == Balance::Priority {
        let mut out: Vec<usize> = members.iter().map(|m| m.index).collect();
        out.sort_unstable_by(|a, b| key(*a).cmp(&key(*b)));
        note.why.push_str("priority: ");
        note.why.push_str(name(out[0]));
        note.why
            .push_str(" has the lowest priority among the available members");
        return (out, note);
    }
    // (weight, member position in `members`, primaries index)
    let mut ranked: Vec<(f64, usize, usize)> = members
        .iter()
        .enumerate()
        .map(|(pos, m)| {
            let w = match rule.balance {
                Balance::Weighted => {
                    f64::from(rule.weights.get(name(m.index)).copied().unwrap_or(0))
                }
                _ => m.load.map_or(0.0, |l| l.weight()),
            };
            (w, pos, m.index)
        })
        .collect();
    let total: f64 = ranked.iter().map(|r| r.0).sum();
    if total <= 0.0 || !total.is_finite() {
        let mut out: Vec<usize> = ranked.into_iter().map(|r| r.2).collect();
        out.sort_unstable_by(|a, b| key(*a).cmp(&key(*b)));
        note.why.push_str(rule.balance.as_str());
        note.why.push_str(if rule.balance == Balance::Weighted {
            ": no available member has a weight, so by priority: "
        } else {
            ": no available member advertises free capacity, so by priority: "
        });
        note.why.push_str(name(out[0]));
        return (out, note);
    }
    for (w, pos, _) in &ranked {
        note.loads[*pos].share_ppm = ((w / total) * 1e6).round() as u32;
    }
    // Tie order: weight (descending), then priority, then name.
    ranked.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(key(a.2).cmp(&key(b.2))));
    // A point in [0, total): the member whose interval holds it is chosen.
    let fraction = (draw >> 11) as f64 / (1u64 << 53) as f64;
    let draw_ppm = (fraction * 1e6) as u32;
    note.draw_ppm = Some(draw_ppm);
    let point = fraction * total;
    let mut acc = 0.0;
    let mut chosen = 0;
    for (i, (w, _, _)) in ranked.iter().enumerate() {
        if *w <= 0.0 {
            break;
        }
        chosen = i;
        acc += w;
        if point < acc {
            break;
        }
    }
    let share_permille = (ranked[chosen].0 / total * 1000.0).round() as u32;
    let mut out: Vec<usize> = ranked.into_iter().map(|r| r.2).collect();
    let winner = out.remove(chosen);
    out.insert(0, winner);
    note.why.push_str(&format!(
        "{}: draw {draw_ppm} ppm fell in {}'s share ({}.{}% of {} available members)",
        rule.balance.as_str(),
        name(winner),
        share_permille / 10,
        share_permille % 10,
        out.len()
    ));
    (out, note)
}

/// SHA-256 of the affinity attribute's name and value: what the decision
/// (and so the log) keeps of the value.
pub(crate) fn affinity_digest(attr: &str, value: &AttrValue) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"federation affinity\0");
    h.update(attr.as_bytes());
    h.update(b"\0");
    match value {
        AttrValue::Str(s) => h.update(s.as_bytes()),
        other => h.update(other.to_string().as_bytes()),
    }
    h.finalize().into()
}

/// The rendezvous score of `region` for a key: FNV-1a 64 over the digest
/// and the name, then a splitmix64 finaliser.
fn rendezvous(digest: &[u8; 32], region: &str) -> u64 {
    let mut h = fnv(0xcbf2_9ce4_8422_2325, digest);
    h = fnv(h, region.as_bytes());
    mix(h)
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A deterministic draw from the attributes, for callers that pass none
/// (`policy explain`, the audit): the same attributes give the same draw.
pub(crate) fn attributes_draw(attrs: &Attributes) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325;
    for (k, v) in attrs {
        h = fnv(h, k.as_bytes());
        h = fnv(h, b"=");
        h = match v {
            AttrValue::Str(s) => fnv(h, s.as_bytes()),
            AttrValue::Int(i) => fnv(h, &i.to_le_bytes()),
            AttrValue::Double(d) => fnv(h, &d.to_le_bytes()),
            AttrValue::Bool(b) => fnv(h, &[u8::from(*b)]),
            AttrValue::List(_) => fnv(h, v.to_string().as_bytes()),
        };
    }
    mix(h)
}

#[cfg(test)]
mod tests;
