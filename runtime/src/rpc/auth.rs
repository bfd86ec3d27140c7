//! Cluster-token authentication of every gRPC call.
//!
//! Each call carries the metadata `authorization: Bearer <token>`. Servers
//! wrap their service with [`ServerAuth`], which compares the token in
//! constant time and answers `UNAUTHENTICATED` otherwise; clients wrap their
//! channel with [`ClientAuth`], which adds the header.

use std::sync::Arc;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key carrying the token.
pub const AUTHORIZATION: &str = "authorization";

/// The scheme before the token in the header value.
const BEARER: &str = "Bearer ";

/// The cluster token cannot be sent as gRPC metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is empty.
    #[error("the cluster token is empty")]
    Empty,
    /// The token has characters a header value cannot hold.
    #[error("the cluster token must be printable ASCII")]
    NotAscii,
}

fn check_token(token: &str) -> Result<(), AuthError> {
    if token.is_empty() {
        return Err(AuthError::Empty);
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::NotAscii);
    }
    Ok(())
}

/// Server-side interceptor: lets a call through only with the right token.
#[derive(Clone)]
pub struct ServerAuth {
    expected: Arc<[u8]>,
}

impl std::fmt::Debug for ServerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerAuth").finish_non_exhaustive()
    }
}

impl ServerAuth {
    /// Accepts calls carrying `Bearer <token>`.
    pub fn new(token: &str) -> Result<ServerAuth, AuthError> {
        check_token(token)?;
        Ok(ServerAuth {
            expected: format!("{BEARER}{token}").into_bytes().into(),
        })
    }

    /// Whether a header value is the expected one, compared in constant time
    /// (for a given length of the expected value).
    pub fn accepts(&self, header: &[u8]) -> bool {
        constant_time_eq(&self.expected, header)
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match request.metadata().get(AUTHORIZATION) {
            Some(value) if self.accepts(value.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong cluster token")),
            None => Err(Status::unauthenticated("missing cluster token")),
        }
    }
}

/// Client-side interceptor: adds the token to every call.
#[derive(Clone)]
pub struct ClientAuth {
    header: MetadataValue<Ascii>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth").finish_non_exhaustive()
    }
}

impl ClientAuth {
    /// Sends `Bearer <token>`.
    pub fn new(token: &str) -> Result<ClientAuth, AuthError> {
        check_token(token)?;
        let mut header: MetadataValue<Ascii> = format!("{BEARER}{token}")
            .parse()
            .map_err(|_| AuthError::NotAscii)?;
        header.set_sensitive(true);
        Ok(ClientAuth { header })
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.header.clone());
        Ok(request)
    }
}

/// Compares two byte strings without stopping at the first difference, so
/// the time taken reveals nothing about where a guess went wrong.
fn constant_time_eq(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != given.len());
    for (i, &e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(!e);
        diff |= e ^ g;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_tokens() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn interceptors_agree() {
        let mut client = ClientAuth::new("s3cret").unwrap();
        let mut server = ServerAuth::new("s3cret").unwrap();
        let request = client.call(Request::new(())).unwrap();
        assert!(server.call(request).is_ok());

        let mut other = ClientAuth::new("other").unwrap();
        let request = other.call(Request::new(())).unwrap();
        let status = server.call(request).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);

        let status = server.call(Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn rejects_bad_tokens() {
        assert_eq!(ClientAuth::new("").unwrap_err(), AuthError::Empty);
        assert_eq!(ServerAuth::new("a b").unwrap_err(), AuthError::NotAscii);
        assert_eq!(ClientAuth::new("é").unwrap_err(), AuthError::NotAscii);
    }
}
