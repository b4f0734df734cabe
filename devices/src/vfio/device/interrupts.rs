//! Interrupts of the model: MSI and MSI-X become [`InterruptSink`] routes and
//! `VFIO_DEVICE_SET_IRQS` eventfds after each guest write to their registers; INTx is wired
//! when the VMM gives a line, switched off while MSI or MSI-X is on, and unmasked after each
//! guest EOI as [`super::super::intx`] decides.

use log::{debug, info, warn};

use super::super::backend::{INTX_IRQ, MSIX_IRQ, MSI_IRQ};
use super::super::intx::{IntxUnmask, IntxUnmasker};
use super::*;
use crate::pci::config::reg;
use crate::pci::interrupt::{IntxEventFds, IntxPin};
use crate::pci::msi::MsiChange;

impl VfioPciDevice {
    pub(super) fn arm_intx(&mut self) {
        let Some(pin) = IntxPin::from_register(self.virt.read_u8(reg::INTERRUPT_PIN)) else {
            self.virt.set_u8(reg::INTERRUPT_PIN, 0);
            return;
        };
        let Some(fds) = self.sink.intx(pin) else {
            // The VMM wires no INTx line: the guest sees no pin.
            self.virt.set_u8(reg::INTERRUPT_PIN, 0);
            return;
        };
        let mut armed = false;
        match self.regions.enable_irq(INTX_IRQ, &[&fds.trigger]) {
            Ok(()) => armed = true,
            Err(e) => warn!("{}: cannot enable INTx: {e}", self.id),
        }
        let unmasker = self.intx_unmasker(&fds);
        debug!("{}: INTx {pin}: {}", self.id, unmasker.mode().name());
        unmasker.set_armed(armed);
        self.intx = Some(Intx {
            pin,
            fds,
            armed,
            unmasker,
        });
    }

    /// Chooses how the line is unmasked after each EOI (see [`super::intx`]).
    pub(super) fn intx_unmasker(&self, fds: &IntxEventFds) -> IntxUnmasker {
        let masks = self
            .regions
            .irq_info(INTX_IRQ)
            .is_some_and(|i| i.automasked || i.maskable);
        let Some(resample) = &fds.resample else {
            return if masks {
                info!(
                    "{}: INTx without a resample eventfd: unmasking before each trapped BAR \
                     access",
                    self.id
                );
                IntxUnmasker::on_access(self.regions.clone())
            } else {
                IntxUnmasker::passive(IntxUnmask::NotNeeded)
            };
        };
        let refused = match self.regions.set_intx_resample(resample) {
            Ok(()) => return IntxUnmasker::passive(IntxUnmask::Kernel),
            Err(e) => e,
        };
        if !masks {
            info!(
                "{}: the device refuses an INTx unmask eventfd ({refused}) and does not mask \
                     INTx: the line is deasserted at each guest EOI",
                self.id
            );
            return IntxUnmasker::passive(IntxUnmask::NotNeeded);
        }
        match resample.try_clone() {
            Ok(dup) => {
                // mtty, for one, answers ENOTTY.
                info!(
                    "{}: the device refuses an INTx unmask eventfd ({refused}): the VMM \
                     unmasks INTx after each guest EOI",
                    self.id
                );
                IntxUnmasker::after_eoi(&self.id.to_string(), self.regions.clone(), dup)
            }
            Err(e) => {
                warn!(
                    "{}: the device refuses an INTx unmask eventfd ({refused}) and the resample \
                     eventfd cannot be duplicated ({e}): unmasking before each trapped BAR \
                     access",
                    self.id
                );
                IntxUnmasker::on_access(self.regions.clone())
            }
        }
    }

    pub(super) fn set_intx(&mut self, on: bool) {
        let Some(intx) = self.intx.as_mut() else {
            return;
        };
        if intx.armed == on {
            return;
        }
        let r = if on {
            self.regions.enable_irq(INTX_IRQ, &[&intx.fds.trigger])
        } else {
            self.regions.disable_irq(INTX_IRQ)
        };
        match r {
            Ok(()) => intx.armed = on,
            Err(e) => {
                self.warn.warn(format_args!(
                    "{}: cannot switch INTx {}: {e}",
                    self.id,
                    if on { "on" } else { "off" }
                ));
            }
        }
        intx.unmasker.set_armed(intx.armed);
        if on && intx.unmasker.mode() == IntxUnmask::Kernel {
            // VFIO drops the unmask eventfd with the trigger.
            if let Some(rs) = &intx.fds.resample {
                if let Err(e) = self.regions.set_intx_resample(rs) {
                    self.warn.warn(format_args!(
                        "{}: cannot set the INTx unmask eventfd again: {e}",
                        self.id
                    ));
                }
            }
        }
    }

    /// Before a trapped BAR access: unmask INTx if the guest EOIed it and the model is the one
    /// that unmasks.
    pub(super) fn intx_before_access(&self) {
        if let Some(i) = &self.intx {
            i.unmasker.before_access();
        }
    }

    pub(super) fn msi_written(&mut self) {
        let change = match self.msi.as_mut() {
            Some(m) => m.update(&self.virt, self.sink.as_ref()),
            None => return,
        };
        match change {
            Ok(MsiChange::Enabled) => {
                self.set_intx(false);
                let fds = self.msi.as_ref().map(|m| m.eventfds()).unwrap_or_default();
                if let Err(e) = self.regions.enable_irq(MSI_IRQ, &fds) {
                    self.warn.warn(format_args!(
                        "{}: cannot enable {} MSI vectors: {e}",
                        self.id,
                        fds.len()
                    ));
                }
            }
            Ok(MsiChange::Disabled) => {
                if let Err(e) = self.regions.disable_irq(MSI_IRQ) {
                    self.warn
                        .warn(format_args!("{}: cannot disable MSI: {e}", self.id));
                }
                self.set_intx(true);
            }
            Ok(MsiChange::None) => {}
            Err(e) => {
                self.warn
                    .warn(format_args!("{}: MSI routing failed: {e}", self.id));
            }
        }
    }

    pub(super) fn msix_control_written(&mut self) {
        let change = match self.msix.as_mut() {
            Some(m) => m.control_written(&self.virt, self.sink.as_ref()),
            None => return,
        };
        match change {
            Ok(MsiChange::Enabled) => {
                self.set_intx(false);
                let fds = self.msix.as_ref().map(|m| m.eventfds()).unwrap_or_default();
                if let Err(e) = self.regions.enable_irq(MSIX_IRQ, &fds) {
                    self.warn.warn(format_args!(
                        "{}: cannot enable {} MSI-X vectors: {e}",
                        self.id,
                        fds.len()
                    ));
                }
            }
            Ok(MsiChange::Disabled) => {
                if let Err(e) = self.regions.disable_irq(MSIX_IRQ) {
                    self.warn
                        .warn(format_args!("{}: cannot disable MSI-X: {e}", self.id));
                }
                self.set_intx(true);
            }
            Ok(MsiChange::None) => {}
            Err(e) => {
                self.warn
                    .warn(format_args!("{}: MSI-X routing failed: {e}", self.id));
            }
        }
    }

    /// MSI vectors are routed.
    pub fn msi_enabled(&self) -> bool {
        self.msi.as_ref().is_some_and(|m| m.enabled())
    }

    /// The MSI-X state (tests).
    #[cfg(test)]
    pub(crate) fn msix_state(&self) -> Option<&MsixState> {
        self.msix.as_ref()
    }

    /// MSI-X vectors are routed.
    pub fn msix_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(|m| m.enabled())
    }

    /// INTx is wired to the device.
    pub fn intx_enabled(&self) -> bool {
        self.intx.as_ref().is_some_and(|i| i.armed)
    }

    /// The INTx pin the guest sees, when the VMM wired the line.
    pub fn intx_pin(&self) -> Option<IntxPin> {
        self.intx.as_ref().map(|i| i.pin)
    }

    /// How INTx is unmasked after each guest EOI, when wired.
    pub fn intx_unmask(&self) -> Option<IntxUnmask> {
        self.intx.as_ref().map(|i| i.unmasker.mode())
    }

    /// How many times the model unmasked INTx itself ([`IntxUnmask::AfterEoi`],
    /// [`IntxUnmask::OnAccess`]); 0 otherwise.
    pub fn intx_unmasks(&self) -> u64 {
        self.intx.as_ref().map_or(0, |i| i.unmasker.unmasks())
    }

    pub(super) fn release_interrupts(&mut self) {
        if let Some(m) = self.msi.as_mut() {
            if m.enabled() {
                m.release(self.sink.as_ref());
                let _ = self.regions.disable_irq(MSI_IRQ);
            }
        }
        if let Some(m) = self.msix.as_mut() {
            if m.enabled() {
                m.release(self.sink.as_ref());
                let _ = self.regions.disable_irq(MSIX_IRQ);
            }
        }
    }
}
