//! The change stream between snapshots: what a batch holds
//! ([`ChangeBody`]), and what is still to be sent to each peer ([`Outbox`]).
//!
//! Every state change of a task this region owns (accepted, leased,
//! renewed, requeued, completed, cancelled, fenced: the store's change
//! feed) is recorded once; at each heartbeat each permitted peer gets one
//! batch of the latest version of every task changed since its last
//! acknowledged batch, scoped by the same residency test as snapshots
//! ([`super::snapshot::scope_for`], at send time, with the peer's tags
//! then). A batch that was not acknowledged is merged back and sent with
//! the next; a peer whose backlog passes [`MAX_UNSENT`] tasks, or whose
//! receiver asks for one, gets a full snapshot instead.
//!
//! Sealing, the key ring and the replay rule are the snapshots' (one
//! sequence counter for both, per recipient sent in order under one lock),
//! under the envelope's [`super::envelope::Domain::Changes`].

use std::collections::{BTreeMap, BTreeSet};

use federation_api as api;

/// Most tasks waiting for one peer before the backlog is dropped for a full
/// snapshot.
pub const MAX_UNSENT: usize = 50_000;

/// The plaintext of one change batch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChangeBody {
    /// The region whose tasks changed.
    #[prost(string, tag = "1")]
    pub source_region: String,
    /// Its epoch.
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    /// Sequence within the epoch (shared with snapshots).
    #[prost(uint64, tag = "3")]
    pub sequence: u64,
    /// The source's policy hash.
    #[prost(string, tag = "4")]
    pub policy_hash: String,
    /// When it was sealed, ms since the Unix epoch (source's clock).
    #[prost(int64, tag = "5")]
    pub sent_unix_ms: i64,
    /// The latest version of each task changed.
    #[prost(message, repeated, tag = "6")]
    pub tasks: Vec<api::Task>,
}

/// The changes heard from the store since the last distribution to the
/// peers: pushed by the store's committing thread (the change sink: a
/// short lock, no merge, nothing woken), taken whole at the next heartbeat
/// by the region's leader. Past [`MAX_UNSENT`] tasks (a replica that does
/// not lead never takes them) they are dropped and marked lost: every peer
/// then gets a full snapshot instead. Finished tasks are also kept (the
/// newest few) for snapshots' results, folded in when a snapshot is built.
#[derive(Debug, Default)]
pub struct Fresh {
    tasks: Vec<api::Task>,
    lost: bool,
    finished: std::collections::VecDeque<api::Task>,
}

impl Fresh {
    /// Keeps a change (or marks the changes lost past [`MAX_UNSENT`]).
    pub fn record(&mut self, task: api::Task) {
        if self.lost {
            return;
        }
        if self.tasks.len() >= MAX_UNSENT {
            self.tasks = Vec::new();
            self.lost = true;
            return;
        }
        self.tasks.push(task);
    }

    /// Keeps a finished task for snapshots' results (the newest `most`).
    pub fn finish(&mut self, task: api::Task, most: usize) {
        self.finished.push_back(task);
        while self.finished.len() > most {
            self.finished.pop_front();
        }
    }

    /// The finished tasks kept since the last take, oldest first.
    pub fn take_finished(&mut self) -> std::collections::VecDeque<api::Task> {
        std::mem::take(&mut self.finished)
    }

    /// The changes kept, and whether some were lost, since the last take.
    pub fn take(&mut self) -> (Vec<api::Task>, bool) {
        (
            std::mem::take(&mut self.tasks),
            std::mem::take(&mut self.lost),
        )
    }
}

#[derive(Debug, Default)]
struct Peer {
    unsent: BTreeMap<String, api::Task>,
    in_flight: bool,
    snapshot_wanted: bool,
}

/// Changes not yet acknowledged, per peer.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Changes recorded since the last distribution to the peers.
    fresh: BTreeMap<String, api::Task>,
    peers: BTreeMap<String, Peer>,
}

fn merge(into: &mut BTreeMap<String, api::Task>, task: api::Task) {
    match into.get(&task.task_id) {
        Some(held) if held.version >= task.version => {}
        _ => {
            into.insert(task.task_id.clone(), task);
        }
    }
}

impl Outbox {
    /// Records a change (the newest version of a task wins).
    pub fn record(&mut self, task: api::Task) {
        merge(&mut self.fresh, task);
    }

    /// The change feed lost changes: every peer needs a full snapshot.
    pub fn lost(&mut self) {
        self.fresh.clear();
        for p in self.peers.values_mut() {
            p.unsent.clear();
            p.snapshot_wanted = true;
        }
    }

    /// Hands the fresh changes to `recipients` (peers no longer permitted
    /// are forgotten), then returns, for each recipient in `ready` with no
    /// batch in flight and changes waiting, its batch (now in flight).
    pub fn take_batches(
        &mut self,
        recipients: &BTreeSet<String>,
        ready: &BTreeSet<String>,
    ) -> Vec<(String, Vec<api::Task>)> {
        self.peers.retain(|r, _| recipients.contains(r));
        let mut fresh = Some(std::mem::take(&mut self.fresh));
        for (i, r) in recipients.iter().enumerate() {
            let peer = self.peers.entry(r.clone()).or_default();
            // The last recipient takes the changes themselves, the others
            // copies (usually there is one backup).
            if i + 1 == recipients.len() {
                for t in fresh.take().into_iter().flat_map(BTreeMap::into_values) {
                    merge(&mut peer.unsent, t);
                }
            } else {
                for t in fresh.iter().flat_map(BTreeMap::values) {
                    merge(&mut peer.unsent, t.clone());
                }
            }
            if peer.unsent.len() > MAX_UNSENT {
                tracing::warn!(region = %r, tasks = peer.unsent.len(), "change backlog too long; a full snapshot replaces it");
                peer.unsent.clear();
                peer.snapshot_wanted = true;
            }
        }
        let mut out = Vec::new();
        for r in ready {
            let Some(peer) = self.peers.get_mut(r) else {
                continue;
            };
            if peer.in_flight || peer.unsent.is_empty() {
                continue;
            }
            peer.in_flight = true;
            let tasks = std::mem::take(&mut peer.unsent).into_values().collect();
            out.push((r.clone(), tasks));
        }
        out
    }

    /// The batch to `recipient` ended: `unsent` (when it did not arrive)
    /// goes back in front of what changed since; `snapshot_wanted` when the
    /// peer asked for a snapshot (or refused the batch).
    pub fn finished(
        &mut self,
        recipient: &str,
        unsent: Option<Vec<api::Task>>,
        snapshot_wanted: bool,
    ) {
        let peer = self.peers.entry(recipient.to_string()).or_default();
        peer.in_flight = false;
        peer.snapshot_wanted |= snapshot_wanted;
        for t in unsent.into_iter().flatten() {
            merge(&mut peer.unsent, t);
        }
    }

    /// Peers that want a full snapshot; the wish is cleared.
    pub fn take_snapshot_wanted(&mut self) -> Vec<String> {
        self.peers
            .iter_mut()
            .filter_map(|(r, p)| std::mem::take(&mut p.snapshot_wanted).then(|| r.clone()))
            .collect()
    }

    /// Marks that `recipient` wants a snapshot (a snapshot push failed).
    pub fn want_snapshot(&mut self, recipient: &str) {
        self.peers
            .entry(recipient.to_string())
            .or_default()
            .snapshot_wanted = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str, version: u64) -> api::Task {
        api::Task {
            task_id: id.into(),
            version,
            ..Default::default()
        }
    }

    #[test]
    fn fresh_changes_past_the_bound_are_dropped_as_lost() {
        let mut f = Fresh::default();
        for i in 0..MAX_UNSENT {
            f.record(t(&i.to_string(), 1));
        }
        let (tasks, lost) = f.take();
        assert_eq!((tasks.len(), lost), (MAX_UNSENT, false));
        for i in 0..=MAX_UNSENT {
            f.record(t(&i.to_string(), 1));
        }
        f.record(t("after", 1));
        let (tasks, lost) = f.take();
        assert!(tasks.is_empty() && lost, "one past the bound: all lost");
        f.record(t("next", 1));
        assert_eq!(f.take(), (vec![t("next", 1)], false));
    }

    #[test]
    fn newest_version_wins_and_unsent_batches_come_back() {
        let all: BTreeSet<String> = ["europe".to_string()].into();
        let mut o = Outbox::default();
        o.record(t("a", 1));
        o.record(t("a", 3));
        o.record(t("a", 2));
        let b = o.take_batches(&all, &all);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].1.iter().map(|t| t.version).collect::<Vec<_>>(), [3]);
        // In flight: nothing more is taken; a newer change waits.
        o.record(t("b", 1));
        assert!(o.take_batches(&all, &all).is_empty());
        // The batch failed: it comes back with b.
        o.finished("europe", Some(b[0].1.clone()), false);
        let b = o.take_batches(&all, &all);
        assert_eq!(b[0].1.len(), 2);
        o.finished("europe", None, true);
        assert_eq!(o.take_snapshot_wanted(), ["europe".to_string()]);
        assert!(o.take_snapshot_wanted().is_empty());
        // A peer that is not ready keeps its backlog.
        o.record(t("c", 1));
        assert!(o.take_batches(&all, &BTreeSet::new()).is_empty());
        assert_eq!(o.take_batches(&all, &all)[0].1.len(), 1);
    }
}
