//! The one table of dtypes (item sizes, names, which ones are float weights) and the one zero
//! rule: an element is a zero when every bit but the sign bit is clear, so `-0.0` is a zero (it
//! comes back as `+0.0` from a pack/unpack round trip); NaN and every other value are kept bit
//! for bit.

pub use safetensors::tensor::Dtype;

use crate::error::Result;

/// The float dtypes that weights are stored in and that the codecs pack.
pub const FLOATS: [Dtype; 4] = [Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::F64];

/// Bytes per element of a dtype (sub-byte dtypes are refused by the callers that need this).
pub fn itemsize(dtype: Dtype) -> usize {
    dtype.bitsize().div_ceil(8)
}

/// The canonical string of a dtype, as written in safetensors headers ("F32", "BF16", ...).
pub fn name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

/// Parses a dtype string as written in safetensors headers.
pub fn parse(name: &str) -> Result<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| crate::Error::dtype(format!("unknown dtype {name:?}")))
}

/// True for the float dtypes that weights are stored in and that the codecs pack.
pub fn is_float(dtype: Dtype) -> bool {
    FLOATS.contains(&dtype)
}

/// Item size of a float dtype the codecs accept; any other dtype is a `Dtype` error.
pub fn float_itemsize(dtype: Dtype) -> Result<usize> {
    crate::ensure!(
        is_float(dtype),
        dtype,
        "dtype {dtype:?} cannot be packed (only F16, BF16, F32, F64)"
    );
    Ok(itemsize(dtype))
}

/// The magnitude bits of an `N`-byte little-endian float (sign cleared): 0 exactly for a zero
/// under the zero rule, and ordered like the magnitudes of the values (NaN above infinity).
#[inline(always)]
pub fn magnitude<const N: usize>(b: &[u8]) -> u64 {
    match N {
        1 => (b[0] & 0x7f) as u64,
        2 => (u16::from_le_bytes([b[0], b[1]]) & 0x7fff) as u64,
        4 => (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff) as u64,
        8 => u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) & (u64::MAX >> 1),
        _ => unreachable!("unsupported item size"),
    }
}

/// The zero rule on an element loaded as the unsigned word of its size (`u8`, `u16`, `u32`,
/// `u64`): for kernels that read whole aligned rows as words, which the compiler vectorises.
pub trait FloatBits: Copy + Send + Sync + 'static {
    /// Every bit but the sign bit.
    const MAGNITUDE: Self;
    /// True for a zero under the zero rule.
    fn is_zero(self) -> bool;
}

macro_rules! float_bits {
    ($($t:ty),*) => {
        $(impl FloatBits for $t {
            const MAGNITUDE: Self = <$t>::MAX >> 1;
            #[inline(always)]
            fn is_zero(self) -> bool {
                self & Self::MAGNITUDE == 0
            }
        })*
    };
}
float_bits!(u8, u16, u32, u64);

/// The zero rule for one little-endian element of any size.
#[inline]
pub fn is_zero(e: &[u8]) -> bool {
    match e.split_last() {
        Some((last, rest)) => last & 0x7f == 0 && rest.iter().all(|&b| b == 0),
        None => true,
    }
}

/// Calls `$f::<N>(args)` with `N` the item size `$n` (1, 2, 4 or 8).
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch_itemsize {
    ($n:expr, $f:ident ::<N>($($arg:expr),*)) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            4 => $f::<4>($($arg),*),
            8 => $f::<8>($($arg),*),
            other => unreachable!("item size {other}"),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_zero_rule() {
        assert_eq!(itemsize(Dtype::BF16), 2);
        assert_eq!(name(Dtype::F32), "F32");
        assert_eq!(parse("BF16").unwrap(), Dtype::BF16);
        assert!(parse("F33").is_err());
        assert!(float_itemsize(Dtype::I64).is_err());
        for (b, zero) in [
            (&[0u8, 0x80][..], true),
            (&[0, 0][..], true),
            (&[1, 0x80][..], false),
            (&[0, 0, 0xc0, 0x7f][..], false),
        ] {
            assert_eq!(is_zero(b), zero, "{b:?}");
            let m = if b.len() == 2 {
                magnitude::<2>(b)
            } else {
                magnitude::<4>(b)
            };
            assert_eq!(m == 0, zero);
            let word = if b.len() == 2 {
                u16::from_le_bytes([b[0], b[1]]).is_zero()
            } else {
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_zero()
            };
            assert_eq!(word, zero);
        }
        assert!(0x80u8.is_zero() && !0x01u8.is_zero());
        assert!((1u64 << 63).is_zero() && !(1u64 << 62).is_zero());
    }
}
