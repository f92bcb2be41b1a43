//! CRC32C arithmetic beyond checksumming bytes: the CRC of two adjacent
//! pieces from theirs, in a few dozen operations.
//!
//! A chunk version's CRC is combined from its blocks' CRCs on every write
//! (twice: the payload's and the version's) and on every whole-block read.
//! `crc32c::crc32c_combine` rebuilds its zero-shift operators by repeated
//! 32×32 matrix squaring on every call (tens of µs per 64 KiB block), which
//! made combining cost as much CPU as checksumming the bytes themselves.
//! Here the operator for 2^k zero bytes is built once per k, and a combine
//! applies one operator per set bit of the length (one for a whole block).
//!
//! Must not checksum bytes itself: `crc_fast::crc32_iscsi` does, everywhere
//! in r3fs, with the widest instructions the CPU has (AVX-512 carry-less
//! multiplies here: 2-3 times the `crc32c` crate's SSE4.2 rate from 4 KiB
//! up, measured on this machine). The `crc32c` crate stays as the test
//! oracle for [`combine`].

use std::sync::OnceLock;

/// Bits in a CRC32C: the dimension of the zero-shift operators.
const DIM: usize = 32;
/// One operator per bit of a `usize` length.
const POWERS: usize = usize::BITS as usize;
/// The CRC32C polynomial, reflected.
const POLY: u32 = 0x82F6_3B78;

/// A linear map on CRC states over GF(2): column `i` is the image of bit `i`.
type Operator = [u32; DIM];

/// `op · v` over GF(2).
fn apply(op: &Operator, mut v: u32) -> u32 {
    let mut sum = 0;
    let mut i = 0;
    while v != 0 {
        sum ^= op[i] & 0u32.wrapping_sub(v & 1);
        v >>= 1;
        i += 1;
    }
    sum
}

/// `op ∘ op`.
fn square(op: &Operator) -> Operator {
    std::array::from_fn(|i| apply(op, op[i]))
}

/// `ZERO_BYTES[k]` shifts a CRC state over 2^k zero bytes.
fn zero_bytes_operators() -> &'static [Operator; POWERS] {
    static OPS: OnceLock<[Operator; POWERS]> = OnceLock::new();
    OPS.get_or_init(|| {
        // One zero bit: the register shifts right, folding in the polynomial.
        let mut bit: Operator = [0; DIM];
        bit[0] = POLY;
        for (i, col) in bit.iter_mut().enumerate().skip(1) {
            *col = 1 << (i - 1);
        }
        let byte = square(&square(&square(&bit)));
        let mut ops = [[0; DIM]; POWERS];
        ops[0] = byte;
        for k in 1..POWERS {
            ops[k] = square(&ops[k - 1]);
        }
        ops
    })
}

/// The CRC32C of `a ++ b` from `crc_a = crc32c(a)`, `crc_b = crc32c(b)` and
/// `len_b = b.len()`. Same result as `crc32c::crc32c_combine`.
pub fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    let ops = zero_bytes_operators();
    let mut crc = crc_a;
    let mut len = len_b;
    let mut k = 0;
    while len != 0 {
        if len & 1 != 0 {
            crc = apply(&ops[k], crc);
        }
        len >>= 1;
        k += 1;
    }
    crc ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_the_crc_of_the_concatenation_at_block_sizes() {
        let bytes: Vec<u8> = (0..3 * 65_536u32).map(|i| (i * 31 + 7) as u8).collect();
        for split in [
            0,
            1,
            4095,
            4096,
            65_535,
            65_536,
            65_537,
            2 * 65_536,
            bytes.len(),
        ] {
            let (a, b) = bytes.split_at(split);
            assert_eq!(
                combine(crc_fast::crc32_iscsi(a), crc_fast::crc32_iscsi(b), b.len()),
                crc_fast::crc32_iscsi(&bytes),
                "split at {split}"
            );
        }
    }

    proptest! {
        #[test]
        fn agrees_with_the_crc32c_crate(crc_a: u32, crc_b: u32, len in 0usize..(1 << 40)) {
            prop_assert_eq!(combine(crc_a, crc_b, len), crc32c::crc32c_combine(crc_a, crc_b, len));
        }

        #[test]
        fn combines_random_pieces(a in proptest::collection::vec(any::<u8>(), 0..5000),
                                  b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(
                combine(crc_fast::crc32_iscsi(&a), crc_fast::crc32_iscsi(&b), b.len()),
                crc_fast::crc32_iscsi(&whole)
            );
        }
    }
}
