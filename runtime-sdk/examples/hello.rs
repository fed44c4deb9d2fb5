//! `hello`: the smallest useful app. `/` greets, `/greet/:name` answers JSON, `/links` shows the mount base.

use marina_sdk::{Response, Router};

fn routes() -> Router {
    Router::new()
        .get("/", |_| {
            let greeting = marina_sdk::env("GREETING").unwrap_or_else(|| "Hello".to_owned());
            Response::text(200, format!("{greeting} from hello@{}\n", marina_sdk::app_version()))
        })
        .get("/greet/:name", |request| {
            let name = request.param("name").unwrap_or("world");
            Response::json(
                200,
                &serde_json::json!({ "greeting": format!("Hello, {name}!"), "version": marina_sdk::app_version() }),
            )
        })
        .get("/links", |request| {
            Response::json(200, &serde_json::json!({ "self": format!("{}/links", request.base()) }))
        })
}

marina_sdk::app!(router = routes);
