//! PCI addresses: segment, bus, device (slot) and function.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// A PCI function address, printed as `ssss:bb:dd.f`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciBdf {
    segment: u16,
    bus: u8,
    device: u8,
    function: u8,
}

/// A malformed PCI address.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BdfError {
    /// Device above 31 or function above 7.
    #[error("PCI address {segment:04x}:{bus:02x}:{device:02x}.{function} is out of range")]
    OutOfRange {
        /// Segment.
        segment: u16,
        /// Bus.
        bus: u8,
        /// Device (slot).
        device: u8,
        /// Function.
        function: u8,
    },
    /// The text is not `[ssss:]bb:dd.f` in hexadecimal.
    #[error("Cannot parse PCI address {0:?}: expected [ssss:]bb:dd.f")]
    Parse(String),
}

impl PciBdf {
    /// A function address; `device` must be below 32 and `function` below 8.
    pub fn new(segment: u16, bus: u8, device: u8, function: u8) -> Result<Self, BdfError> {
        if device > 31 || function > 7 {
            return Err(BdfError::OutOfRange {
                segment,
                bus,
                device,
                function,
            });
        }
        Ok(Self {
            segment,
            bus,
            device,
            function,
        })
    }

    /// Function 0 of `slot` (taken modulo 32) on bus 0 of `segment`.
    pub fn root_slot(segment: u16, slot: u8) -> Self {
        Self {
            segment,
            bus: 0,
            device: slot & 0x1f,
            function: 0,
        }
    }

    /// The PCI segment (domain).
    pub fn segment(&self) -> u16 {
        self.segment
    }

    /// The bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }

    /// The device (slot) number, 0..=31.
    pub fn device(&self) -> u8 {
        self.device
    }

    /// The function number, 0..=7.
    pub fn function(&self) -> u8 {
        self.function
    }

    /// The 16-bit requester ID `bus << 8 | device << 3 | function`.
    pub fn rid(&self) -> u16 {
        (u16::from(self.bus) << 8) | (u16::from(self.device) << 3) | u16::from(self.function)
    }
}

impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciBdf {
    type Err = BdfError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BdfError::Parse(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let (segment, bus, rest) = match parts.as_slice() {
            [seg, bus, rest] => (
                u16::from_str_radix(seg, 16).map_err(|_| bad())?,
                *bus,
                *rest,
            ),
            [bus, rest] => (0, *bus, *rest),
            _ => return Err(bad()),
        };
        let bus = u8::from_str_radix(bus, 16).map_err(|_| bad())?;
        let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
        let device = u8::from_str_radix(dev, 16).map_err(|_| bad())?;
        let function = u8::from_str_radix(func, 16).map_err(|_| bad())?;
        Self::new(segment, bus, device, function)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn parse_and_print() {
        let b: PciBdf = "0000:00:03.0".parse().unwrap();
        assert_eq!(
            (b.segment(), b.bus(), b.device(), b.function()),
            (0, 0, 3, 0)
        );
        assert_eq!(b.to_string(), "0000:00:03.0");
        let b: PciBdf = "01:1f.7".parse().unwrap();
        assert_eq!(b.rid(), 0x01ff);
        assert!("00:20.0".parse::<PciBdf>().is_err());
        assert!("00:03".parse::<PciBdf>().is_err());
        assert!("zz:03.0".parse::<PciBdf>().is_err());
    }
}
