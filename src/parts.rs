//! Cutting a sequence into parts of a bounded size, in one pass, each part allocated at its own
//! size: a checkpoint's rows into store transactions, a source's batch into shard batches, the
//! contexts due for retention into shard messages, delivery's restart backlog into signing
//! batches. (Splitting the rest off the front again and again copied the remainder each time and
//! left every part holding the capacity of all that followed it: a 100 000-context checkpoint took
//! gigabytes.)

/// The items of `items`, in order, in parts of at most `size` items (at least one) each.
pub fn in_parts<I: IntoIterator>(items: I, size: usize) -> impl Iterator<Item = Vec<I::Item>> {
    let size = size.max(1);
    let mut items = items.into_iter();
    std::iter::from_fn(move || {
        let part: Vec<I::Item> = items.by_ref().take(size).collect();
        (!part.is_empty()).then_some(part)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_the_order_and_hold_only_their_own_items() {
        let parts: Vec<Vec<u32>> = in_parts(0..10u32, 4).collect();
        assert_eq!(parts, [vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
        for part in in_parts((0..1000u32).collect::<Vec<_>>(), 256) {
            assert!(part.capacity() <= 256, "a part of {}", part.capacity());
        }
        assert_eq!(in_parts(Vec::<u8>::new(), 3).count(), 0);
        // A size of zero is taken as one, never as "no parts" or an endless loop.
        assert_eq!(in_parts([1, 2], 0).count(), 2);
    }
}
