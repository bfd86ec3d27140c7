//! Channels to gRPC peers and the mapping of call failures to
//! [`crate::error::Error`].

use super::auth::{AuthError, ClientAuth};
use crate::error::Error;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// A channel that adds the cluster token to every call.
pub type AuthChannel = InterceptedService<Channel, ClientAuth>;

/// Largest message a client accepts (cluster listings can be long).
pub(crate) const MAX_MESSAGE: usize = 64 << 20;

/// HTTP/2 flow-control window of one stream: large enough that an object
/// transfer is not throttled by round trips.
pub(crate) const STREAM_WINDOW: u32 = 8 << 20;

/// HTTP/2 flow-control window of one connection.
pub(crate) const CONNECTION_WINDOW: u32 = 32 << 20;

/// How a client reaches its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// How long establishing the connection may take.
    pub connect_timeout: Duration,
    /// How long each call may take to be answered (for a streaming call:
    /// until the stream starts).
    pub call_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(3),
            call_timeout: Duration::from_secs(10),
        }
    }
}

impl From<AuthError> for Error {
    fn from(e: AuthError) -> Self {
        Error::Unauthenticated(e.to_string())
    }
}

/// The endpoint of `address` (`"host:port"`, or a full `http://` URI).
pub(crate) fn endpoint(address: &str, options: ClientOptions) -> Result<Endpoint, Error> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| Error::BadRequest(format!("invalid address {address:?}: {e}")))?;
    Ok(endpoint
        .connect_timeout(options.connect_timeout)
        .timeout(options.call_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(false))
}

/// Connects now, within the connect timeout.
pub(crate) async fn connect(
    address: &str,
    token: &str,
    options: ClientOptions,
) -> Result<AuthChannel, Error> {
    let auth = ClientAuth::new(token)?;
    let endpoint = endpoint(address, options)?;
    let channel = tokio::time::timeout(options.connect_timeout, endpoint.connect())
        .await
        .map_err(|_| Error::Unreachable {
            address: address.to_owned(),
            message: format!("no connection within {:?}", options.connect_timeout),
        })?
        .map_err(|e| Error::Unreachable {
            address: address.to_owned(),
            message: error_chain(&e),
        })?;
    Ok(InterceptedService::new(channel, auth))
}

/// A channel that connects on first use (and reconnects after failures).
pub(crate) fn connect_lazy(
    address: &str,
    token: &str,
    options: ClientOptions,
) -> Result<AuthChannel, Error> {
    let auth = ClientAuth::new(token)?;
    let channel = endpoint(address, options)?.connect_lazy();
    Ok(InterceptedService::new(channel, auth))
}

/// An error and its sources, on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// The error for a failed call to `address`, where nothing more specific
/// is known about the call.
pub(crate) fn status_to_error(status: &Status, address: &str) -> Error {
    let message = status.message().to_owned();
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => Error::Unauthenticated(message),
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Unimplemented => Error::BadRequest(message),
        Code::FailedPrecondition | Code::ResourceExhausted => Error::Infeasible(message),
        Code::Unavailable
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Aborted
        | Code::Internal
        | Code::DataLoss
        | Code::Ok => Error::Unreachable {
            address: address.to_owned(),
            message: if message.is_empty() {
                format!("{:?}", status.code())
            } else {
                format!("{:?}: {message}", status.code())
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_codes() {
        let a = "h:1";
        assert!(matches!(
            status_to_error(&Status::unauthenticated("x"), a),
            Error::Unauthenticated(_)
        ));
        assert!(matches!(
            status_to_error(&Status::unavailable("x"), a),
            Error::Unreachable { .. }
        ));
        assert!(matches!(
            status_to_error(&Status::failed_precondition("x"), a),
            Error::Infeasible(_)
        ));
        assert_eq!(
            status_to_error(&Status::already_exists("actor name x is taken"), a),
            Error::BadRequest("actor name x is taken".into())
        );
    }

    #[test]
    fn addresses() {
        assert!(endpoint("127.0.0.1:80", ClientOptions::default()).is_ok());
        assert!(endpoint("http://127.0.0.1:80", ClientOptions::default()).is_ok());
        assert!(endpoint("not an address", ClientOptions::default()).is_err());
    }
}
