//! A component written against the plain `wasip2` bindings, without marina-sdk: any standard
//! `wasi:http/proxy` component runs on Marina. Two paths misbehave on purpose, as only a component built outside
//! the SDK can: `/no-response/drop` drops its `response-outparam` unset, and `/no-response/leak` keeps the handle
//! (as componentize-js does on a reused instance) and returns without ever setting it.

use std::cell::RefCell;
use std::io::Write as _;

use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Raw;

thread_local! {
    /// Outparams kept alive by `/no-response/leak`.
    static LEAKED: RefCell<Vec<ResponseOutparam>> = const { RefCell::new(Vec::new()) };
}

impl wasip2::exports::http::incoming_handler::Guest for Raw {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        match path.as_str() {
            "/no-response/drop" => return drop(out),
            "/no-response/leak" => return LEAKED.with(|leaked| leaked.borrow_mut().push(out)),
            _ => {}
        }
        let headers = Fields::from_list(&[("content-type".to_owned(), b"text/plain".to_vec())]).unwrap();
        let response = OutgoingResponse::new(headers);
        let body = response.body().unwrap();
        ResponseOutparam::set(out, Ok(response));
        let mut stream = body.write().unwrap();
        write!(stream, "raw wasip2 component saw {path}").unwrap();
        stream.flush().unwrap();
        drop(stream);
        OutgoingBody::finish(body, None).unwrap();
    }
}

wasip2::http::proxy::export!(Raw);
