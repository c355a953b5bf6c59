//! Large writes as several bounded transactions.
//!
//! etcd refuses a transaction with more than `--max-txn-ops` entries (128 by
//! default) in its compare, success or failure list ("too many operations
//! in txn request"), and a refused transaction is refused whole: before
//! this, a controller plan or a batch of statuses over that size failed on
//! every retry, so `berth scale web=300` stalled with no instance placed.
//! Writers whose size grows with the cluster build their write as
//! [`Part`]s and commit them with [`commit`], which packs the parts in order
//! into transactions of at most [`MAX_TXN_OPS`] compares and ops each.
//!
//! What this costs: the write is no longer atomic. Each transaction is (its
//! compares are checked against the store as it is when that transaction
//! runs, and the `common` compares, such as the leader's fencing token, are
//! repeated in every one), but a later one can fail after earlier ones were
//! applied. Writers that use this are level-triggered loops whose next pass
//! recomputes what is still missing from the state the applied part left.

use crate::{Compare, Op, Revision, Store, StoreError, Txn};

/// The most compares, or ops, berth puts in one transaction: below etcd's
/// default `--max-txn-ops` (128) with room for a writer's common compares.
pub const MAX_TXN_OPS: usize = 100;

/// Compares and ops that must be applied together (one transaction).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Part {
    /// Conditions for this part's ops.
    pub compare: Vec<Compare>,
    /// Ops applied when every compare of its transaction holds.
    pub success: Vec<Op>,
}

impl Part {
    /// One op without a condition.
    pub fn op(op: Op) -> Self {
        Self {
            compare: Vec::new(),
            success: vec![op],
        }
    }

    /// One op applied only if `compare` holds.
    pub fn guarded(compare: Compare, op: Op) -> Self {
        Self {
            compare: vec![compare],
            success: vec![op],
        }
    }

    fn size(&self) -> usize {
        self.compare.len().max(self.success.len())
    }
}

/// Pack `parts`, in order, into transactions whose compare and success
/// lists each hold at most `max` entries, `common` compares included (they
/// head every transaction). A part is never split; one larger than the
/// room left by `common` gets a transaction of its own (the store then
/// judges it).
pub fn chunks(common: &[Compare], parts: Vec<Part>, max: usize) -> Vec<Txn> {
    let room = max.saturating_sub(common.len()).max(1);
    let mut out: Vec<Txn> = Vec::new();
    let mut current: Option<Txn> = None;
    for part in parts {
        let fits = current.as_ref().is_some_and(|t| {
            t.compare.len() - common.len() + part.compare.len() <= room
                && t.success.len() + part.success.len() <= room
        });
        if !fits {
            out.extend(current.take());
        }
        let txn = current.get_or_insert_with(|| Txn {
            compare: common.to_vec(),
            ..Txn::default()
        });
        debug_assert!(part.size() > 0 || part.compare.is_empty());
        txn.compare.extend(part.compare);
        txn.success.extend(part.success);
    }
    out.extend(current);
    out
}

/// What [`commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Transactions applied, in order.
    pub applied: usize,
    /// Transactions the write was split into.
    pub of: usize,
    /// The store revision after the last applied one (`None`: none was).
    pub revision: Option<Revision>,
}

impl Committed {
    /// Every transaction was applied.
    pub fn complete(&self) -> bool {
        self.applied == self.of
    }
}

/// Commit `parts` as [`chunks`] of at most [`MAX_TXN_OPS`], in order,
/// stopping at the first transaction whose compares fail (the rest were
/// computed from the same, now stale, view). A store error also stops
/// it, after earlier transactions may have been applied.
pub async fn commit(
    store: &dyn Store,
    common: &[Compare],
    parts: Vec<Part>,
) -> Result<Committed, StoreError> {
    let txns = chunks(common, parts, MAX_TXN_OPS);
    let mut done = Committed {
        applied: 0,
        of: txns.len(),
        revision: None,
    };
    for txn in txns {
        let result = store.txn(txn).await?;
        if !result.succeeded {
            break;
        }
        done.applied += 1;
        done.revision = Some(result.revision);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> Op {
        Op::put(k.to_owned(), bytes::Bytes::from_static(b"v"))
    }

    fn cas(k: &str, rev: Revision) -> Compare {
        Compare::ModRevision(k.to_owned(), rev)
    }

    #[test]
    fn chunks_stay_under_the_limit_keep_order_and_repeat_the_common_compares() {
        let fence = cas("/leader", 7);
        let parts: Vec<Part> = (0..250)
            .map(|i| Part::guarded(cas(&format!("/k{i:03}"), 0), put(&format!("/k{i:03}"))))
            .collect();
        let txns = chunks(std::slice::from_ref(&fence), parts, MAX_TXN_OPS);
        assert_eq!(txns.len(), 3, "99 + 99 + 52 parts");
        let mut seen = Vec::new();
        for t in &txns {
            assert!(t.compare.len() <= MAX_TXN_OPS && t.success.len() <= MAX_TXN_OPS);
            assert_eq!(t.compare[0], fence, "every chunk is fenced");
            assert_eq!(t.compare.len(), t.success.len() + 1);
            for op in &t.success {
                let Op::Put { key, .. } = op else {
                    panic!("{op:?}")
                };
                seen.push(key.clone());
            }
        }
        let want: Vec<String> = (0..250).map(|i| format!("/k{i:03}")).collect();
        assert_eq!(seen, want, "every op once, in order");
    }

    #[test]
    fn parts_are_never_split() {
        // Two compares and two ops each, as a service address and its
        // reverse key: 10 per transaction of at most 21 with one common.
        let parts: Vec<Part> = (0..25)
            .map(|i| Part {
                compare: vec![cas(&format!("/a{i}"), 0), cas(&format!("/b{i}"), 0)],
                success: vec![put(&format!("/a{i}")), put(&format!("/b{i}"))],
            })
            .collect();
        let txns = chunks(&[cas("/leader", 1)], parts, 21);
        assert_eq!(
            txns.iter().map(|t| t.success.len()).collect::<Vec<_>>(),
            [20, 20, 10]
        );
        // Unconditional ops (statuses) need no compares at all.
        let ops: Vec<Part> = (0..201).map(|i| Part::op(put(&format!("/s{i}")))).collect();
        let txns = chunks(&[], ops, MAX_TXN_OPS);
        assert_eq!(
            txns.iter().map(|t| t.success.len()).collect::<Vec<_>>(),
            [100, 100, 1]
        );
        assert!(txns.iter().all(|t| t.compare.is_empty()));
        assert!(chunks(&[], Vec::new(), MAX_TXN_OPS).is_empty());
    }

    #[tokio::test]
    async fn commit_applies_in_order_and_stops_at_the_first_stale_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let rev = store.put("/taken", bytes::Bytes::new(), 0).await.unwrap();
        // 150 creates, the 120th of which finds its key taken: the first
        // chunk (100) is applied, the second is not.
        let mut parts: Vec<Part> = (0..150)
            .map(|i| Part::guarded(cas(&format!("/n{i:03}"), 0), put(&format!("/n{i:03}"))))
            .collect();
        parts[119] = Part::guarded(cas("/taken", 0), put("/taken"));
        let done = commit(&store, &[], parts).await.unwrap();
        assert_eq!((done.applied, done.of), (1, 2));
        assert!(!done.complete());
        assert!(done.revision.unwrap() > rev);
        let (kvs, _) = store.range("/n").await.unwrap();
        assert_eq!(kvs.len(), 100);
    }
}
