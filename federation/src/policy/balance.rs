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

use std::borrow::Cow;
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

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

/// How a member of a set of primaries was chosen, as the decision keeps
/// it: the inputs as plain numbers (each available member's position in
/// the rule's primaries, its advertised load and its share, the draw, the
/// winner) and one shared handle on the rule's names. The sentence and the
/// per-member list are written only where the note is shown or recorded
/// ([`BalanceNote::explain`], [`BalanceNote::write_why`], and its
/// `Serialize`, which writes the [`BalanceExplanation`]): a decision builds
/// no text and takes no reference count per member.
#[derive(Debug, Clone)]
pub struct BalanceNote(Repr);

#[derive(Debug, Clone)]
enum Repr {
    /// As decided.
    Decided(Decided),
    /// Written out (a minimised copy, a test's), shown as it is.
    Explained(Box<BalanceExplanation>),
}

#[derive(Debug, Clone)]
struct Decided {
    /// `least_loaded`, `priority`, `weighted`, or `affinity`.
    mode: &'static str,
    /// The rule's primaries' names ([`Rule::shared_primaries`]).
    names: Arc<[Arc<str>]>,
    /// The rule's affinity attribute, once a member was available.
    affinity: Option<Arc<str>>,
    /// The first 16 bytes of the affinity digest, when the value decided.
    digest: Option<[u8; 16]>,
    /// The draw, in millionths of the total share, when one was made.
    draw_ppm: Option<u32>,
    /// The available members, in `primaries` order: plain numbers (one
    /// allocation, no reference counts). A vector rather than an inline
    /// array: the decision is moved a few times on its way out, and an
    /// inline array of [`INLINE`] members cost more in copies than the
    /// allocation does.
    seen: Vec<SeenMember>,
    /// Why the first member won.
    why: Why,
}

/// One available member as seen.
#[derive(Debug, Clone, Copy, Default)]
struct SeenMember {
    load: Option<Load>,
    /// Its position in the rule's primaries.
    index: u32,
    /// Its share of the draw, in millionths (0 when no draw was made).
    share_ppm: u32,
}

/// Why the first member won; `absent`: the rule's affinity attribute was
/// not among the attributes (the sentence says so first).
#[derive(Debug, Clone, Copy)]
enum Why {
    /// No member was available.
    NoneAvailable,
    /// The highest rendezvous score for the affinity value.
    Affinity { winner: u32 },
    /// `balance: priority`: the lowest priority.
    Priority { absent: bool, winner: u32 },
    /// No member had a share (weight or advertised capacity): by priority.
    NoShare { absent: bool, winner: u32 },
    /// The draw fell in the winner's share.
    Draw {
        absent: bool,
        winner: u32,
        /// The winner's share, in thousandths.
        share_permille: u32,
        /// How many members were available.
        available: u32,
    },
}

const NONE_AVAILABLE: &str = "no member of the set is available";
const AFFINITY_ON: &str = "affinity on `";
const DIGEST: &str = "` (digest ";
const RANKS_FIRST: &str = " ranks first among the available members by rendezvous hashing";
const ABSENT_1: &str = "affinity attribute `";
const ABSENT_2: &str = "` absent; ";
const PRIORITY: &str = "priority: ";
const LOWEST: &str = " has the lowest priority among the available members";
const NO_WEIGHT: &str = ": no available member has a weight, so by priority: ";
const NO_CAPACITY: &str = ": no available member advertises free capacity, so by priority: ";
const DRAW: &str = ": draw ";
const FELL: &str = " ppm fell in ";
const SHARE: &str = "'s share (";
const OF: &str = "% of ";
const AVAILABLE: &str = " available members)";

impl Decided {
    fn name(&self, i: u32) -> &str {
        self.names.get(i as usize).map_or("", |n| n)
    }

    fn absent(&self, absent: bool) -> Option<&str> {
        if absent {
            self.affinity.as_deref()
        } else {
            None
        }
    }

    /// Calls `f` with each piece of the sentence, in order.
    fn why_pieces(&self, f: &mut dyn FnMut(&str)) {
        let absent = |absent: bool, f: &mut dyn FnMut(&str)| {
            if let Some(attr) = self.absent(absent) {
                f(ABSENT_1);
                f(attr);
                f(ABSENT_2);
            }
        };
        match self.why {
            Why::NoneAvailable => f(NONE_AVAILABLE),
            Why::Affinity { winner } => {
                // "affinity on `{attr}` (digest {hex of 8 bytes}): {winner}
                // ranks first among the available members by rendezvous
                // hashing"
                let mut hex = [0u8; 16];
                let digest = self.digest.unwrap_or_default();
                let short = hex_into(&digest[..8], &mut hex);
                f(AFFINITY_ON);
                f(self.affinity.as_deref().unwrap_or(""));
                f(DIGEST);
                f(short);
                f("): ");
                f(self.name(winner));
                f(RANKS_FIRST);
            }
            Why::Priority { absent: a, winner } => {
                absent(a, f);
                f(PRIORITY);
                f(self.name(winner));
                f(LOWEST);
            }
            Why::NoShare { absent: a, winner } => {
                absent(a, f);
                f(self.mode);
                f(if self.mode == Balance::Weighted.as_str() {
                    NO_WEIGHT
                } else {
                    NO_CAPACITY
                });
                f(self.name(winner));
            }
            Why::Draw {
                absent: a,
                winner,
                share_permille,
                available,
            } => {
                // "{mode}: draw {ppm} ppm fell in {winner}'s share
                // ({p}.{p}% of {n} available members)"
                absent(a, f);
                f(self.mode);
                f(DRAW);
                f(Decimal::of(u64::from(self.draw_ppm.unwrap_or(0))).as_str());
                f(FELL);
                f(self.name(winner));
                f(SHARE);
                f(Decimal::of(u64::from(share_permille / 10)).as_str());
                f(".");
                f(Decimal::of(u64::from(share_permille % 10)).as_str());
                f(OF);
                f(Decimal::of(u64::from(available)).as_str());
                f(AVAILABLE);
            }
        }
    }
}

/// Writes `bytes` in lowercase hex into `out` (twice their length).
fn hex_into<'o>(bytes: &[u8], out: &'o mut [u8]) -> &'o str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut n = 0;
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
        n += 2;
    }
    // Only ASCII hex digits were written.
    std::str::from_utf8(&out[..n]).unwrap_or("")
}

impl BalanceNote {
    /// `least_loaded`, `priority`, `weighted`, or `affinity` when the
    /// affinity attribute decided.
    pub fn mode(&self) -> &'static str {
        match &self.0 {
            Repr::Decided(d) => d.mode,
            Repr::Explained(e) => e.mode,
        }
    }

    /// At least the length of [`BalanceNote::why`] (at most a few dozen
    /// bytes more), without writing it: what to reserve for it.
    pub fn why_capacity(&self) -> usize {
        let d = match &self.0 {
            Repr::Decided(d) => d,
            Repr::Explained(e) => return e.why.len(),
        };
        let absent = |a: bool| {
            d.absent(a)
                .map_or(0, |attr| ABSENT_1.len() + attr.len() + ABSENT_2.len())
        };
        match d.why {
            Why::NoneAvailable => NONE_AVAILABLE.len(),
            Why::Affinity { winner } => {
                AFFINITY_ON.len()
                    + d.affinity.as_deref().map_or(0, str::len)
                    + DIGEST.len()
                    + 16
                    + 3
                    + d.name(winner).len()
                    + RANKS_FIRST.len()
            }
            Why::Priority { absent: a, winner } => {
                absent(a) + PRIORITY.len() + d.name(winner).len() + LOWEST.len()
            }
            Why::NoShare { absent: a, winner } => {
                absent(a) + d.mode.len() + NO_CAPACITY.len() + d.name(winner).len()
            }
            // Four numbers of at most 10 digits each.
            Why::Draw {
                absent: a, winner, ..
            } => {
                absent(a)
                    + d.mode.len()
                    + DRAW.len()
                    + FELL.len()
                    + d.name(winner).len()
                    + SHARE.len()
                    + 1
                    + OF.len()
                    + AVAILABLE.len()
                    + 40
            }
        }
    }

    /// Appends the sentence saying why the first member won.
    pub fn write_why(&self, out: &mut String) {
        match &self.0 {
            Repr::Decided(d) => d.why_pieces(&mut |piece| out.push_str(piece)),
            Repr::Explained(e) => out.push_str(&e.why),
        }
    }

    /// The sentence saying why the first member won.
    pub fn why(&self) -> Cow<'_, str> {
        match &self.0 {
            Repr::Decided(_) => {
                let mut why = String::with_capacity(self.why_capacity());
                self.write_why(&mut why);
                Cow::Owned(why)
            }
            Repr::Explained(e) => Cow::Borrowed(&e.why),
        }
    }

    /// The note written out: what the decision log records, `policy
    /// explain` prints and `ExplainRoute` returns.
    pub fn explain(&self) -> BalanceExplanation {
        let d = match &self.0 {
            Repr::Decided(d) => d,
            Repr::Explained(e) => return (**e).clone(),
        };
        BalanceExplanation {
            mode: d.mode,
            affinity: d.affinity.as_deref().map(str::to_string),
            affinity_digest: d.digest.map(hex::encode),
            draw_ppm: d.draw_ppm,
            loads: d
                .seen
                .iter()
                .map(|s| LoadSeen {
                    region: d
                        .names
                        .get(s.index as usize)
                        .cloned()
                        .unwrap_or_else(|| Arc::from("")),
                    advertised: s.load.is_some(),
                    total_slots: s.load.map_or(0, |l| l.total_slots),
                    free_slots: s.load.map_or(0, |l| l.free_slots),
                    queue_depth: s.load.map_or(0, |l| l.queue_depth),
                    share_ppm: s.share_ppm,
                })
                .collect(),
            why: self.why().into_owned(),
        }
    }
}

impl From<BalanceExplanation> for BalanceNote {
    fn from(e: BalanceExplanation) -> Self {
        BalanceNote(Repr::Explained(Box::new(e)))
    }
}

impl From<Decided> for BalanceNote {
    fn from(d: Decided) -> Self {
        BalanceNote(Repr::Decided(d))
    }
}

/// Two notes are equal when they explain the same.
impl PartialEq for BalanceNote {
    fn eq(&self, other: &Self) -> bool {
        self.explain() == other.explain()
    }
}

/// Written as its [`BalanceExplanation`].
impl Serialize for BalanceNote {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.explain().serialize(s)
    }
}

/// A [`BalanceNote`] written out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BalanceExplanation {
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
    pub region: Arc<str>,
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
/// load, [`Rule::primary_ranks`]); the note keeps numbers, not text: no
/// allocation for a set of up to [`INLINE`] members without affinity.
pub(crate) fn order(
    rule: &Rule,
    attrs: &Attributes,
    members: &mut [Member],
    draw: u64,
) -> BalanceNote {
    let mut note = Decided {
        mode: rule.balance.as_str(),
        names: rule.shared_primaries.clone(),
        affinity: None,
        digest: None,
        draw_ppm: None,
        seen: members
            .iter()
            .map(|m| SeenMember {
                load: m.load,
                index: u32::try_from(m.index).unwrap_or(u32::MAX),
                share_ppm: 0,
            })
            .collect(),
        why: Why::NoneAvailable,
    };
    if members.is_empty() {
        return note.into();
    }
    let name = |i: usize| rule.primaries[i].as_str();
    let winner = |members: &[Member]| u32::try_from(members[0].index).unwrap_or(u32::MAX);

    let mut absent = false;
    if let Some(attr) = &rule.shared_affinity {
        note.affinity = Some(attr.clone());
        if let Some(value) = attrs.get(&**attr) {
            let digest = affinity_digest(attr, value);
            // Highest score first; equal scores (never in practice) by name.
            members.sort_by_cached_key(|m| {
                (
                    std::cmp::Reverse(rendezvous(&digest, name(m.index))),
                    name(m.index),
                )
            });
            note.mode = "affinity";
            note.digest = digest[..16].try_into().ok();
            note.why = Why::Affinity {
                winner: winner(members),
            };
            return note.into();
        }
        absent = true;
    }

    if rule.balance == Balance::Priority {
        members.sort_unstable_by_key(|m| m.rank);
        note.why = Why::Priority {
            absent,
            winner: winner(members),
        };
        return note.into();
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
        note.why = Why::NoShare {
            absent,
            winner: winner(members),
        };
        return note.into();
    }
    // `members` and `note.seen` are both in `primaries` order here.
    for (m, seen) in members.iter().zip(note.seen.iter_mut()) {
        seen.share_ppm = round_share((weight(m) / total) * 1e6);
    }
    // Tie order: weight (descending), then priority, then name. Every
    // weight is finite and at least +0 here (the total is finite), so the
    // order of their bits is their order (`f64::total_cmp`'s).
    members.sort_unstable_by_key(|m| (std::cmp::Reverse(m.weight.to_bits()), m.rank));
    // A point in [0, total): the member whose interval holds it is chosen.
    let fraction = (draw >> 11) as f64 / (1u64 << 53) as f64;
    note.draw_ppm = Some((fraction * 1e6) as u32);
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
    note.why = Why::Draw {
        absent,
        winner: winner(members),
        share_permille,
        available: u32::try_from(members.len()).unwrap_or(u32::MAX),
    };
    note.into()
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
