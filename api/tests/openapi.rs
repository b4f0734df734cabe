//! `api/openapi.yaml` and the server agree: same (path, method) pairs, both in the route
//! table and on the wire.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use api::routes::ROUTES;
use common::Harness;

const SPEC: &str = include_str!("../openapi.yaml");
const METHODS: &[&str] = &[
    "get", "put", "post", "patch", "delete", "head", "options", "trace",
];

/// The path prefix of `servers[0].url`, e.g. `/api/v1`.
fn server_prefix(yaml: &str) -> String {
    let mut in_servers = false;
    for line in yaml.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_servers = line.trim_end() == "servers:";
            continue;
        }
        if in_servers {
            if let Some(url) = line.trim().strip_prefix("- url:") {
                let url = url.trim().trim_matches('"');
                let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
                let path = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
                return path.trim_end_matches('/').to_string();
            }
        }
    }
    panic!("openapi.yaml has no servers[0].url");
}

/// Every (path, METHOD) under `paths:`. Strict about layout: two-space indents, no tabs,
/// path keys at indent 2 starting with `/`, operations at indent 4.
fn spec_routes(yaml: &str) -> BTreeSet<(String, String)> {
    assert!(!yaml.contains('\t'), "openapi.yaml must not contain tabs");
    let mut out = BTreeSet::new();
    let mut seen_paths = BTreeSet::new();
    let mut in_paths = false;
    let mut current: Option<String> = None;
    for (n, line) in yaml.lines().enumerate() {
        let content = line.trim_end();
        if content.trim().is_empty() || content.trim_start().starts_with('#') {
            continue;
        }
        let indent = content.len() - content.trim_start().len();
        if indent == 0 {
            in_paths = content == "paths:";
            current = None;
            continue;
        }
        if !in_paths {
            continue;
        }
        let key = content.trim_start();
        match indent {
            2 => {
                let path = key
                    .strip_suffix(':')
                    .unwrap_or_else(|| panic!("line {}: path key without ':'", n + 1))
                    .trim_matches(|c| c == '"' || c == '\'');
                assert!(path.starts_with('/'), "line {}: path `{path}`", n + 1);
                assert!(seen_paths.insert(path.to_string()), "duplicate path {path}");
                current = Some(path.to_string());
            }
            4 => {
                let name = key.split(':').next().unwrap_or_default();
                if METHODS.contains(&name) {
                    let path = current
                        .clone()
                        .unwrap_or_else(|| panic!("line {}: operation outside a path", n + 1));
                    out.insert((path, name.to_uppercase()));
                }
            }
            i if i > 4 => {}
            _ => panic!("line {}: unexpected indent {indent} in paths", n + 1),
        }
    }
    assert!(!out.is_empty(), "no operations found under paths:");
    out
}

#[test]
fn openapi_matches_routes() {
    println!("TEST openapi_matches_routes: api/openapi.yaml <-> route table <-> live server");
    let prefix = server_prefix(SPEC);
    let spec: BTreeSet<(String, String)> = spec_routes(SPEC)
        .into_iter()
        .map(|(p, m)| (format!("{prefix}{p}"), m))
        .collect();
    let table: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.path.to_string(), r.method.as_str().to_string()))
        .collect();
    assert_eq!(table.len(), ROUTES.len(), "duplicate entries in ROUTES");
    let missing_in_spec: Vec<_> = table.difference(&spec).collect();
    let missing_in_server: Vec<_> = spec.difference(&table).collect();
    println!(
        "  spec: {} operations, route table: {}",
        spec.len(),
        table.len()
    );
    assert!(
        missing_in_spec.is_empty() && missing_in_server.is_empty(),
        "implemented but not in openapi.yaml: {missing_in_spec:?}\n\
         in openapi.yaml but not implemented: {missing_in_server:?}"
    );

    // On the wire: each spec operation is routed (no 404 "Unknown route", no 405), and every
    // other method on a spec path is refused with 405.
    let h = Harness::start("openapi");
    let paths: BTreeSet<&String> = spec.iter().map(|(p, _)| p).collect();
    for path in paths {
        for method in ["GET", "PUT", "POST", "PATCH", "DELETE"] {
            let raw = format!("{method} {path} HTTP/1.1\r\n\r\n");
            let r = h.client.raw_request(raw.as_bytes(), &[]).unwrap();
            let in_spec = spec.contains(&(path.clone(), method.to_string()));
            println!(
                "  {method:<6} {path:<28} -> {} (in spec: {in_spec})",
                r.status
            );
            if in_spec {
                let unrouted = r.status == 405
                    || (r.status == 404 && r.error_message().starts_with("Unknown route"));
                assert!(
                    !unrouted,
                    "{method} {path} is in the spec but not served: {}",
                    r.status
                );
            } else {
                assert_eq!(r.status, 405, "{method} {path} is not in the spec");
            }
        }
    }
}
