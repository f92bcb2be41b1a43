//! The size and range checks every backend applies before it accepts a
//! mutation, so all engines refuse the same input with the same error.

use crate::{KvError, KEY_BYTES_MAX, TRANSACTION_BYTES_MAX, VALUE_BYTES_MAX};

pub fn check_key(key: &[u8]) -> Result<(), KvError> {
    if key.len() > KEY_BYTES_MAX {
        return Err(KvError::KeyTooLarge {
            len: key.len(),
            max: KEY_BYTES_MAX,
        });
    }
    Ok(())
}

pub fn check_value(value: &[u8]) -> Result<(), KvError> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(KvError::ValueTooLarge {
            len: value.len(),
            max: VALUE_BYTES_MAX,
        });
    }
    Ok(())
}

pub fn check_range(begin: &[u8], end: &[u8]) -> Result<(), KvError> {
    if begin > end {
        return Err(KvError::InvalidRange);
    }
    Ok(())
}

/// Bytes of keys and values one transaction has written, against
/// [`TRANSACTION_BYTES_MAX`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteBudget {
    used: usize,
}

impl WriteBudget {
    /// Counts `bytes` more, or refuses (counting nothing) past the limit.
    pub fn charge(&mut self, bytes: usize) -> Result<(), KvError> {
        let total = self.used.saturating_add(bytes);
        if total > TRANSACTION_BYTES_MAX {
            return Err(KvError::TransactionTooLarge {
                len: total,
                max: TRANSACTION_BYTES_MAX,
            });
        }
        self.used = total;
        Ok(())
    }

    pub fn used(&self) -> usize {
        self.used
    }

    /// Checks a `set` and counts its bytes.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        check_key(key)?;
        check_value(value)?;
        self.charge(key.len() + value.len())
    }

    /// Checks a `clear` (or an atomic op's key) and counts its bytes.
    pub fn clear(&mut self, key: &[u8]) -> Result<(), KvError> {
        check_key(key)?;
        self.charge(key.len())
    }

    /// Checks a `clear_range` and counts its bytes.
    pub fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        check_range(begin, end)?;
        self.charge(begin.len() + end.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_past_the_limit_without_counting() {
        let mut b = WriteBudget::default();
        b.charge(TRANSACTION_BYTES_MAX - 1).unwrap();
        assert!(matches!(
            b.charge(2),
            Err(KvError::TransactionTooLarge { .. })
        ));
        assert_eq!(b.used(), TRANSACTION_BYTES_MAX - 1);
        b.charge(1).unwrap();
    }

    #[test]
    fn checks_name_the_limit() {
        assert!(check_key(&vec![0; KEY_BYTES_MAX]).is_ok());
        assert!(matches!(
            check_key(&vec![0; KEY_BYTES_MAX + 1]),
            Err(KvError::KeyTooLarge { .. })
        ));
        assert!(matches!(
            check_value(&vec![0; VALUE_BYTES_MAX + 1]),
            Err(KvError::ValueTooLarge { .. })
        ));
        assert_eq!(check_range(b"b", b"a"), Err(KvError::InvalidRange));
        assert!(check_range(b"a", b"a").is_ok());
    }
}
