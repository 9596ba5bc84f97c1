//! A sorted-vector map for the small maps a principal's context holds per fact kind.
//!
//! Why not `BTreeMap`: a context usually holds one or two entries per kind (one risk source, one
//! device), and a `BTreeMap` allocates a whole node — room for eleven entries — for the first one.
//! With a million subjects that is most of the engine's memory: a context holding one Kafka risk
//! fact and one attribute took 4.3 KiB resident, for 0.5 KiB of JSON. Here the entries are a
//! `Vec` kept sorted by key, grown one slot at a time while small, so a context costs about what it
//! holds. Lookups are binary searches; inserting into a large map is linear, which no context's
//! map is (their keys are sources and claim names).
//!
//! It iterates, serializes and deserializes exactly as a `BTreeMap` (a JSON object in key order),
//! so stored contexts read back unchanged.

use std::borrow::Borrow;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Up to this many entries the map grows one slot at a time (no spare capacity); past it, as a
/// `Vec` does.
const EXACT_UP_TO: usize = 8;

/// A map kept as a `Vec` of entries sorted by key.
#[derive(Clone, PartialEq)]
pub struct CompactMap<K, V> {
    entries: Vec<(K, V)>,
}

impl<K, V> Default for CompactMap<K, V> {
    fn default() -> Self {
        CompactMap {
            entries: Vec::new(),
        }
    }
}

impl<K: Ord, V> CompactMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    fn find<Q>(&self, key: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.entries.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match self.find(key) {
            Ok(i) => Some(&mut self.entries[i].1),
            Err(_) => None,
        }
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).is_ok()
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.reserve_one();
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    /// The value at `key`, inserted with `make` first if absent.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        let i = match self.find(&key) {
            Ok(i) => i,
            Err(i) => {
                self.reserve_one();
                self.entries.insert(i, (key, make()));
                i
            }
        };
        &mut self.entries[i].1
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let i = self.find(key).ok()?;
        let (_, v) = self.entries.remove(i);
        if self.entries.is_empty() {
            self.entries = Vec::new();
        }
        Some(v)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.entries.retain_mut(|(k, v)| keep(k, v));
        if self.entries.len() <= EXACT_UP_TO {
            self.entries.shrink_to_fit();
        }
    }

    fn reserve_one(&mut self) {
        if self.entries.len() < EXACT_UP_TO {
            self.entries.reserve_exact(1);
        }
    }
}

impl<K, V> CompactMap<K, V> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn clear(&mut self) {
        self.entries = Vec::new();
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + ExactSizeIterator {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub fn iter_mut(
        &mut self,
    ) -> impl DoubleEndedIterator<Item = (&K, &mut V)> + ExactSizeIterator {
        self.entries.iter_mut().map(|(k, v)| (&*k, v))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + ExactSizeIterator {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.entries.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> + ExactSizeIterator {
        self.entries.iter_mut().map(|(_, v)| v)
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for CompactMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut entries: Vec<(K, V)> = iter.into_iter().collect();
        // Stable: of equal keys the last is kept, as `BTreeMap::from_iter` does.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut deduped: Vec<(K, V)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            match deduped.last_mut() {
                Some(last) if last.0 == k => last.1 = v,
                _ => deduped.push((k, v)),
            }
        }
        deduped.shrink_to_fit();
        CompactMap { entries: deduped }
    }
}

impl<K: Ord, V, const N: usize> From<[(K, V); N]> for CompactMap<K, V> {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl<'a, K, V> IntoIterator for &'a CompactMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl<K, V> IntoIterator for CompactMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for CompactMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Serialize, V: Serialize> Serialize for CompactMap<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.entries.len()))?;
        for (k, v) in &self.entries {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, K, V> Deserialize<'de> for CompactMap<K, V>
where
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries<K, V>(std::marker::PhantomData<(K, V)>);
        impl<'de, K, V> Visitor<'de> for Entries<K, V>
        where
            K: Deserialize<'de> + Ord,
            V: Deserialize<'de>,
        {
            type Value = CompactMap<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                // Bounded by what the stored or received document holds; collected, then sorted.
                let mut entries = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
                while let Some(entry) = access.next_entry()? {
                    entries.push(entry);
                }
                Ok(entries.into_iter().collect())
            }
        }
        deserializer.deserialize_map(Entries(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::CompactMap;
    use std::collections::BTreeMap;

    /// Inserts, replaces, removes and iterates as a `BTreeMap` does, and serializes to the same
    /// JSON (stored contexts read back unchanged).
    #[test]
    fn behaves_and_serializes_as_a_btree_map() {
        let mut compact = CompactMap::new();
        let mut btree = BTreeMap::new();
        for (i, k) in ["m", "b", "z", "b", "a", "q", "m"].iter().enumerate() {
            assert_eq!(
                compact.insert(k.to_string(), i),
                btree.insert(k.to_string(), i)
            );
        }
        assert_eq!(compact.remove("q"), btree.remove("q"));
        assert_eq!(compact.remove("absent"), btree.remove("absent"));
        assert_eq!(
            compact.iter().collect::<Vec<_>>(),
            btree.iter().collect::<Vec<_>>()
        );
        assert_eq!(compact.get("b"), Some(&3));
        assert!(compact.contains_key("z") && !compact.contains_key("q"));
        let json = serde_json::to_string(&compact).unwrap();
        assert_eq!(json, serde_json::to_string(&btree).unwrap());
        // Read back from a document in any key order, a repeated key keeping the last value.
        let back: CompactMap<String, usize> =
            serde_json::from_str(r#"{"z":1,"a":2,"m":3,"a":4}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            r#"{"a":4,"m":3,"z":1}"#
        );
        compact.retain(|k, _| k != "m");
        assert_eq!(compact.keys().collect::<Vec<_>>(), ["a", "b", "z"]);
        *compact.get_or_insert_with("c".into(), || 0) += 5;
        assert_eq!(compact.get("c"), Some(&5));
    }

    /// A map of one entry holds one slot: the reason this type exists.
    #[test]
    fn a_small_map_allocates_only_what_it_holds() {
        let mut m = CompactMap::new();
        m.insert("source".to_string(), 1u64);
        assert_eq!(m.entries.capacity(), 1);
        m.insert("other".to_string(), 2);
        assert_eq!(m.entries.capacity(), 2);
    }
}
