//! Grants held per party (registrant), the counts a party's grant quota is checked against.
//!
//! A single node counts the grants it holds. In cluster mode a party's grants are spread over
//! the instances by principal, so each instance also keeps what the others last announced they
//! hold (their members-topic records, [`crate::cluster::Directory`]): a party's quota is then
//! the cluster's, not N times it. The others' counts are as old as their last announcement (a
//! couple of seconds), so a party registering fast on several instances at once can pass its
//! quota by what it registers in that time; a grant moving between instances is briefly counted
//! by both, which refuses early rather than late.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use crate::grant::Registrant;

/// Most parties one instance's announcement may name: the rest are not counted. The members
/// topic is the cluster's own, but what is read from it is bounded all the same.
pub const MAX_ANNOUNCED_PARTIES: usize = 4096;
/// Longest party name taken from an announcement.
const MAX_PARTY_NAME: usize = 512;

/// Grants held per registrant, here and (cluster mode) on the other instances.
#[derive(Default)]
pub struct GrantCounts {
    here: Mutex<HashMap<Registrant, usize>>,
    /// By registrant name: the other live instances' counts, summed.
    elsewhere: RwLock<HashMap<String, usize>>,
}

impl GrantCounts {
    /// One grant more (or fewer) for `registrant` here, shown in `vigil_grants_by_registrant`; a
    /// count at zero leaves the table (the gauge shows 0).
    pub(super) fn count(&self, registrant: Registrant, more: bool) {
        let n = {
            let mut here = self.here();
            let n = here.entry(registrant).or_default();
            *n = if more { *n + 1 } else { n.saturating_sub(1) };
            let n = *n;
            if n == 0 {
                here.remove(&registrant);
            }
            n
        };
        metrics::gauge!(crate::telemetry::GRANTS_BY_REGISTRANT, "registrant" => registrant.label())
            .set(n as f64);
    }

    /// Counts one grant more for `registrant` if it holds fewer than `quota` (here and, as last
    /// announced, elsewhere; `None`: no quota) — checked and counted under one lock, so two
    /// shards registering for one party at once cannot both take its last place.
    pub(super) fn take(&self, registrant: Registrant, quota: Option<usize>) -> bool {
        let n = {
            let mut here = self.here();
            let n = here.entry(registrant).or_default();
            if let Some(quota) = quota {
                if n.saturating_add(self.held_elsewhere(registrant)) >= quota {
                    if *n == 0 {
                        here.remove(&registrant);
                    }
                    return false;
                }
            }
            *n += 1;
            *n
        };
        metrics::gauge!(crate::telemetry::GRANTS_BY_REGISTRANT, "registrant" => registrant.label())
            .set(n as f64);
        true
    }

    /// How many grants `registrant` holds on this instance.
    pub fn held_here(&self, registrant: Registrant) -> usize {
        self.here().get(&registrant).copied().unwrap_or(0)
    }

    /// How many grants `registrant` holds here and, as last announced, on the other instances.
    pub fn held_in_cluster(&self, registrant: Registrant) -> usize {
        self.held_here(registrant)
            .saturating_add(self.held_elsewhere(registrant))
    }

    /// How many grants the other instances last announced `registrant` holds.
    fn held_elsewhere(&self, registrant: Registrant) -> usize {
        self.elsewhere
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&*registrant.name())
            .copied()
            .unwrap_or(0)
    }

    /// This instance's counts by registrant name, for its announcement.
    pub fn by_name(&self) -> BTreeMap<String, usize> {
        self.here()
            .iter()
            .filter(|(r, _)| !r.is_none())
            .map(|(r, n)| (r.name().to_string(), *n))
            .collect()
    }

    /// Takes the other live instances' announced counts (replacing the last ones): summed per
    /// party, saturating, with at most [`MAX_ANNOUNCED_PARTIES`] parties of sane names from each.
    /// Shown in `vigil_cluster_grants_by_registrant`.
    pub fn set_elsewhere<'a>(
        &self,
        announced: impl IntoIterator<Item = &'a BTreeMap<String, usize>>,
    ) {
        let mut sums: HashMap<String, usize> = HashMap::new();
        for counts in announced {
            for (name, n) in counts
                .iter()
                .filter(|(name, _)| name.len() <= MAX_PARTY_NAME)
                .take(MAX_ANNOUNCED_PARTIES)
            {
                let sum = sums.entry(name.clone()).or_default();
                *sum = sum.saturating_add(*n);
            }
        }
        let mut elsewhere = self
            .elsewhere
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for gone in elsewhere.keys().filter(|name| !sums.contains_key(*name)) {
            metrics::gauge!(crate::telemetry::CLUSTER_GRANTS_BY_REGISTRANT, "registrant" => gone.clone())
                .set(0.0);
        }
        for (name, n) in &sums {
            metrics::gauge!(crate::telemetry::CLUSTER_GRANTS_BY_REGISTRANT, "registrant" => name.clone())
                .set(*n as f64);
        }
        *elsewhere = sums;
    }

    /// The counts here. Nothing panics while holding them, so a poisoned lock's counts are still
    /// true: taken rather than skipped (a skipped count would let a party past its quota).
    fn here(&self) -> MutexGuard<'_, HashMap<Registrant, usize>> {
        self.here.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Taking a place checks and counts under one lock: eight threads racing for one party's
    /// quota of 100 take exactly 100 places between them (checked, then counted, they took up to
    /// seven more), another instance's announced count included.
    #[test]
    fn racing_registrations_never_take_more_than_the_quota() {
        let counts = std::sync::Arc::new(GrantCounts::default());
        let party = Registrant::client("quota-race");
        let elsewhere = BTreeMap::from([("client:quota-race".to_owned(), 20)]);
        counts.set_elsewhere([&elsewhere]);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let counts = counts.clone();
                std::thread::spawn(move || {
                    (0..50).filter(|_| counts.take(party, Some(100))).count()
                })
            })
            .collect();
        let taken: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(taken, 80);
        assert_eq!(counts.held_here(party), 80);
        assert!(!counts.take(party, Some(100)));
        // No quota: always counted.
        let none = Registrant::NONE;
        assert!(counts.take(none, None));
        assert_eq!(counts.held_here(none), 1);
    }

    #[test]
    fn a_partys_count_adds_what_the_other_instances_announced() {
        let counts = GrantCounts::default();
        let gateway = Registrant::client("quota-gateway");
        let idp = Registrant::transmitter("quota-idp");
        counts.count(gateway, true);
        counts.count(gateway, true);
        counts.count(idp, true);
        assert_eq!(counts.held_in_cluster(gateway), 2);
        let a = BTreeMap::from([("client:quota-gateway".to_owned(), 3)]);
        let b = BTreeMap::from([
            ("client:quota-gateway".to_owned(), usize::MAX),
            ("transmitter:quota-idp".to_owned(), 4),
        ]);
        counts.set_elsewhere([&a]);
        assert_eq!(counts.held_here(gateway), 2, "here is unchanged");
        assert_eq!(counts.held_in_cluster(gateway), 5);
        assert_eq!(counts.held_in_cluster(idp), 1);
        counts.set_elsewhere([&a, &b]);
        assert_eq!(counts.held_in_cluster(gateway), usize::MAX, "saturated");
        assert_eq!(counts.held_in_cluster(idp), 5);
        // An instance gone silent is no longer announced: its counts go.
        counts.set_elsewhere([]);
        assert_eq!(counts.held_in_cluster(gateway), 2);
        assert_eq!(
            counts.by_name(),
            BTreeMap::from([
                ("client:quota-gateway".to_owned(), 2),
                ("transmitter:quota-idp".to_owned(), 1)
            ])
        );
        counts.count(idp, false);
        assert!(!counts.by_name().contains_key("transmitter:quota-idp"));
    }

    #[test]
    fn an_announcement_names_a_bounded_number_of_parties() {
        let counts = GrantCounts::default();
        let many: BTreeMap<String, usize> = (0..MAX_ANNOUNCED_PARTIES + 10)
            .map(|i| (format!("client:p{i:05}"), 1))
            .chain([("x".repeat(MAX_PARTY_NAME + 1), 7)])
            .collect();
        counts.set_elsewhere([&many]);
        let held = counts
            .elsewhere
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        assert_eq!(held, MAX_ANNOUNCED_PARTIES);
    }
}
