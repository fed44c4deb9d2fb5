//! `echo`: streams the request body straight back (never holding it whole), and describes the request on GET.

use marina_sdk::{Request, Response};

fn handle(mut request: Request) -> Response {
    if request.method() == "GET" || request.method() == "HEAD" {
        let headers: serde_json::Map<String, serde_json::Value> = request
            .headers()
            .iter()
            .map(|(name, value)| (name.clone(), String::from_utf8_lossy(value).into_owned().into()))
            .collect();
        return Response::json(
            200,
            &serde_json::json!({
                "method": request.method(),
                "path": request.path(),
                "query": request.query(),
                "base": request.base(),
                "headers": headers,
            }),
        );
    }
    let content_type = request
        .header("content-type")
        .unwrap_or("application/octet-stream")
        .to_owned();
    let Some(mut body) = request.take_body() else {
        return Response::new(200, Vec::new());
    };
    Response::stream(200, move |out| {
        while let Some(chunk) = body.chunk()? {
            std::io::Write::write_all(out, &chunk)?;
        }
        Ok(())
    })
    .with_header("content-type", content_type)
}

marina_sdk::app!(handle);
