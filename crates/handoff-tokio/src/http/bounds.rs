//! The bounds [`Handoff::serve`](crate::Handoff::serve) puts on a service
//! and its response body, named once for the private code that serves
//! connections.

use super::body::Incoming;
use http::{Request, Response};

use crate::error::BoxError;

/// The bounds `Handoff::serve` puts on a service (implemented for every
/// type that meets them).
pub(crate) trait Svc<B>:
    tower_service::Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> Svc<B> for S
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
}

/// The bounds on a response body, likewise.
pub(crate) trait ResBody:
    http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static
{
}

impl<B> ResBody for B where B: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}
