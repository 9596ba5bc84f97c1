//! A sorted-vector map (a `BTreeMap` once large) for the small maps a principal's context holds per fact kind.
//!
//! Why not `BTreeMap`: a context usually holds one or two entries per kind (one risk source, one
//! device), and a `BTreeMap` allocates a whole node — room for eleven entries — for the first one.
//! With a million subjects that is most of the engine's memory: a context holding one Kafka risk
//! fact and one attribute took 4.3 KiB resident, for 0.5 KiB of JSON. Here the entries are a
//! `Vec` kept sorted by key, grown one slot at a time while small, so a context costs about what it
//! holds. Lookups are binary searches. Past 64 entries (a transmitter sending thousands of claims
//! or attributes) the map turns into a `BTreeMap`, so no input buys quadratic inserts.
//!
//! It iterates, serializes and deserializes exactly as a `BTreeMap` (a JSON object in key order),
//! so stored contexts read back unchanged.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Up to this many entries the map grows one slot at a time (no spare capacity).
const EXACT_UP_TO: usize = 8;

/// Past this many entries the map is a `BTreeMap`: inserting into a sorted vector moves every
/// entry after the new one, and a party that sends thousands of claims or attributes must not buy
/// quadratic work on a shard that serves everyone.
const LARGE_FROM: usize = 64;

/// A map kept as a `Vec` of entries sorted by key while small, as a `BTreeMap` once large.
#[derive(Clone)]
pub struct CompactMap<K, V> {
    repr: Repr<K, V>,
}

#[derive(Clone)]
enum Repr<K, V> {
    Small(Vec<(K, V)>),
    Large(BTreeMap<K, V>),
}

impl<K, V> Default for CompactMap<K, V> {
    fn default() -> Self {
        CompactMap {
            repr: Repr::Small(Vec::new()),
        }
    }
}

/// Either of two iterators over the same items (the two representations').
pub enum Both<A, B> {
    Small(A),
    Large(B),
}

impl<T, A: Iterator<Item = T>, B: Iterator<Item = T>> Iterator for Both<A, B> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match self {
            Both::Small(a) => a.next(),
            Both::Large(b) => b.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Both::Small(a) => a.size_hint(),
            Both::Large(b) => b.size_hint(),
        }
    }
}

impl<T, A, B> DoubleEndedIterator for Both<A, B>
where
    A: DoubleEndedIterator<Item = T>,
    B: DoubleEndedIterator<Item = T>,
{
    fn next_back(&mut self) -> Option<T> {
        match self {
            Both::Small(a) => a.next_back(),
            Both::Large(b) => b.next_back(),
        }
    }
}

impl<T, A: ExactSizeIterator<Item = T>, B: ExactSizeIterator<Item = T>> ExactSizeIterator
    for Both<A, B>
{
}

impl<K: Ord, V> CompactMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match &self.repr {
            Repr::Small(v) => find(v, key).ok().map(|i| &v[i].1),
            Repr::Large(m) => m.get(key),
        }
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match &mut self.repr {
            Repr::Small(v) => match find(v, key) {
                Ok(i) => Some(&mut v[i].1),
                Err(_) => None,
            },
            Repr::Large(m) => m.get_mut(key),
        }
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.grow_if_full();
        match &mut self.repr {
            Repr::Small(v) => match find(v, &key) {
                Ok(i) => Some(std::mem::replace(&mut v[i].1, value)),
                Err(i) => {
                    reserve_one(v);
                    v.insert(i, (key, value));
                    None
                }
            },
            Repr::Large(m) => m.insert(key, value),
        }
    }

    /// The value at `key`, inserted with `make` first if absent.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        self.grow_if_full();
        match &mut self.repr {
            Repr::Small(v) => {
                let i = match find(v, &key) {
                    Ok(i) => i,
                    Err(i) => {
                        reserve_one(v);
                        v.insert(i, (key, make()));
                        i
                    }
                };
                &mut v[i].1
            }
            Repr::Large(m) => m.entry(key).or_insert_with(make),
        }
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match &mut self.repr {
            Repr::Small(v) => {
                let i = find(v, key).ok()?;
                let (_, value) = v.remove(i);
                if v.is_empty() {
                    *v = Vec::new();
                }
                Some(value)
            }
            Repr::Large(m) => m.remove(key),
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        match &mut self.repr {
            Repr::Small(v) => {
                v.retain_mut(|(k, value)| keep(k, value));
                if v.len() <= EXACT_UP_TO {
                    v.shrink_to_fit();
                }
            }
            Repr::Large(m) => m.retain(|k, value| keep(k, value)),
        }
    }

    /// A small map about to pass [`LARGE_FROM`] becomes a `BTreeMap` (once: it stays one).
    fn grow_if_full(&mut self) {
        if let Repr::Small(v) = &mut self.repr {
            if v.len() >= LARGE_FROM {
                let entries = std::mem::take(v);
                self.repr = Repr::Large(entries.into_iter().collect());
            }
        }
    }
}

fn find<K, V, Q>(entries: &[(K, V)], key: &Q) -> Result<usize, usize>
where
    K: Borrow<Q>,
    Q: Ord + ?Sized,
{
    entries.binary_search_by(|(k, _)| k.borrow().cmp(key))
}

fn reserve_one<T>(entries: &mut Vec<T>) {
    if entries.len() < EXACT_UP_TO {
        entries.reserve_exact(1);
    }
}

impl<K, V> CompactMap<K, V> {
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Small(v) => v.len(),
            Repr::Large(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.repr = Repr::Small(Vec::new());
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + ExactSizeIterator {
        match &self.repr {
            Repr::Small(v) => Both::Small(v.iter().map(|(k, v)| (k, v))),
            Repr::Large(m) => Both::Large(m.iter()),
        }
    }

    pub fn iter_mut(
        &mut self,
    ) -> impl DoubleEndedIterator<Item = (&K, &mut V)> + ExactSizeIterator {
        match &mut self.repr {
            Repr::Small(v) => Both::Small(v.iter_mut().map(|(k, v)| (&*k, v))),
            Repr::Large(m) => Both::Large(m.iter_mut()),
        }
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + ExactSizeIterator {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> + ExactSizeIterator {
        self.iter_mut().map(|(_, v)| v)
    }
}

/// How a small map's entries are lent out as `(&K, &V)`.
type SmallIter<'a, K, V> =
    std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;

impl<'a, K, V> IntoIterator for &'a CompactMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Both<SmallIter<'a, K, V>, std::collections::btree_map::Iter<'a, K, V>>;

    fn into_iter(self) -> Self::IntoIter {
        match &self.repr {
            Repr::Small(v) => Both::Small(v.iter().map(|(k, v)| (k, v))),
            Repr::Large(m) => Both::Large(m.iter()),
        }
    }
}

impl<K: PartialEq, V: PartialEq> PartialEq for CompactMap<K, V> {
    /// Equal when they hold the same entries, whichever representation each is in.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
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
        if deduped.len() > LARGE_FROM {
            return CompactMap {
                repr: Repr::Large(deduped.into_iter().collect()),
            };
        }
        deduped.shrink_to_fit();
        CompactMap {
            repr: Repr::Small(deduped),
        }
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for CompactMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Serialize, V: Serialize> Serialize for CompactMap<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
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
                // Collected, then sorted once (a document's keys in any order cost n log n).
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

    /// Past its small size the map is a B-tree, with the same entries, order, JSON and equality:
    /// thousands of keys in descending order (each an insert at the front) stay cheap.
    #[test]
    fn a_large_map_becomes_a_btree_map_and_reads_the_same() {
        let mut compact = CompactMap::new();
        let mut btree = BTreeMap::new();
        for i in (0..5_000u32).rev() {
            compact.insert(format!("k{i:05}"), i);
            btree.insert(format!("k{i:05}"), i);
        }
        assert!(matches!(compact.repr, super::Repr::Large(_)));
        assert_eq!(compact.len(), 5_000);
        assert_eq!(compact.get("k00042"), Some(&42));
        assert_eq!(
            serde_json::to_string(&compact).unwrap(),
            serde_json::to_string(&btree).unwrap()
        );
        let small_then_large: CompactMap<String, u32> = btree.clone().into_iter().collect();
        assert_eq!(small_then_large, compact);
        compact.retain(|_, v| *v < 3);
        assert_eq!(compact.values().copied().collect::<Vec<_>>(), [0, 1, 2]);
    }

    /// A map of one entry holds one slot: the reason this type exists.
    #[test]
    fn a_small_map_allocates_only_what_it_holds() {
        let capacity = |m: &CompactMap<String, u64>| match &m.repr {
            super::Repr::Small(v) => v.capacity(),
            super::Repr::Large(_) => usize::MAX,
        };
        let mut m = CompactMap::new();
        m.insert("source".to_string(), 1u64);
        assert_eq!(capacity(&m), 1);
        m.insert("other".to_string(), 2);
        assert_eq!(capacity(&m), 2);
    }
}
