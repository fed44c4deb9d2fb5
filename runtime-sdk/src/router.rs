//! A small router: method + path pattern with `:param` and a trailing `*` segment, first match wins.

use std::collections::BTreeMap;

use crate::{Request, Response};

type Handler = Box<dyn Fn(Request) -> Response>;

struct Route {
    method: Option<String>,
    segments: Vec<Segment>,
    handler: Handler,
}

enum Segment {
    Literal(String),
    Param(String),
    Rest,
}

/// Routes requests to handlers by method and path. A path that matches no route is a 404 JSON error; a path that
/// matches only under other methods is a 405 with `Allow`.
#[derive(Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new() -> Router {
        Router::default()
    }

    /// Adds a route for one method (`"GET"`, ...) or, with `"*"`, for any method. In the pattern, `:name` captures
    /// one segment and a final `*` captures the rest of the path (without its leading `/`) as `*`.
    pub fn route(mut self, method: &str, pattern: &str, handler: impl Fn(Request) -> Response + 'static) -> Router {
        let segments = split(pattern)
            .map(|segment| match segment {
                "*" => Segment::Rest,
                _ => match segment.strip_prefix(':') {
                    Some(name) => Segment::Param(name.to_owned()),
                    None => Segment::Literal(segment.to_owned()),
                },
            })
            .collect();
        let method = (method != "*").then(|| method.to_ascii_uppercase());
        self.routes.push(Route {
            method,
            segments,
            handler: Box::new(handler),
        });
        self
    }

    pub fn get(self, pattern: &str, handler: impl Fn(Request) -> Response + 'static) -> Router {
        self.route("GET", pattern, handler)
    }

    pub fn post(self, pattern: &str, handler: impl Fn(Request) -> Response + 'static) -> Router {
        self.route("POST", pattern, handler)
    }

    pub fn put(self, pattern: &str, handler: impl Fn(Request) -> Response + 'static) -> Router {
        self.route("PUT", pattern, handler)
    }

    pub fn patch(self, pattern: &str, handler: impl Fn(Request) -> Response + 'static) -> Router {
        self.route("PATCH", pattern, handler)
    }

    pub fn delete(self, pattern: &str, handler: impl Fn(Request) -> Response + 'static) -> Router {
        self.route("DELETE", pattern, handler)
    }

    pub fn any(self, pattern: &str, handler: impl Fn(Request) -> Response + 'static) -> Router {
        self.route("*", pattern, handler)
    }

    /// Runs the first route that matches; `GET` routes also answer `HEAD`.
    pub fn handle(&self, mut request: Request) -> Response {
        let mut allowed = Vec::new();
        for route in &self.routes {
            let Some(params) = matches(&route.segments, request.path()) else {
                continue;
            };
            let method_matches = match &route.method {
                None => true,
                Some(method) => method == request.method() || (method == "GET" && request.method() == "HEAD"),
            };
            if method_matches {
                request.set_params(params);
                return (route.handler)(request);
            }
            allowed.extend(route.method.clone());
        }
        if allowed.is_empty() {
            Response::error(404, &format!("no route for {}", request.path()))
        } else {
            allowed.dedup();
            Response::error(405, &format!("{} is not allowed here", request.method()))
                .with_header("allow", allowed.join(", "))
        }
    }
}

fn split(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|segment| !segment.is_empty())
}

fn matches(pattern: &[Segment], path: &str) -> Option<BTreeMap<String, String>> {
    let mut params = BTreeMap::new();
    let mut parts = split(path);
    for (i, segment) in pattern.iter().enumerate() {
        match segment {
            Segment::Rest => {
                let rest: Vec<&str> = parts.by_ref().collect();
                params.insert("*".to_owned(), rest.join("/"));
                return (i == pattern.len() - 1).then_some(params);
            }
            Segment::Literal(literal) => {
                if parts.next()? != literal {
                    return None;
                }
            }
            Segment::Param(name) => {
                let value = parts.next()?;
                params.insert(name.clone(), crate::decode_component(value));
            }
        }
    }
    parts.next().is_none().then_some(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(p: &str) -> Vec<Segment> {
        split(p)
            .map(|s| match s {
                "*" => Segment::Rest,
                _ => match s.strip_prefix(':') {
                    Some(n) => Segment::Param(n.into()),
                    None => Segment::Literal(s.into()),
                },
            })
            .collect()
    }

    #[test]
    fn params_and_rest_segments_capture_the_path() {
        let params = matches(&pattern("/todos/:id"), "/todos/42").unwrap();
        assert_eq!(params["id"], "42");
        assert!(matches(&pattern("/todos/:id"), "/todos/42/x").is_none());
        assert!(matches(&pattern("/todos/:id"), "/todos").is_none());
        let params = matches(&pattern("/files/*"), "/files/a/b.txt").unwrap();
        assert_eq!(params["*"], "a/b.txt");
        assert!(matches(&pattern("/"), "/").is_some());
        assert_eq!(
            matches(&pattern("/greet/:name"), "/greet/J%C3%BC").unwrap()["name"],
            "Jü"
        );
    }
}
