//! Removals waiting for the guest: `vm.remove-device` asked the guest to eject a slot, and the
//! reply waits for the eject (or for [`EJECT_TIMEOUT`](super::EJECT_TIMEOUT)).

use std::time::{Duration, Instant};

use api::Responder;

/// One device the guest was asked to release.
#[derive(Debug)]
pub struct PendingRemoval {
    /// Device id.
    pub id: String,
    /// Its PCI slot.
    pub slot: u8,
    /// The `vm.remove-device` reply, sent once the device is gone.
    pub reply: Responder<()>,
    /// When to stop waiting for the guest.
    pub deadline: Instant,
}

/// The removals waiting for the guest, at most one per device.
#[derive(Debug, Default)]
pub struct PendingRemovals {
    list: Vec<PendingRemoval>,
}

impl PendingRemovals {
    /// Whether a removal of `id` is waiting.
    pub fn contains(&self, id: &str) -> bool {
        self.list.iter().any(|p| p.id == id)
    }

    /// The slot of the waiting removal of `id`.
    pub fn slot_of(&self, id: &str) -> Option<u8> {
        self.list.iter().find(|p| p.id == id).map(|p| p.slot)
    }

    /// Adds one (the caller checked [`Self::contains`]).
    pub fn push(&mut self, p: PendingRemoval) {
        self.list.push(p);
    }

    /// Takes the removal waiting on `slot`.
    pub fn take_slot(&mut self, slot: u8) -> Option<PendingRemoval> {
        let i = self.list.iter().position(|p| p.slot == slot)?;
        Some(self.list.remove(i))
    }

    /// Takes every removal whose deadline has passed at `now`.
    pub fn take_expired(&mut self, now: Instant) -> Vec<PendingRemoval> {
        let (expired, waiting) = std::mem::take(&mut self.list)
            .into_iter()
            .partition(|p| p.deadline <= now);
        self.list = waiting;
        expired
    }

    /// Takes them all.
    pub fn take_all(&mut self) -> Vec<PendingRemoval> {
        std::mem::take(&mut self.list)
    }

    /// How long until the next deadline (zero when one has passed), or `None` when nothing
    /// waits.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.list
            .iter()
            .map(|p| p.deadline.saturating_duration_since(now))
            .min()
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn pending(
        id: &str,
        slot: u8,
        deadline: Instant,
    ) -> (
        PendingRemoval,
        std::sync::mpsc::Receiver<api::ApiResult<()>>,
    ) {
        let (reply, rx) = Responder::pair();
        (
            PendingRemoval {
                id: id.to_string(),
                slot,
                reply,
                deadline,
            },
            rx,
        )
    }

    #[test]
    fn slots_deadlines_and_expiry() {
        let now = Instant::now();
        let mut p = PendingRemovals::default();
        assert_eq!(p.next_timeout(now), None);
        let (a, _ra) = pending("a", 3, now + Duration::from_secs(10));
        let (b, _rb) = pending("b", 4, now + Duration::from_secs(2));
        p.push(a);
        p.push(b);
        assert!(p.contains("a") && p.contains("b") && !p.contains("c"));
        assert_eq!(p.slot_of("a"), Some(3));
        assert_eq!(p.next_timeout(now), Some(Duration::from_secs(2)));
        assert!(p.take_expired(now).is_empty());
        let expired = p.take_expired(now + Duration::from_secs(3));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].id, "b");
        assert!(p.take_slot(4).is_none());
        assert_eq!(p.take_slot(3).map(|r| r.id), Some("a".to_string()));
        assert!(p.is_empty());
    }
}
