//! The route table: every (path, method) the server implements. The server dispatches from
//! it and the `openapi_matches_routes` test compares it with `api/openapi.yaml`.

/// Path prefix of every route.
pub const API_PREFIX: &str = "/api/v1";

/// HTTP methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HttpMethod {
    /// GET.
    Get,
    /// PUT.
    Put,
}

impl HttpMethod {
    /// Upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Put => "PUT",
        }
    }
}

/// What a route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `vmm.ping`.
    Ping,
    /// `vm.info`.
    VmInfo,
    /// `vm.create`.
    VmCreate,
    /// `vm.boot`.
    VmBoot,
    /// `vm.pause`.
    VmPause,
    /// `vm.resume`.
    VmResume,
    /// `vm.reboot`.
    VmReboot,
    /// `vm.delete`.
    VmDelete,
    /// `vm.add-device`.
    AddDevice,
    /// `vm.remove-device`.
    RemoveDevice,
    /// `vm.shutdown`.
    VmShutdown,
    /// `vmm.shutdown`.
    VmmShutdown,
    /// `vm.iommu`.
    Iommu,
    /// `vm.ioasids`.
    Ioasids,
    /// `vm.pasids`.
    Pasids,
    /// `vm.counters`.
    Counters,
}

/// One route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Full path, e.g. `/api/v1/vmm.ping`.
    pub path: &'static str,
    /// Method.
    pub method: HttpMethod,
    /// Handler.
    pub endpoint: Endpoint,
}

const fn route(path: &'static str, method: HttpMethod, endpoint: Endpoint) -> Route {
    Route {
        path,
        method,
        endpoint,
    }
}

/// Every route the server implements.
pub const ROUTES: &[Route] = &[
    route("/api/v1/vmm.ping", HttpMethod::Get, Endpoint::Ping),
    route(
        "/api/v1/vmm.shutdown",
        HttpMethod::Put,
        Endpoint::VmmShutdown,
    ),
    route("/api/v1/vm.info", HttpMethod::Get, Endpoint::VmInfo),
    route("/api/v1/vm.create", HttpMethod::Put, Endpoint::VmCreate),
    route("/api/v1/vm.boot", HttpMethod::Put, Endpoint::VmBoot),
    route("/api/v1/vm.pause", HttpMethod::Put, Endpoint::VmPause),
    route("/api/v1/vm.resume", HttpMethod::Put, Endpoint::VmResume),
    route("/api/v1/vm.reboot", HttpMethod::Put, Endpoint::VmReboot),
    route("/api/v1/vm.delete", HttpMethod::Put, Endpoint::VmDelete),
    route(
        "/api/v1/vm.add-device",
        HttpMethod::Put,
        Endpoint::AddDevice,
    ),
    route(
        "/api/v1/vm.remove-device",
        HttpMethod::Put,
        Endpoint::RemoveDevice,
    ),
    route("/api/v1/vm.shutdown", HttpMethod::Put, Endpoint::VmShutdown),
    route("/api/v1/vm.iommu", HttpMethod::Get, Endpoint::Iommu),
    route("/api/v1/vm.ioasids", HttpMethod::Get, Endpoint::Ioasids),
    route("/api/v1/vm.pasids", HttpMethod::Get, Endpoint::Pasids),
    route("/api/v1/vm.counters", HttpMethod::Get, Endpoint::Counters),
];

/// Result of looking a request up in [`ROUTES`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Path and method match.
    Found(Endpoint),
    /// The path exists with other methods.
    WrongMethod(Vec<HttpMethod>),
    /// No such path.
    NoSuchPath,
}

/// Finds the route for `path` and `method` (`method` is the request's method name).
pub fn lookup(path: &str, method: &str) -> Lookup {
    let mut allowed = Vec::new();
    for r in ROUTES.iter().filter(|r| r.path == path) {
        if r.method.as_str() == method {
            return Lookup::Found(r.endpoint);
        }
        allowed.push(r.method);
    }
    if allowed.is_empty() {
        Lookup::NoSuchPath
    } else {
        Lookup::WrongMethod(allowed)
    }
}
