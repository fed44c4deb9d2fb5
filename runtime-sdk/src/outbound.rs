//! Outbound HTTP through `wasi:http/outgoing-handler`. The host decides which hosts an app may reach
//! (`allowedOutboundHosts`); a denied call comes back as an error, not a trap.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};

use crate::body::BodyReader;

/// A response from an outbound request, its body read whole.
pub struct Fetched {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why an outbound request failed.
#[derive(Debug)]
pub struct FetchError(pub String);

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `GET url` (http or https), reading at most `limit` bytes of the response body.
pub fn fetch(url: &str, limit: usize) -> Result<Fetched, FetchError> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        return Err(FetchError(format!("not an http(s) URL: {url}")));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    let invalid = |what: &str| FetchError(format!("invalid {what} in {url}"));
    request.set_method(&Method::Get).map_err(|()| invalid("method"))?;
    request.set_scheme(Some(&scheme)).map_err(|()| invalid("scheme"))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| invalid("authority"))?;
    request.set_path_with_query(Some(path)).map_err(|()| invalid("path"))?;
    let body = request
        .body()
        .map_err(|()| FetchError("request body unavailable".into()))?;
    OutgoingBody::finish(body, None).map_err(|error| FetchError(format!("{error:?}")))?;

    let future = outgoing_handler::handle(request, None).map_err(|error| FetchError(format!("{error:?}")))?;
    let response = loop {
        match future.get() {
            Some(result) => break result,
            None => future.subscribe().block(),
        }
    };
    let response = response
        .map_err(|()| FetchError("the response was already taken".into()))?
        .map_err(|error| FetchError(format!("{error:?}")))?;
    let status = response.status();
    let incoming = response
        .consume()
        .map_err(|()| FetchError("response body unavailable".into()))?;
    let mut reader = BodyReader::new(incoming).ok_or_else(|| FetchError("response body unavailable".into()))?;
    let body = reader.read_to_limit(limit).map_err(|error| match error {
        crate::body::ReadError::TooLarge => FetchError(format!("the response body is over {limit} bytes")),
        crate::body::ReadError::Io(message) => FetchError(message),
    })?;
    Ok(Fetched { status, body })
}
