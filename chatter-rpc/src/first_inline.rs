//! [`FirstInline`]: a hash map that keeps one entry inline, for the per-connection maps
//! that hold at most one entry in the common case (the calls a short-lived client waits
//! for, the objects a server's peer hosts).

use std::borrow::Borrow;
use std::collections::hash_map::{self, HashMap, RandomState};
use std::hash::{BuildHasher, Hash};

/// A map whose first entry lives inline; the others go to a `HashMap`, which allocates
/// its table only when a second entry arrives while the first is held.
///
/// A `HashMap` allocates on its first insert, and a map made per connection that only
/// ever holds one entry (one call, one object) paid that allocation and its free, plus
/// the table's set-up, on every connection. Here, that entry costs nothing beyond the map
/// itself.
///
/// A key is in at most one of the two places. The inline slot is filled only when no
/// entry is in the map (so that a key's lookup needs no probe of the map while the map is
/// empty, which is the common case); an emptied slot stays empty until the map is empty
/// too. Iteration order is unspecified, as a `HashMap`'s.
pub(crate) struct FirstInline<K, V, S = RandomState> {
    first: Option<(K, V)>,
    rest: HashMap<K, V, S>,
}

impl<K, V, S: Default> Default for FirstInline<K, V, S> {
    fn default() -> Self {
        FirstInline {
            first: None,
            rest: HashMap::default(),
        }
    }
}

impl<K: Eq + Hash, V, S: BuildHasher> FirstInline<K, V, S> {
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match &self.first {
            Some((k, v)) if k.borrow() == key => Some(v),
            _ if self.rest.is_empty() => None,
            _ => self.rest.get(key),
        }
    }

    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Inserts `value` under `key`, returning the value it replaces.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.entry(key) {
            Entry::Occupied(mut entry) => Some(std::mem::replace(entry.get_mut(), value)),
            Entry::Vacant(entry) => {
                entry.insert(value);
                None
            }
        }
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match &self.first {
            Some((k, _)) if k.borrow() == key => self.first.take().map(|(_, v)| v),
            _ if self.rest.is_empty() => None,
            _ => self.rest.remove(key),
        }
    }

    pub(crate) fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
    }

    /// Keeps the entries for which `keep` returns true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        if let Some((k, v)) = &mut self.first {
            if !keep(k, v) {
                self.first = None;
            }
        }
        if !self.rest.is_empty() {
            self.rest.retain(keep);
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.first
            .iter()
            .map(|(k, v)| (k, v))
            .chain(self.rest.iter())
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    /// The entry of `key`, as `HashMap::entry` (which allocates the table even for a
    /// lookup that finds nothing; this does not while the map is empty).
    pub(crate) fn entry(&mut self, key: K) -> Entry<'_, K, V> {
        let FirstInline { first, rest } = self;
        if matches!(first, Some((k, _)) if *k == key) {
            return Entry::Occupied(OccupiedEntry::First(first));
        }
        if first.is_none() && rest.is_empty() {
            return Entry::Vacant(VacantEntry::First(first, key));
        }
        match rest.entry(key) {
            hash_map::Entry::Occupied(entry) => Entry::Occupied(OccupiedEntry::Rest(entry)),
            hash_map::Entry::Vacant(entry) => Entry::Vacant(VacantEntry::Rest(entry)),
        }
    }
}

/// A key's place in a [`FirstInline`], as `hash_map::Entry`.
pub(crate) enum Entry<'a, K, V> {
    Occupied(OccupiedEntry<'a, K, V>),
    Vacant(VacantEntry<'a, K, V>),
}

/// An entry that is there: inline (the slot is `Some`) or in the map.
pub(crate) enum OccupiedEntry<'a, K, V> {
    First(&'a mut Option<(K, V)>),
    Rest(hash_map::OccupiedEntry<'a, K, V>),
}

impl<K, V> OccupiedEntry<'_, K, V> {
    pub(crate) fn get(&self) -> &V {
        match self {
            OccupiedEntry::First(Some((_, v))) => v,
            OccupiedEntry::First(None) => unreachable!("an occupied inline slot"),
            OccupiedEntry::Rest(entry) => entry.get(),
        }
    }

    pub(crate) fn get_mut(&mut self) -> &mut V {
        match self {
            OccupiedEntry::First(Some((_, v))) => v,
            OccupiedEntry::First(None) => unreachable!("an occupied inline slot"),
            OccupiedEntry::Rest(entry) => entry.get_mut(),
        }
    }

    pub(crate) fn remove(self) -> V {
        match self {
            OccupiedEntry::First(slot) => match slot.take() {
                Some((_, v)) => v,
                None => unreachable!("an occupied inline slot"),
            },
            OccupiedEntry::Rest(entry) => entry.remove(),
        }
    }
}

/// A key that is not there, and where it will go: inline (the slot is `None` and the map
/// empty) or in the map.
pub(crate) enum VacantEntry<'a, K, V> {
    First(&'a mut Option<(K, V)>, K),
    Rest(hash_map::VacantEntry<'a, K, V>),
}

impl<'a, K, V> VacantEntry<'a, K, V> {
    pub(crate) fn insert(self, value: V) -> &'a mut V {
        match self {
            VacantEntry::First(slot, key) => &mut slot.insert((key, value)).1,
            VacantEntry::Rest(entry) => entry.insert(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks `map` against `model` by every key in `0..8`.
    fn same(map: &FirstInline<u8, u32>, model: &HashMap<u8, u32>) {
        assert_eq!(map.len(), model.len());
        assert_eq!(map.is_empty(), model.is_empty());
        for k in 0..8 {
            assert_eq!(map.get(&k), model.get(&k), "key {k}");
        }
        let mut listed: Vec<_> = map.iter().map(|(k, v)| (*k, *v)).collect();
        listed.sort_unstable();
        let mut expected: Vec<_> = model.iter().map(|(k, v)| (*k, *v)).collect();
        expected.sort_unstable();
        assert_eq!(listed, expected);
    }

    #[test]
    fn one_entry_stays_inline_and_the_map_stays_unallocated() {
        let mut map = FirstInline::<u8, u32>::default();
        assert_eq!(map.insert(1, 10), None);
        assert_eq!(map.insert(1, 11), Some(10));
        assert_eq!(map.get(&1), Some(&11));
        assert_eq!(map.remove(&1), Some(11));
        assert!(matches!(
            map.entry(2),
            Entry::Vacant(VacantEntry::First(..))
        ));
        assert_eq!(map.insert(2, 20), None);
        assert!(map.contains_key(&2));
        assert_eq!(map.rest.capacity(), 0, "one entry at a time: no table");
        // A second entry while the first is held goes to the map.
        assert!(matches!(map.entry(3), Entry::Vacant(VacantEntry::Rest(_))));
    }

    #[test]
    fn a_key_in_the_map_is_found_and_replaced_there_after_the_inline_slot_emptied() {
        let mut map = FirstInline::<u8, u32>::default();
        map.insert(1, 10);
        map.insert(2, 20);
        assert_eq!(map.remove(&1), Some(10));
        // The slot is empty but the map is not: 2 must not get a second place inline.
        assert_eq!(map.insert(2, 21), Some(20));
        assert_eq!(map.len(), 1);
        map.insert(3, 30);
        assert!(
            map.first.is_none(),
            "the slot fills only once the map is empty"
        );
        assert_eq!(map.remove(&2), Some(21));
        assert_eq!(map.remove(&3), Some(30));
        assert!(map.is_empty());
        map.insert(4, 40);
        assert!(map.first.is_some());
    }

    #[test]
    fn behaves_as_a_hash_map_under_every_operation() {
        // A fixed pseudo-random sequence of operations on keys 0..8, checked against a
        // `HashMap` after each one.
        let mut map = FirstInline::<u8, u32>::default();
        let mut model = HashMap::new();
        let mut x: u32 = 0x2545_f491;
        for step in 0..4000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let key = (x % 8) as u8;
            match (x >> 8) % 7 {
                0 | 1 => assert_eq!(map.insert(key, step), model.insert(key, step)),
                2 => assert_eq!(map.remove(&key), model.remove(&key)),
                3 => match (map.entry(key), model.entry(key)) {
                    (Entry::Occupied(mut a), hash_map::Entry::Occupied(mut b)) => {
                        assert_eq!(a.get(), b.get());
                        if step % 2 == 0 {
                            *a.get_mut() += 1;
                            *b.get_mut() += 1;
                        } else {
                            assert_eq!(a.remove(), b.remove());
                        }
                    }
                    (Entry::Vacant(a), hash_map::Entry::Vacant(b)) => {
                        assert_eq!(*a.insert(step), *b.insert(step));
                    }
                    _ => panic!("entry of {key} differs at step {step}"),
                },
                4 => {
                    let keep = |k: &u8, v: &mut u32| {
                        *v += 1;
                        (u32::from(*k) + step) % 3 != 0
                    };
                    map.retain(keep);
                    model.retain(keep);
                }
                5 if step % 50 == 0 => {
                    map.clear();
                    model.clear();
                }
                _ => assert_eq!(map.contains_key(&key), model.contains_key(&key)),
            }
            same(&map, &model);
        }
    }
}
