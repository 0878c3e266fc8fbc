//! The latency sketch of golden-metric windows: a DDSketch of milliseconds with 2% relative
//! accuracy, sent in DDSketch's standard binary encoding. Proxies fill it, the control plane
//! merges it across proxies and windows; both must build it with the same parameters or
//! the merge is refused, so both build it here.

use sketches_ddsketch::Config;
pub use sketches_ddsketch::DDSketch;

/// Relative accuracy of every quantile read from a sketch.
pub const RELATIVE_ACCURACY: f64 = 0.02;
/// DDSketch's default bin limit and minimum, which its decoder assumes.
const MAX_BINS: u32 = 2048;
const MIN_VALUE: f64 = 1.0e-9;
/// A sketch of a 10 s window is a few hundred bytes; more is not one of ours.
pub const MAX_ENCODED_BYTES: usize = 64 * 1024;

pub fn new_sketch() -> DDSketch {
    DDSketch::new(Config::new(RELATIVE_ACCURACY, MAX_BINS, MIN_VALUE))
}

pub fn encode(sketch: &DDSketch) -> Vec<u8> {
    sketch.to_java_bytes()
}

/// Decodes a sketch another process sent; `None` if it is not a sketch with our parameters.
/// The decoder indexes its bins by what the bytes say, so bytes from elsewhere could make
/// it panic: that stays inside this call.
pub fn decode(bytes: &[u8]) -> Option<DDSketch> {
    if bytes.is_empty() || bytes.len() > MAX_ENCODED_BYTES {
        return None;
    }
    let decoded = std::panic::catch_unwind(|| DDSketch::from_java_bytes(bytes))
        .ok()?
        .ok()?;
    // A merge with another sketch fails unless the parameters match: check them once here.
    let mut probe = new_sketch();
    probe.merge(&decoded).ok()?;
    Some(probe)
}

/// Merges `other` into `into` (both built by [`new_sketch`] or [`decode`]).
pub fn merge(into: &mut DDSketch, other: &DDSketch) {
    // Same parameters by construction; a refused merge loses only this sketch's samples.
    let _ = into.merge(other);
}

/// The `q` quantile (0..=1) in milliseconds; `None` when the sketch is empty.
pub fn quantile(sketch: &DDSketch, q: f64) -> Option<f64> {
    sketch.quantile(q).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sketch_survives_encoding_and_merges_with_a_fresh_one() {
        let mut a = new_sketch();
        for ms in 1..=100 {
            a.add(ms as f64);
        }
        let mut b = decode(&encode(&a)).expect("decodes");
        assert_eq!(b.count(), 100);
        merge(&mut b, &a);
        assert_eq!(b.count(), 200);
        let p99 = quantile(&b, 0.99).expect("not empty");
        assert!((p99 - 99.0).abs() <= 99.0 * 0.03, "{p99}");
    }

    #[test]
    fn garbage_is_not_a_sketch() {
        assert!(decode(b"").is_none());
        assert!(decode(&[0xff; 40]).is_none());
        // another accuracy's sketch does not merge with ours
        let other = DDSketch::new(Config::new(0.05, MAX_BINS, MIN_VALUE));
        let mut other = other;
        other.add(3.0);
        assert!(decode(&other.to_java_bytes()).is_none());
    }
}
