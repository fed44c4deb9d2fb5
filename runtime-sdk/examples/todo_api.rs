//! `todo-api`: JSON CRUD over an in-memory list. Run it with `ttl > 0`: the list lives as long as the warm
//! instance that holds it (a real app would keep it in a database).

use std::cell::RefCell;
use std::collections::BTreeMap;

use marina_sdk::{Request, Response, Router};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize)]
struct Todo {
    id: u64,
    title: String,
    done: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTodo {
    title: String,
    #[serde(default)]
    done: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TodoPatch {
    title: Option<String>,
    done: Option<bool>,
}

#[derive(Default)]
struct Store {
    next_id: u64,
    todos: BTreeMap<u64, Todo>,
}

thread_local! {
    static STORE: RefCell<Store> = RefCell::new(Store::default());
}

/// Titles longer than this are refused: an in-memory store must not be a way to exhaust the instance.
const MAX_TITLE_CHARS: usize = 500;

fn id_of(request: &Request) -> Result<u64, Response> {
    request
        .param("id")
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| Response::error(400, "the id must be a positive integer"))
}

fn check_title(title: &str) -> Result<(), Response> {
    if title.trim().is_empty() {
        return Err(Response::error(422, "title must not be empty"));
    }
    if title.chars().count() > MAX_TITLE_CHARS {
        return Err(Response::error(
            422,
            &format!("title is longer than {MAX_TITLE_CHARS} characters"),
        ));
    }
    Ok(())
}

fn list(_: Request) -> Response {
    STORE.with_borrow(|store| Response::json(200, &store.todos.values().collect::<Vec<_>>()))
}

fn create(mut request: Request) -> Response {
    let new: NewTodo = match request.json() {
        Ok(new) => new,
        Err(response) => return response,
    };
    if let Err(response) = check_title(&new.title) {
        return response;
    }
    let todo = STORE.with_borrow_mut(|store| {
        store.next_id += 1;
        let todo = Todo {
            id: store.next_id,
            title: new.title,
            done: new.done,
        };
        store.todos.insert(todo.id, todo.clone());
        todo
    });
    let location = format!("{}/todos/{}", request.base(), todo.id);
    Response::json(201, &todo).with_header("location", location)
}

fn show(request: Request) -> Response {
    let id = match id_of(&request) {
        Ok(id) => id,
        Err(response) => return response,
    };
    STORE.with_borrow(|store| match store.todos.get(&id) {
        Some(todo) => Response::json(200, todo),
        None => Response::error(404, &format!("no todo {id}")),
    })
}

fn update(mut request: Request) -> Response {
    let id = match id_of(&request) {
        Ok(id) => id,
        Err(response) => return response,
    };
    let patch: TodoPatch = match request.json() {
        Ok(patch) => patch,
        Err(response) => return response,
    };
    if let Some(Err(response)) = patch.title.as_deref().map(check_title) {
        return response;
    }
    STORE.with_borrow_mut(|store| match store.todos.get_mut(&id) {
        Some(todo) => {
            if let Some(title) = patch.title {
                todo.title = title;
            }
            if let Some(done) = patch.done {
                todo.done = done;
            }
            Response::json(200, todo)
        }
        None => Response::error(404, &format!("no todo {id}")),
    })
}

fn remove(request: Request) -> Response {
    let id = match id_of(&request) {
        Ok(id) => id,
        Err(response) => return response,
    };
    STORE.with_borrow_mut(|store| match store.todos.remove(&id) {
        Some(_) => Response::new(204, Vec::new()),
        None => Response::error(404, &format!("no todo {id}")),
    })
}

fn routes() -> Router {
    Router::new()
        .get("/todos", list)
        .post("/todos", create)
        .get("/todos/:id", show)
        .put("/todos/:id", update)
        .patch("/todos/:id", update)
        .delete("/todos/:id", remove)
}

marina_sdk::app!(router = routes);
