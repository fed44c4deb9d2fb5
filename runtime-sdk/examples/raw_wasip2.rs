//! A component written against the plain `wasip2` bindings, without marina-sdk: any standard
//! `wasi:http/proxy` component runs on Marina.

use std::io::Write as _;

use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Raw;

impl wasip2::exports::http::incoming_handler::Guest for Raw {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
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
