//! `key=value,key=value` option strings and the numbers and sizes in them.

use std::collections::BTreeMap;

use super::ConfigError;

/// `key=value` pairs of one option string, checked against the accepted keys.
pub(super) struct KeyValues {
    pub(super) flag: &'static str,
    pub(super) map: BTreeMap<String, String>,
}

impl KeyValues {
    pub(super) fn parse(
        flag: &'static str,
        s: &str,
        keys: &[&str],
        accepted: &'static str,
    ) -> Result<Self, ConfigError> {
        let mut map = BTreeMap::new();
        for part in s.split(',') {
            if part.is_empty() {
                return Err(ConfigError::Invalid {
                    flag,
                    reason: format!("empty option in '{s}' (accepted: {accepted})"),
                });
            }
            let (k, v) = part.split_once('=').ok_or_else(|| ConfigError::Invalid {
                flag,
                reason: format!("'{part}' is not key=value (accepted: {accepted})"),
            })?;
            if !keys.contains(&k) {
                return Err(ConfigError::UnknownKey {
                    flag,
                    key: k.to_string(),
                    accepted,
                });
            }
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(ConfigError::DuplicateKey {
                    flag,
                    key: k.to_string(),
                });
            }
        }
        Ok(Self { flag, map })
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    pub(super) fn invalid(&self, key: &str, value: &str, accepted: &'static str) -> ConfigError {
        ConfigError::InvalidValue {
            flag: self.flag,
            key: key.to_string(),
            value: value.to_string(),
            accepted,
        }
    }

    pub(super) fn on_off(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some("on") => Ok(true),
            Some("off") => Ok(false),
            Some(v) => Err(self.invalid(key, v, "on, off")),
        }
    }

    pub(super) fn number<T: TryFrom<u64>>(
        &self,
        key: &str,
        accepted: &'static str,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_u64(v)
                .and_then(|n| T::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(key, v, accepted)),
        }
    }
}

/// Parses a decimal or `0x` hexadecimal number.
pub(super) fn parse_u64(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Parses a size: bytes, or a number with a K, M, G or T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 10),
        'm' | 'M' => (&s[..s.len() - 1], 20),
        'g' | 'G' => (&s[..s.len() - 1], 30),
        't' | 'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = num.parse().ok()?;
    n.checked_mul(1u64 << shift)
}
