//! `ioasid-remote`: the REST API client.
fn main() {}
