//! Byte sizes as people write them: `"500M"`, `"1.5G"`, `"512m"`, `"1GiB"`, `"4096"`.
//!
//! Every multiple is binary (K = 1024), as in Flocker and Docker's `mem_limit`; an optional
//! `B` or `iB` after the unit is accepted. A fractional result is rounded down to whole bytes.
//! Zero and negative sizes are errors: a zero quota or memory limit is never what was meant.

/// Why a size string was refused. The text is phrased to follow "maximum_size: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("expected a size such as \"500M\" or \"1.5G\" (units K, M, G, T, binary), found {0:?}")]
    NotASize(String),
    #[error("the size must be positive, found {0:?}")]
    Negative(String),
    #[error("the size must be more than zero, found {0:?}")]
    Zero(String),
    #[error("the size {0:?} is too large")]
    TooLarge(String),
}

/// Parses a size string into bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(SizeError::Negative(text.to_owned()));
    }
    let number_end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(number_end);
    let multiplier: u128 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(SizeError::NotASize(text.to_owned())),
    };
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
        return Err(SizeError::NotASize(text.to_owned()));
    }
    // Exact decimal arithmetic: mantissa * multiplier / 10^digits, so "1.5G" is exact.
    if int_part.len() + frac_part.len() > 30 {
        return Err(SizeError::TooLarge(text.to_owned()));
    }
    let digits = format!("{int_part}{frac_part}");
    let mantissa: u128 = digits
        .parse()
        .map_err(|_| SizeError::NotASize(text.to_owned()))?;
    let scale = 10u128.pow(u32::try_from(frac_part.len()).unwrap_or(u32::MAX).min(30));
    let bytes = mantissa
        .checked_mul(multiplier)
        .ok_or_else(|| SizeError::TooLarge(text.to_owned()))?
        / scale;
    if bytes == 0 {
        return Err(SizeError::Zero(text.to_owned()));
    }
    u64::try_from(bytes).map_err(|_| SizeError::TooLarge(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_units() {
        assert_eq!(parse_size("500M"), Ok(500 * 1024 * 1024));
        assert_eq!(parse_size("1.5G"), Ok(3 * 512 * 1024 * 1024));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2 T"), Ok(2 << 40));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.0005K"), Ok(1024));
    }

    #[test]
    fn refusals() {
        assert_eq!(parse_size("-1G"), Err(SizeError::Negative("-1G".into())));
        assert_eq!(parse_size("0"), Err(SizeError::Zero("0".into())));
        assert_eq!(
            parse_size("0.0001K"),
            Err(SizeError::Zero("0.0001K".into()))
        );
        assert_eq!(parse_size("lots"), Err(SizeError::NotASize("lots".into())));
        assert_eq!(
            parse_size("1.2.3G"),
            Err(SizeError::NotASize("1.2.3G".into()))
        );
        assert_eq!(parse_size("G"), Err(SizeError::NotASize("G".into())));
        assert_eq!(parse_size("5X"), Err(SizeError::NotASize("5X".into())));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::TooLarge(_))
        ));
    }
}
