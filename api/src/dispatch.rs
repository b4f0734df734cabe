//! From one parsed HTTP request to one reply: route lookup, input checks, the round trip to
//! the VMM, and the mapping of results to status codes.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use dbs_uhttp::Request;
use log::{debug, warn};
use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::device_config::{validate_id, DeviceConfig};
use crate::http::{HttpStatus, Reply};
use crate::request::{ApiRequest, ApiResult, Responder};
use crate::routes::{lookup, Endpoint, Lookup};
use crate::types::VmRemoveDevice;
use crate::vm_config::VmConfig;

/// Sends requests to the VMM and waits for the answers.
pub(crate) struct Dispatcher {
    pub(crate) api_tx: Sender<ApiRequest>,
    pub(crate) api_evt: EventFd,
    pub(crate) reply_timeout: Duration,
    /// The server's stop eventfd: a wait for the VMM ends early when it is signalled.
    pub(crate) stop_evt: EventFd,
}

/// How often a wait for the VMM checks for a stop request.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// Whether `evt` is readable, without consuming it.
fn signalled(evt: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd that outlives the call; a zero timeout never blocks.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}

/// The parts of a request a handler looks at.
struct Input {
    body: Option<Vec<u8>>,
    files: Vec<File>,
}

impl Input {
    /// For endpoints that take neither a body nor fds.
    fn expect_nothing(&self) -> Result<(), Reply> {
        if self.body.is_some() {
            return Err(refuse(
                HttpStatus::BadRequest,
                "This endpoint takes no request body",
            ));
        }
        self.expect_no_files()
    }

    fn expect_no_files(&self) -> Result<(), Reply> {
        if !self.files.is_empty() {
            return Err(refuse(
                HttpStatus::BadRequest,
                format!(
                    "This endpoint takes no file descriptors ({} passed with SCM_RIGHTS)",
                    self.files.len()
                ),
            ));
        }
        Ok(())
    }

    fn json_body<T: serde::de::DeserializeOwned>(&self, schema: &str) -> Result<T, Reply> {
        let body = self.body(schema)?;
        serde_json::from_slice(body).map_err(|e| {
            let detail = match offending_field::<T>(body) {
                Some((field, err)) if err.contains(&format!("`{field}`")) => err,
                Some((field, err)) => format!("field `{field}`: {err}"),
                None => e.to_string(),
            };
            refuse(
                HttpStatus::BadRequest,
                format!("Invalid {schema} body: {detail}"),
            )
        })
    }

    fn body(&self, schema: &str) -> Result<&[u8], Reply> {
        self.body.as_deref().ok_or_else(|| {
            refuse(
                HttpStatus::BadRequest,
                format!("Request body required: a JSON {schema}"),
            )
        })
    }
}

/// serde_json does not say which field has the wrong type; find it by deserializing each
/// field of the object alone (every field of our bodies is optional, or the only one).
fn offending_field<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.as_object()?.iter().find_map(|(k, v)| {
        let mut single = serde_json::Map::new();
        single.insert(k.clone(), v.clone());
        match serde_json::from_value::<T>(serde_json::Value::Object(single)) {
            Err(e) if !e.to_string().starts_with("missing field") => {
                Some((k.clone(), e.to_string()))
            }
            _ => None,
        }
    })
}

/// A request the API layer refuses: logged at `warn` with the reason, then answered.
pub(crate) fn refuse(status: HttpStatus, msg: impl Into<String>) -> Reply {
    let msg = msg.into();
    warn!("API request refused ({}): {msg}", status.code());
    Reply::error(status, msg)
}

fn bad_request(msg: impl Into<String>) -> Reply {
    refuse(HttpStatus::BadRequest, msg)
}

impl Dispatcher {
    /// Handles one request. Never panics; every failure becomes a JSON error reply.
    pub(crate) fn handle(&self, mut req: Request) -> Reply {
        let path = req.uri().get_abs_path().to_string();
        let method = req.method().to_str();
        let input = Input {
            body: req
                .body
                .take()
                .map(|b| b.raw().to_vec())
                .filter(|b| !b.is_empty()),
            files: std::mem::take(&mut req.files),
        };
        debug!("API request {method} {path}");
        let endpoint = match lookup(&path, method) {
            Lookup::Found(e) => e,
            Lookup::NoSuchPath => {
                return refuse(HttpStatus::NotFound, format!("Unknown route {path}"))
            }
            Lookup::WrongMethod(allowed) => {
                let allow: Vec<&'static str> = allowed.iter().map(|m| m.as_str()).collect();
                let mut r = refuse(
                    HttpStatus::MethodNotAllowed,
                    format!(
                        "Method {method} is not allowed on {path}; use {}",
                        allow.join(" or ")
                    ),
                );
                r.allow = allow;
                return r;
            }
        };
        match self.route(endpoint, input) {
            Ok(r) | Err(r) => r,
        }
    }

    fn route(&self, endpoint: Endpoint, input: Input) -> Result<Reply, Reply> {
        match endpoint {
            Endpoint::Ping => {
                input.expect_nothing()?;
                self.call_json(ApiRequest::Ping)
            }
            Endpoint::VmInfo => {
                input.expect_nothing()?;
                self.call_json(ApiRequest::VmInfo)
            }
            Endpoint::VmCreate => {
                input.expect_no_files()?;
                let config = VmConfig::from_json(input.body("VmConfig")?)
                    .map_err(|e| bad_request(format!("Invalid VmConfig body: {e}")))?;
                for d in &config.devices {
                    if d.fd.is_some() {
                        return Err(bad_request(
                            "vm.create takes no VFIO cdev fds: give each device a `path`, or \
                             add fd-backed devices with vm.add-device after vm.create",
                        ));
                    }
                    d.validate_with_fd(false)
                        .map_err(|e| bad_request(format!("Invalid VmConfig device: {e}")))?;
                }
                let config = Box::new(config);
                self.call_empty(|reply| ApiRequest::VmCreate { config, reply })
            }
            Endpoint::VmBoot => {
                input.expect_nothing()?;
                self.call_empty(ApiRequest::VmBoot)
            }
            Endpoint::VmPause => {
                input.expect_nothing()?;
                self.call_empty(ApiRequest::VmPause)
            }
            Endpoint::VmResume => {
                input.expect_nothing()?;
                self.call_empty(ApiRequest::VmResume)
            }
            Endpoint::VmReboot => {
                input.expect_nothing()?;
                self.call_empty(ApiRequest::VmReboot)
            }
            Endpoint::VmDelete => {
                input.expect_nothing()?;
                self.call_empty(ApiRequest::VmDelete)
            }
            Endpoint::Iommu => {
                input.expect_nothing()?;
                self.call_json(ApiRequest::Iommu)
            }
            Endpoint::Ioasids => {
                input.expect_nothing()?;
                self.call_json(ApiRequest::Ioasids)
            }
            Endpoint::Pasids => {
                input.expect_nothing()?;
                self.call_json(ApiRequest::Pasids)
            }
            Endpoint::Counters => {
                input.expect_nothing()?;
                self.call_json(ApiRequest::Counters)
            }
            Endpoint::VmShutdown => {
                input.expect_nothing()?;
                self.call_empty(ApiRequest::VmShutdown)
            }
            Endpoint::VmmShutdown => {
                input.expect_nothing()?;
                self.call_empty(ApiRequest::VmmShutdown)
            }
            Endpoint::RemoveDevice => {
                input.expect_no_files()?;
                let body: VmRemoveDevice = input.json_body("VmRemoveDevice")?;
                validate_id(&body.id).map_err(|e| bad_request(e.to_string()))?;
                self.call_empty(|reply| ApiRequest::RemoveDevice { id: body.id, reply })
            }
            Endpoint::AddDevice => {
                let (config, fd) = add_device_input(input)?;
                match self.call(|reply| ApiRequest::AddDevice { config, fd, reply })? {
                    Some(info) => Ok(Reply::json(HttpStatus::Ok, &info)),
                    None => Ok(Reply::no_content()),
                }
            }
        }
    }

    /// Sends the request built by `make` and waits for the VMM's answer.
    fn call<T>(&self, make: impl FnOnce(Responder<T>) -> ApiRequest) -> Result<T, Reply> {
        // Tracked: a request answered 503 is withdrawn first, so it never runs later.
        let (responder, rx, ticket) = Responder::pair_tracked();
        let request = make(responder);
        let name = request.name();
        if self.api_tx.send(request).is_err() {
            return Err(Reply::error(
                HttpStatus::ServiceUnavailable,
                "The VMM is not accepting API requests",
            ));
        }
        if let Err(e) = self.api_evt.write(1) {
            warn!("Cannot signal the VMM of API request {name}: {e}");
            return Err(Reply::error(
                HttpStatus::InternalServerError,
                format!("Cannot signal the VMM: {e}"),
            ));
        }
        let deadline = Instant::now() + self.reply_timeout;
        let result: ApiResult<T> = loop {
            match rx.recv_timeout(STOP_CHECK) {
                Ok(r) => break r,
                Err(RecvTimeoutError::Timeout) if signalled(&self.stop_evt) => {
                    let what = if ticket.withdraw() {
                        "was withdrawn and will not run"
                    } else {
                        "was taken by the VMM and may have run"
                    };
                    return Err(Reply::error(
                        HttpStatus::ServiceUnavailable,
                        format!("The API server is stopping; {name} {what}"),
                    ));
                }
                // Past the deadline: 503 only for a request the VMM has not taken (withdrawn,
                // it never runs); one the VMM is executing is waited for, so a 503 never
                // hides a request that ran.
                Err(RecvTimeoutError::Timeout)
                    if Instant::now() >= deadline && ticket.withdraw() =>
                {
                    return Err(Reply::error(
                        HttpStatus::ServiceUnavailable,
                        format!(
                            "The VMM did not take {name} within {} s; it was withdrawn and \
                             will not run",
                            self.reply_timeout.as_secs()
                        ),
                    ))
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Reply::error(
                        HttpStatus::ServiceUnavailable,
                        format!("The VMM dropped {name} without answering"),
                    ))
                }
            }
        };
        result.map_err(|e| {
            debug!("API request {name} failed: {e}");
            Reply::errors(HttpStatus::from_api_code(e.status()), e.messages())
        })
    }

    fn call_json<T: Serialize>(
        &self,
        make: impl FnOnce(Responder<T>) -> ApiRequest,
    ) -> Result<Reply, Reply> {
        let value = self.call(make)?;
        Ok(Reply::json(HttpStatus::Ok, &value))
    }

    fn call_empty(&self, make: impl FnOnce(Responder<()>) -> ApiRequest) -> Result<Reply, Reply> {
        self.call(make)?;
        Ok(Reply::no_content())
    }
}

/// Parses and validates `vm.add-device`: the body, and at most one fd.
fn add_device_input(input: Input) -> Result<(DeviceConfig, Option<OwnedFd>), Reply> {
    let mut config: DeviceConfig = input.json_body("DeviceConfig")?;
    let mut files = input.files;
    if files.len() > 1 {
        return Err(bad_request(format!(
            "vm.add-device takes at most one file descriptor (the VFIO cdev); {} were passed",
            files.len()
        )));
    }
    let file = files.pop();
    if let (Some(n), None) = (config.fd, &file) {
        return Err(bad_request(format!(
            "The body names fd {n}, but no file descriptor was passed with SCM_RIGHTS"
        )));
    }
    config
        .validate_with_fd(file.is_some())
        .map_err(|e| bad_request(e.to_string()))?;
    // The number in the body meant something only in the client's process.
    config.fd = None;
    let fd = match file {
        None => None,
        Some(f) => {
            // dbs-uhttp receives fds without MSG_CMSG_CLOEXEC; try_clone() duplicates with
            // F_DUPFD_CLOEXEC, and dropping `f` closes the inheritable original.
            let cloexec = f.try_clone().map_err(|e| {
                Reply::error(
                    HttpStatus::InternalServerError,
                    format!("Cannot duplicate the received fd: {e}"),
                )
            })?;
            Some(OwnedFd::from(cloexec))
        }
    };
    Ok((config, fd))
}
