//! Which partition of the signals topic a principal belongs to: Kafka's default partitioner
//! (murmur2 of the key, made positive, modulo the partition count — what the Java client and
//! librdkafka's `murmur2` partitioner compute), so a producer outside Vigil that keys a message by
//! the principal's key lands on the same partition, and the mapping is the same on every instance
//! and every release. It changes only if the topic's partition count does: ownership is fixed by
//! the count the topic was created with.

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`): 32-bit, seed `0x9747b28c`.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    // Java's `int` length: keys are short; a longer one only wraps, as Java's would.
    let mut h: u32 = 0x9747_b28c ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of `key` among `partitions` (at least 1).
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    let n = partitions.max(1) as u32;
    ((murmur2(key.as_bytes()) & 0x7fff_ffff) % n) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values Kafka's own test suite (`UtilsTest.testMurmur2`) pins for its Java
    /// implementation, as signed 32-bit integers.
    #[test]
    fn murmur2_matches_kafkas_reference_values() {
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key.as_bytes()) as i32, want, "{key}");
        }
    }

    #[test]
    fn every_key_has_a_partition_in_range() {
        for n in [1, 2, 3, 12, 1000] {
            for i in 0..500 {
                let p = partition_of(&format!("email:user{i}@example.com"), n);
                assert!((0..n).contains(&p));
            }
        }
        assert_eq!(
            partition_of("anything", 0),
            0,
            "a count below 1 is read as 1"
        );
    }
}
