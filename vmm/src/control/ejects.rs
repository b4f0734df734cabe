//! From the guest's `_EJ0` to the control loop: the `on_eject` callback the hotplug controller
//! calls on a vCPU thread only queues the slot and writes an eventfd.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::hotplug::EjectCallback;

/// The control loop's end: the slots the guest ejected, and the eventfd to poll.
#[derive(Debug)]
pub struct EjectReceiver {
    rx: Receiver<u8>,
    evt: EventFd,
}

/// A callback for [`crate::hotplug::PciHotplug::install`] and the receiver it feeds. The
/// callback never blocks: a channel send and an eventfd write.
pub fn eject_channel() -> io::Result<(EjectCallback, EjectReceiver)> {
    let evt = EventFd::new(EFD_NONBLOCK)?;
    let notify = evt.try_clone()?;
    let (tx, rx): (Sender<u8>, Receiver<u8>) = mpsc::channel();
    let callback: EjectCallback = Box::new(move |slot| {
        if tx.send(slot).is_err() {
            log::warn!("Guest ejected PCI slot {slot} after the VMM stopped listening");
            return;
        }
        if let Err(e) = notify.write(1) {
            log::warn!("Cannot signal the eject of PCI slot {slot} to the VMM: {e}");
        }
    });
    Ok((callback, EjectReceiver { rx, evt }))
}

impl EjectReceiver {
    /// The eventfd, readable when slots are queued.
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }

    /// Clears the eventfd and returns the queued slots, oldest first. Never blocks.
    pub fn drain(&self) -> Vec<u8> {
        // EAGAIN on a spurious wake-up; the channel is the source of truth.
        let _ = self.evt.read();
        self.rx.try_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::os::fd::AsRawFd;

    fn readable(evt: &EventFd) -> bool {
        let mut p = libc::pollfd {
            fd: evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd that outlives the call; zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn ejects_arrive_in_order_and_wake_the_loop() {
        let (cb, rx) = eject_channel().unwrap();
        assert!(!readable(rx.event_fd()));
        cb(3);
        cb(7);
        assert!(readable(rx.event_fd()));
        assert_eq!(rx.drain(), vec![3, 7]);
        assert!(!readable(rx.event_fd()));
        assert!(rx.drain().is_empty());
    }

    #[test]
    fn callback_outliving_the_receiver_does_not_panic() {
        let (cb, rx) = eject_channel().unwrap();
        drop(rx);
        cb(4);
    }
}
