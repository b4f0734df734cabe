//! The REST API of ioasid-vmm, in Cloud Hypervisor's dialect.
//!
//! Owns:
//! - the **server** on `--api-socket PATH` (a mode-0600 Unix socket, its own thread; requests
//!   are framed, with their fds, under bounds and timeouts by `conn`, parsed by dbs-uhttp,
//!   replies rendered by [`http`]), see [`start_server`];
//! - the **routes** ([`routes::ROUTES`]) and their input checks: JSON shape, unknown fields,
//!   body size, fd count, and [`DeviceConfig`] validation (sysfs paths only, unsupported `x_`
//!   options refused) happen here, before anything reaches the VMM;
//! - the **schema**: [`DeviceConfig`] (also the `--device` syntax, [`DeviceConfig::parse`]),
//!   [`VmConfig`] (the body of `vm.create`), the reply bodies in [`types`], [`ApiError`], and
//!   `api/openapi.yaml`;
//! - the **client**: [`client::ApiClient`] and the `ioasid-remote` binary.
//!
//! Must not touch: device, VM or IOMMU state. It has no access to any: each request goes to
//! the VMM as an [`ApiRequest`] through an `mpsc` channel plus an `EventFd`, and the VMM
//! thread answers through the request's [`Responder`]. This crate does not depend on `vmm`,
//! `ioasid` or `devices`; the VMM fills the plain structs in [`types`].
//!
//! VMM side, in short:
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use api::{ApiReceiver, ApiRequest, ApiError};
//! let (receiver, tx, evt) = ApiReceiver::new()?;
//! let server = api::start_server("/run/ioasid-vmm.sock", tx, evt)?;
//! // in the event loop, when receiver.event_fd() is readable:
//! for request in receiver.drain() {
//!     match request {
//!         ApiRequest::Ping(reply) => reply.send(Ok(Default::default())),
//!         other => other.fail(ApiError::BadRequest("Not implemented yet".into())),
//!     }
//! }
//! server.stop()?;
//! # Ok(()) }
//! ```

pub mod client;
mod conn;
pub mod device_config;
mod dispatch;
pub mod error;
pub mod http;
mod listener;
pub mod request;
pub mod routes;
pub mod server;
pub mod types;
pub mod vm_config;

pub use device_config::{DeviceConfig, DeviceConfigError};
pub use error::{ApiError, ApiErrorKind};
pub use listener::ListenerError;
pub use request::{ApiChannel, ApiReceiver, ApiRequest, ApiResult, Responder, TicketHandle};
pub use server::{
    start_server, start_server_with_options, ServerError, ServerHandle, ServerOptions,
};
pub use types::{
    Attachment, DeviceIommuCaps, DeviceNode, ErrorBody, HwptInfo, HwptKind, IoasInfo, IoasidsInfo,
    IommuCounters, IommuInfo, PasidEntry, PasidsInfo, PciDeviceInfo, PtType, VmCounters, VmInfo,
    VmRemoveDevice, VmState, VmmPingResponse, IOMMU_COUNTERS_KEY,
};
pub use vm_config::VmConfig;
