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

use serde::Serialize;

use super::{AttrValue, Attributes, Balance, Rule};

/// A region's advertised capacity, as balancing reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Load {
    /// Task slots of its live agents.
    pub total_slots: u32,
    /// Slots not running a task.
    pub free_slots: u32,
    /// Tasks queued, waiting for a slot.
    pub queue_depth: u32,
}

impl Load {
    /// Busy slots plus queued tasks per slot: 0 idle, 1 every slot busy,
    /// above 1 a queue; infinite without slots.
    pub fn utilisation(&self) -> f64 {
        if self.total_slots == 0 {
            return f64::INFINITY;
        }
        let busy = self.total_slots.saturating_sub(self.free_slots) as f64;
        (busy + self.queue_depth as f64) / self.total_slots as f64
    }

    /// The share `least_loaded` gives the region: its slots discounted by
    /// how loaded they are, `total / (1 + utilisation)`. An idle region of 8
    /// slots weighs 8, the same region with every slot busy 4, with a queue
    /// of 8 more 2.67; a region without slots 0.
    pub fn weight(&self) -> f64 {
        if self.total_slots == 0 {
            return 0.0;
        }
        self.total_slots as f64 / (1.0 + self.utilisation())
    }
}

/// How a member of a set of primaries was chosen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BalanceNote {
    /// `least_loaded`, `priority`, `weighted`, or `affinity` when the
    /// affinity attribute decided.
    pub mode: &'static str,
    /// The affinity attribute's name, when the rule has one.
    pub affinity: Option<String>,
    /// Hex of the first 16 bytes of the SHA-256 of the affinity attribute's
    /// name and value, when present: records can be correlated by key
    /// without holding the value.
    pub affinity_digest: Option<String>,
    /// The draw, in millionths of the total share, when one was made.
    pub draw_ppm: Option<u32>,
    /// The available members' loads as seen, with their shares.
    pub loads: Vec<LoadSeen>,
    /// One sentence: why the first member won.
    pub why: String,
}

/// One available member's advertised load at decision time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadSeen {
    /// The region.
    pub region: std::sync::Arc<str>,
    /// False when it advertised no capacity (the counts are then 0).
    pub advertised: bool,
    /// Its slots.
    pub total_slots: u32,
    /// Its free slots.
    pub free_slots: u32,
    /// Its queue.
    pub queue_depth: u32,
    /// Its share of the draw, in millionths (0 when no draw was made).
    pub share_ppm: u32,
}

/// Members of a set a decision holds on the stack (a larger set takes
/// one allocation for them).
pub(crate) const INLINE: usize = 16;

/// One eligible member (alive, compliant, not full, not held down).
/// `Copy`: a decision keeps a set's members in a plain array.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Member {
    /// Its position in the rule's `primaries`.
    pub(crate) index: usize,
    /// Its rank in the tie order ([`Rule::primary_ranks`]).
    pub(crate) rank: u32,
    /// Its advertised load.
    pub(crate) load: Option<Load>,
    /// Its share of a draw (set by [`order`]).
    pub(crate) weight: f64,
    /// Its verdict's detail (usually empty), for its candidate.
    pub(crate) detail: &'static str,
}

/// Puts the eligible members (given in `primaries` order) in the order
/// they are to be tried, the chosen one first, and returns the note that
/// explains it. Sorts in place by integer keys (the tie order resolved at
/// load, [`Rule::primary_ranks`]): no allocation besides the note's loads
/// and its sentence, written at its length.
pub(crate) fn order(
    rule: &Rule,
    attrs: &Attributes,
    members: &mut [Member],
    draw: u64,
) -> BalanceNote {
    let name = |i: usize| rule.primaries[i].as_str();
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
        return note;
    }

    if let Some(attr) = &rule.affinity {
        note.affinity = Some(attr.clone());
        if let Some(value) = attrs.get(attr) {
            let digest = affinity_digest(attr, value);
            // Highest score first; equal scores (never in practice) by name.
            members.sort_by_cached_key(|m| {
                (
                    std::cmp::Reverse(rendezvous(&digest, name(m.index))),
                    name(m.index),
                )
            });
            let short = hex::encode(&digest[..16]);
            note.mode = "affinity";
            note.why = format!(
                "affinity on `{attr}` (digest {}): {} ranks first among the available members by rendezvous hashing",
                &short[..16],
                name(members[0].index)
            );
            note.affinity_digest = Some(short);
            return note;
        }
        note.why = format!("affinity attribute `{attr}` absent; ");
    }

    if rule.balance == Balance::Priority {
        members.sort_unstable_by_key(|m| m.rank);
        note.why.push_str("priority: ");
        note.why.push_str(name(members[0].index));
        note.why
            .push_str(" has the lowest priority among the available members");
        return note;
    }
    for m in members.iter_mut() {
        m.weight = match rule.balance {
            Balance::Weighted => f64::from(rule.primary_weights[m.index]),
            _ => m.load.map_or(0.0, |l| l.weight()),
        };
    }
    let weight = |m: &Member| m.weight;
    let total: f64 = members.iter().map(weight).sum();
    if total <= 0.0 || !total.is_finite() {
        members.sort_unstable_by_key(|m| m.rank);
        note.why.push_str(rule.balance.as_str());
        note.why.push_str(if rule.balance == Balance::Weighted {
            ": no available member has a weight, so by priority: "
        } else {
            ": no available member advertises free capacity, so by priority: "
        });
        note.why.push_str(name(members[0].index));
        return note;
    }
    // `members` and `note.loads` are both in `primaries` order here.
    for (m, seen) in members.iter().zip(note.loads.iter_mut()) {
        seen.share_ppm = round_share((weight(m) / total) * 1e6);
    }
    // Tie order: weight (descending), then priority, then name. Every
    // weight is finite and at least +0 here (the total is finite), so the
    // order of their bits is their order (`f64::total_cmp`'s).
    members.sort_unstable_by_key(|m| (std::cmp::Reverse(m.weight.to_bits()), m.rank));
    // A point in [0, total): the member whose interval holds it is chosen.
    let fraction = (draw >> 11) as f64 / (1u64 << 53) as f64;
    let draw_ppm = (fraction * 1e6) as u32;
    note.draw_ppm = Some(draw_ppm);
    let point = fraction * total;
    let mut acc = 0.0;
    let mut chosen = 0;
    for (i, m) in members.iter().enumerate() {
        let w = weight(m);
        if w <= 0.0 {
            break;
        }
        chosen = i;
        acc += w;
        if point < acc {
            break;
        }
    }
    let share_permille = round_share(weight(&members[chosen]) / total * 1000.0);
    // The winner first, the others in the tie order.
    members[..=chosen].rotate_right(1);
    // "{mode}: draw {ppm} ppm fell in {winner}'s share ({p}.{p}% of {n}
    // available members)", pieced together at its length (the formatter
    // costs more than the rest of the draw).
    let mode = rule.balance.as_str();
    let winner = name(members[0].index);
    const DRAW: &str = ": draw ";
    const FELL: &str = " ppm fell in ";
    const SHARE: &str = "'s share (";
    const OF: &str = "% of ";
    const AVAILABLE: &str = " available members)";
    let (ppm, whole, tenth, n) = (
        Decimal::of(u64::from(draw_ppm)),
        Decimal::of(u64::from(share_permille / 10)),
        Decimal::of(u64::from(share_permille % 10)),
        Decimal::of(members.len() as u64),
    );
    // After the note of an absent affinity attribute, if any.
    let why = &mut note.why;
    why.reserve(
        mode.len()
            + DRAW.len()
            + ppm.len()
            + FELL.len()
            + winner.len()
            + SHARE.len()
            + whole.len()
            + 1
            + tenth.len()
            + OF.len()
            + n.len()
            + AVAILABLE.len(),
    );
    why.push_str(mode);
    why.push_str(DRAW);
    why.push_str(ppm.as_str());
    why.push_str(FELL);
    why.push_str(winner);
    why.push_str(SHARE);
    why.push_str(whole.as_str());
    why.push('.');
    why.push_str(tenth.as_str());
    why.push_str(OF);
    why.push_str(n.as_str());
    why.push_str(AVAILABLE);
    note
}

/// A number's decimal digits, written on the stack.
struct Decimal {
    digits: [u8; 20],
    at: usize,
}

impl Decimal {
    fn of(mut n: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Decimal { digits, at }
    }

    fn len(&self) -> usize {
        self.digits.len() - self.at
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits were written.
        std::str::from_utf8(&self.digits[self.at..]).unwrap_or("")
    }
}

/// `x.round() as u32` for a share (finite, at least 0): the integer part,
/// plus one from a fraction of one half up (the fraction `x - trunc(x)` is
/// exact in binary floating point), without a call to `round`.
fn round_share(x: f64) -> u32 {
    let whole = x as u32;
    if x - f64::from(whole) >= 0.5 {
        whole.saturating_add(1)
    } else {
        whole
    }
}

/// Appends `n` in decimal.
#[cfg(test)]
fn push_decimal(out: &mut String, n: u64) {
    out.push_str(Decimal::of(n).as_str());
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
