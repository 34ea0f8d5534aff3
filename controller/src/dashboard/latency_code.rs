//! Latency quantiles as the dashboard's series keeps them: rounded to 4 significant digits
//! (`m × 10^e`, `m` in 1000..=9999) and numbered in the order of their values, so that nearby
//! values have nearby codes and a point stores its difference from the previous point's code
//! as a short varint (2 bytes instead of an `f32`'s 4 for quantiles that move within a few
//! milliseconds).
//!
//! Read back, a code is the `f64` nearest to its decimal (`12.35`, not `12.350000381`). What
//! is kept: none (NaN) and ±infinity exactly; magnitudes from 1 ns (`1.000e-6` ms) to
//! `9.999e12` ms to 4 significant digits, with their sign. What is not: magnitudes under
//! `0.99995e-6` ms read as 0 (and -0.0 as 0.0), from `9.9995e12` ms up as ±infinity.

/// Decimal exponents of the kept magnitudes: `1000 × 10^-9` to `9999 × 10^9` ms.
const EXPONENT_MIN: i32 = -9;
const EXPONENT_MAX: i32 = 9;
const MANTISSA_MIN: i32 = 1_000;
const MANTISSAS: i32 = 9_000;
/// The code of the largest kept magnitude.
const LARGEST: i32 = (EXPONENT_MAX - EXPONENT_MIN + 1) * MANTISSAS;
/// The code of +infinity (its negation is -infinity's).
pub const INFINITY: i32 = LARGEST + 1;
/// The code of no value (no requests, or NaN).
pub const NONE: i32 = LARGEST + 2;

/// Exact powers of ten for the exponents in range and one beyond either end.
const POWERS_OF_TEN: [f64; 12] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11];

/// The code of a latency in ms (see the module's documentation for what is rounded).
pub fn encode(value: Option<f64>) -> i32 {
    match value {
        Some(value) if !value.is_nan() => {
            let magnitude = magnitude_code(value.abs());
            if value < 0.0 {
                -magnitude
            } else {
                magnitude
            }
        }
        _ => NONE,
    }
}

/// The value of a code; `None` for [`NONE`] and for a number that is no code.
pub fn decode(code: i32) -> Option<f64> {
    if code == NONE || code.unsigned_abs() > INFINITY.unsigned_abs() {
        return None;
    }
    let magnitude = match code.abs() {
        0 => 0.0,
        INFINITY => f64::INFINITY,
        positive => {
            let index = positive - 1;
            let mantissa = f64::from(MANTISSA_MIN + index % MANTISSAS);
            scale(mantissa, index / MANTISSAS + EXPONENT_MIN)
        }
    };
    Some(if code < 0 { -magnitude } else { magnitude })
}

/// A number read from stored bytes as a code, if it is one.
pub fn checked(number: i64) -> Option<i32> {
    let code = i32::try_from(number).ok()?;
    (code == NONE || code.unsigned_abs() <= INFINITY.unsigned_abs()).then_some(code)
}

fn magnitude_code(magnitude: f64) -> i32 {
    if magnitude == f64::INFINITY {
        return INFINITY;
    }
    if magnitude == 0.0 {
        return 0;
    }
    // `log10` may be off by one next to a power of ten: the mantissa's range corrects it.
    let mut exponent = (magnitude.log10().floor() as i32).saturating_sub(3);
    if exponent > EXPONENT_MAX + 1 {
        return INFINITY;
    }
    if exponent < EXPONENT_MIN - 1 {
        return 0;
    }
    let mut scaled = scale(magnitude, -exponent);
    if scaled < 999.5 {
        exponent -= 1;
        scaled = scale(magnitude, -exponent);
    } else if scaled >= 9_999.5 {
        exponent += 1;
        scaled = scale(magnitude, -exponent);
    }
    if exponent > EXPONENT_MAX {
        return INFINITY;
    }
    if exponent < EXPONENT_MIN {
        return 0;
    }
    let mantissa = (scaled.round() as i32).clamp(MANTISSA_MIN, MANTISSA_MIN + MANTISSAS - 1);
    1 + (exponent - EXPONENT_MIN) * MANTISSAS + (mantissa - MANTISSA_MIN)
}

/// `value × 10^power` with one rounding (`power` within ±11).
fn scale(value: f64, power: i32) -> f64 {
    let factor = POWERS_OF_TEN[power.unsigned_abs() as usize];
    if power >= 0 {
        value * factor
    } else {
        value / factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(value: f64) -> Option<f64> {
        decode(encode(Some(value)))
    }

    #[test]
    fn edge_values_read_back_as_documented() {
        let table: [(f64, Option<f64>); 26] = [
            (f64::NAN, None),
            (-f64::NAN, None),
            (f64::INFINITY, Some(f64::INFINITY)),
            (f64::NEG_INFINITY, Some(f64::NEG_INFINITY)),
            (0.0, Some(0.0)),
            (-0.0, Some(0.0)),
            (f64::from_bits(1), Some(0.0)), // the smallest subnormal
            (f64::MIN_POSITIVE, Some(0.0)),
            (0.9999e-6, Some(0.0)),
            (0.99996e-6, Some(1e-6)),
            (-0.99996e-6, Some(-1e-6)),
            (1e-6, Some(1e-6)),
            (9.999e12, Some(9.999e12)),
            (9.9994e12, Some(9.999e12)),
            (9.9996e12, Some(f64::INFINITY)),
            (-9.9996e12, Some(f64::NEG_INFINITY)),
            (f64::MAX, Some(f64::INFINITY)),
            (f64::MIN, Some(f64::NEG_INFINITY)),
            (100.0, Some(100.0)),
            (98.36066, Some(98.36)),
            (12.345678, Some(12.35)),
            (9.99951, Some(10.0)),
            (0.5, Some(0.5)),
            (0.123456, Some(0.1235)),
            (-3.75, Some(-3.75)),
            (1234567.0, Some(1235000.0)),
        ];
        for (value, expected) in table {
            let read = round_trip(value);
            assert_eq!(
                read.map(f64::to_bits),
                expected.map(f64::to_bits),
                "{value:e} read as {read:?}"
            );
        }
        assert_eq!(decode(encode(None)), None);
        assert_eq!(encode(None), NONE);
    }

    /// SplitMix64.
    fn random_values(count: usize) -> Vec<f64> {
        let mut state = 7_u64;
        (0..count)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                // Magnitudes spread over 1e-6 .. 1e12 ms, either sign.
                let exponent = (z % 18) as i32 - 6;
                let fraction = (z >> 8) as f64 / (1u64 << 56) as f64;
                let value = (1.0 + 9.0 * fraction) * 10f64.powi(exponent);
                if z & 1 == 1 {
                    -value
                } else {
                    value
                }
            })
            .collect()
    }

    #[test]
    fn kept_values_have_four_significant_digits_and_the_nearest() {
        for value in random_values(20_000) {
            let read = round_trip(value).unwrap_or(f64::NAN);
            // The read value is a 4-digit decimal…
            let four_digits: f64 = format!("{read:.3e}").parse().unwrap();
            assert_eq!(read, four_digits, "{value:e} read as {read:e}");
            // …within half a unit of its last digit of the value.
            let unit = 10f64.powi(read.abs().log10().floor() as i32 - 3);
            assert!(
                (read - value).abs() <= 0.5 * unit * (1.0 + 1e-9),
                "{value:e} read as {read:e}"
            );
        }
    }

    #[test]
    fn codes_grow_with_the_values() {
        let mut values = random_values(20_000);
        values.extend([
            0.0,
            1e-9,
            -1e-9,
            1e13,
            -1e13,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ]);
        values.sort_by(f64::total_cmp);
        let codes: Vec<i32> = values.iter().map(|v| encode(Some(*v))).collect();
        assert!(codes.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(codes.first(), Some(&-INFINITY));
        assert_eq!(codes.last(), Some(&INFINITY));
    }

    #[test]
    fn every_code_decodes_and_encodes_to_itself() {
        for code in (-INFINITY..=INFINITY).chain([NONE]) {
            assert_eq!(checked(i64::from(code)), Some(code));
            let value = decode(code);
            assert_eq!(encode(value), code, "{value:?}");
        }
        for number in [NONE + 1, -NONE, -INFINITY - 1, i32::MIN, i32::MAX] {
            assert_eq!(checked(i64::from(number)), None);
            assert_eq!(decode(number), None);
        }
        assert_eq!(checked(i64::MIN), None);
        assert_eq!(checked(i64::MAX), None);
    }
}
