//! One bound shared fairly between the parties whose records fill it.
//!
//! A store with one cap for everyone lets the party that floods it push the others' records out:
//! an enforcement point that never reads can turn a hundred thousand SETs into dead letters and
//! age out another's only one; a feed whose messages all fail can do the same to another feed's.
//! Past the cap, the parties holding the most give up their own oldest records until the rest fit
//! (max-min fairness): a party holding no more than an equal share of the cap never loses a record
//! to another's flood, and a store with a single party keeps its newest `cap`, as before.

use std::collections::BTreeMap;

/// The records to drop so that at most `cap` remain, as indexes into `parties` — each record's
/// party, **oldest record first** — in ascending order. Each party keeps its newest records.
///
/// The cap is split by water-filling: parties below an equal share of what is left keep all of
/// theirs, and the others get that share (one more each, smallest first, for a remainder).
pub fn over_cap<P: Ord>(parties: &[P], cap: usize) -> Vec<usize> {
    if parties.len() <= cap {
        return Vec::new();
    }
    let mut counts: BTreeMap<&P, usize> = BTreeMap::new();
    for p in parties {
        *counts.entry(p).or_default() += 1;
    }
    let allowed = shares(&counts, cap);
    // From the newest back: each party keeps its allowance, the older rest goes.
    let mut kept: BTreeMap<&P, usize> = BTreeMap::new();
    let mut dropped = Vec::with_capacity(parties.len() - cap);
    for (i, p) in parties.iter().enumerate().rev() {
        let k = kept.entry(p).or_default();
        if *k < allowed.get(p).copied().unwrap_or(0) {
            *k += 1;
        } else {
            dropped.push(i);
        }
    }
    dropped.reverse();
    dropped
}

/// How many records each party keeps of `counts` under `cap` (see [`over_cap`]).
fn shares<'a, P: Ord>(counts: &BTreeMap<&'a P, usize>, cap: usize) -> BTreeMap<&'a P, usize> {
    let mut by_count: Vec<(&P, usize)> = counts.iter().map(|(p, c)| (*p, *c)).collect();
    // Smallest first; equal counts in the parties' order, so the split is deterministic.
    by_count.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(b.0)));
    let mut left = cap;
    let mut out = BTreeMap::new();
    let n = by_count.len();
    for (i, (p, c)) in by_count.iter().enumerate() {
        let parties_left = n - i;
        let share = left / parties_left;
        if *c <= share {
            out.insert(*p, *c);
            left -= c;
            continue;
        }
        // Every party from here on holds more than the share: each gets it, and the remainder
        // goes one apiece to the smallest of them.
        let extra = left % parties_left;
        for (j, (p, _)) in by_count[i..].iter().enumerate() {
            out.insert(*p, share + usize::from(j < extra));
        }
        break;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept<'a>(parties: &[&'a str], cap: usize) -> Vec<(usize, &'a str)> {
        let dropped = over_cap(parties, cap);
        parties
            .iter()
            .enumerate()
            .filter(|(i, _)| !dropped.contains(i))
            .map(|(i, p)| (i, *p))
            .collect()
    }

    #[test]
    fn under_the_cap_nothing_goes() {
        assert!(over_cap(&["a", "b", "a"], 3).is_empty());
        assert!(over_cap::<&str>(&[], 0).is_empty());
    }

    #[test]
    fn a_flooding_party_loses_its_own_oldest_and_the_others_keep_theirs() {
        // "b" holds two of the oldest; "a" floods after it.
        let parties = ["b", "a", "b", "a", "a", "a", "a", "a"];
        assert_eq!(
            kept(&parties, 4),
            vec![(0, "b"), (2, "b"), (6, "a"), (7, "a")]
        );
        // With a single party the newest `cap` stay, as with one global bound.
        assert_eq!(kept(&["a", "a", "a"], 2), vec![(1, "a"), (2, "a")]);
    }

    #[test]
    fn the_cap_is_split_by_water_filling() {
        // c: 1, b: 3, a: 6; cap 7 → c keeps 1, then 6 left for two: 3 each.
        let mut parties = vec!["c"];
        parties.extend(["b"; 3]);
        parties.extend(["a"; 6]);
        let k = kept(&parties, 7);
        let count = |p: &str| k.iter().filter(|(_, q)| *q == p).count();
        assert_eq!((count("a"), count("b"), count("c")), (3, 3, 1));
        // A remainder goes to the smallest of those over the share: cap 6 → c 1, then 5 for two.
        let k = kept(&parties, 6);
        let count = |p: &str| k.iter().filter(|(_, q)| *q == p).count();
        assert_eq!((count("a"), count("b"), count("c")), (2, 3, 1));
        assert_eq!(over_cap(&parties, 0).len(), parties.len());
    }
}
