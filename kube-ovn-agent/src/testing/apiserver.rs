//! A small Kubernetes API server for the kube source tests and the control-plane benchmark, speaking the real list/watch wire
//! protocol over HTTP/1.1:
//!
//! - list: a typed `…List` with `metadata.resourceVersion`, items without apiVersion/kind,
//!   `limit`/`continue` paging from a consistent snapshot, `410 Expired` for an expired token;
//! - watch (`?watch=true&resourceVersion=…&allowWatchBookmarks=true`): newline-delimited
//!   `{"type":…,"object":…}` events (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR) replayed from an
//!   event history after the requested resourceVersion, then live; an ERROR event with a `410
//!   Expired` Status when that resourceVersion was compacted away (as the apiserver's watch cache
//!   does);
//! - field selectors (`spec.nodeName=n1`) and label selectors (`!key`, `key`, `key=value`),
//!   with the DELETED an object leaving the selection produces;
//! - `404 NotFound` for a resource the "cluster" does not serve.
//!
//! One resourceVersion counter spans all resources, as etcd's revision does.
//!
//! The real kube-apiserver of `tests/real_apiserver.rs` (docs/testbed.md) is the reference for
//! everything it can do on demand. This server stays for the faults a real one does not produce
//! when a test asks: a watch dropped or closed mid-stream, a `410` ERROR event on an open watch, an
//! expired `continue` token in the middle of a paged list, a bookmark at a chosen moment, an API
//! that appears while the agent runs, and counting each list and watch request.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    sync::{Arc, Mutex, MutexGuard},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{StatusCode, header},
    response::Response,
    serve::ListenerExt as _,
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Subnets,
    Services,
    Nodes,
    ServiceCidrs,
    Pods,
}

impl Resource {
    pub const ALL: [Self; 5] = [
        Self::Subnets,
        Self::Services,
        Self::Nodes,
        Self::ServiceCidrs,
        Self::Pods,
    ];

    fn path(self) -> &'static str {
        match self {
            Self::Subnets => "/apis/kubeovn.io/v1/subnets",
            Self::Services => "/api/v1/services",
            Self::Nodes => "/api/v1/nodes",
            Self::ServiceCidrs => "/apis/networking.k8s.io/v1/servicecidrs",
            Self::Pods => "/api/v1/pods",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Subnets => "kubeovn.io/v1",
            Self::Services | Self::Nodes | Self::Pods => "v1",
            Self::ServiceCidrs => "networking.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Subnets => "Subnet",
            Self::Services => "Service",
            Self::Nodes => "Node",
            Self::ServiceCidrs => "ServiceCIDR",
            Self::Pods => "Pod",
        }
    }

    fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.path() == path)
    }
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub resource: Option<Resource>,
    pub watch: bool,
    pub resource_version: Option<String>,
    pub continue_token: Option<String>,
    pub field_selector: Option<String>,
    pub label_selector: Option<String>,
    pub status: u16,
}

/// How open watches end in [`ApiServer::disconnect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The connection breaks mid-stream (no final chunk).
    Drop,
    /// The server ends the response cleanly, as when `timeoutSeconds` expires.
    Close,
    /// An ERROR event with a `410 Expired` Status, then a clean end.
    Expire,
}

enum Frame {
    Line(String),
    Close,
    Drop,
}

struct Watcher {
    resource: Resource,
    selector: Selector,
    bookmarks: bool,
    /// The last resourceVersion sent on this watch: where a client resumes.
    sent: u64,
    tx: mpsc::UnboundedSender<Frame>,
}

struct Change {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    old: Option<Value>,
    object: Value,
}

struct Page {
    rv: u64,
    rest: Vec<Arc<str>>,
}

/// An object and its JSON as a list item (without apiVersion/kind), serialised by the first
/// list that serves it and kept, as the apiserver's watch cache keeps objects: a list then
/// copies bytes instead of cloning and re-serialising every object, so the benchmarks time the
/// client rather than this server (a write pays nothing more).
struct Stored {
    value: Value,
    item: std::sync::OnceLock<Arc<str>>,
}

impl Stored {
    fn new(value: Value) -> Self {
        Self {
            value,
            item: std::sync::OnceLock::new(),
        }
    }

    fn item(&self) -> Arc<str> {
        self.item
            .get_or_init(|| {
                let mut item = self.value.clone();
                // Items of a typed list carry no apiVersion/kind.
                if let Some(map) = item.as_object_mut() {
                    map.remove("apiVersion");
                    map.remove("kind");
                }
                item.to_string().into()
            })
            .clone()
    }
}

pub struct Cluster {
    rv: u64,
    served: HashSet<Resource>,
    objects: HashMap<Resource, BTreeMap<String, Stored>>,
    history: Vec<Change>,
    /// Watches from a resourceVersion older than this get `410 Expired`.
    compacted: u64,
    watchers: Vec<Watcher>,
    requests: Vec<Seen>,
    pages: HashMap<String, Page>,
    expire_next_continue: bool,
    /// Per resource, where the watches ended by the last `disconnect` stood.
    last_disconnect: HashMap<Resource, u64>,
}

fn key(object: &Value) -> String {
    let meta = &object["metadata"];
    match (meta["namespace"].as_str(), meta["name"].as_str()) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.to_owned(),
        _ => panic!("object without a name: {object}"),
    }
}

/// A list or watch request's selection: `field=value` terms, and label terms `key`, `!key`,
/// `key=value`.
#[derive(Clone, Debug, Default)]
struct Selector {
    fields: Vec<(String, String)>,
    labels: Vec<LabelTerm>,
}

#[derive(Clone, Debug)]
enum LabelTerm {
    Exists(String),
    NotExists(String),
    Equals(String, String),
}

impl LabelTerm {
    fn parse(term: &str) -> Self {
        if let Some(key) = term.strip_prefix('!') {
            Self::NotExists(key.to_owned())
        } else if let Some((key, value)) = term.split_once('=') {
            Self::Equals(key.to_owned(), value.trim_start_matches('=').to_owned())
        } else {
            Self::Exists(term.to_owned())
        }
    }
}

fn matches(selector: &Selector, object: &Value) -> bool {
    let fields = selector.fields.iter().all(|(path, want)| {
        let value = path.split('.').fold(object, |v, field| &v[field]);
        value.as_str() == Some(want.as_str())
    });
    let labels = &object["metadata"]["labels"];
    fields
        && selector.labels.iter().all(|term| match term {
            LabelTerm::Exists(key) => !labels[key].is_null(),
            LabelTerm::NotExists(key) => labels[key].is_null(),
            LabelTerm::Equals(key, want) => labels[key].as_str() == Some(want.as_str()),
        })
}

/// The event type a watcher with `selector` sees for a change, if any.
fn event_for(selector: &Selector, change: &Change) -> Option<&'static str> {
    let now = matches(selector, &change.object);
    let before = change.old.as_ref().is_some_and(|o| matches(selector, o));
    match (change.kind, before, now) {
        ("DELETED", true, _) | ("MODIFIED", true, false) => Some("DELETED"),
        ("MODIFIED", false, true) => Some("ADDED"),
        (kind, _, true) if kind != "DELETED" => Some(kind),
        _ => None,
    }
}

fn line(kind: &str, object: &Value) -> String {
    format!("{}\n", json!({"type": kind, "object": object}))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

impl Cluster {
    fn send(&mut self, change: &Change) {
        self.watchers.retain_mut(|w| {
            if w.resource != change.resource {
                return true;
            }
            let Some(kind) = event_for(&w.selector, change) else {
                return true;
            };
            w.sent = change.rv;
            w.tx.send(Frame::Line(line(kind, &change.object))).is_ok()
        });
    }

    fn record(
        &mut self,
        resource: Resource,
        kind: &'static str,
        old: Option<Value>,
        object: Value,
    ) {
        let change = Change {
            rv: self.rv,
            resource,
            kind,
            old,
            object,
        };
        self.send(&change);
        self.history.push(change);
    }

    /// Creates or updates an object (ADDED or MODIFIED), as `kubectl apply` would.
    pub fn apply(&mut self, resource: Resource, object: &impl Serialize) {
        let mut object = serde_json::to_value(object).expect("object serializes");
        self.rv += 1;
        let rv = self.rv;
        let map = object.as_object_mut().expect("an object");
        map.insert("apiVersion".into(), resource.api_version().into());
        map.insert("kind".into(), resource.kind().into());
        let meta = map
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("metadata");
        meta.insert("resourceVersion".into(), rv.to_string().into());
        meta.entry("uid")
            .or_insert_with(|| format!("00000000-0000-0000-0000-{rv:012}").into());
        meta.entry("creationTimestamp")
            .or_insert_with(|| "2025-01-01T00:00:00Z".into());
        // What a real server returns and the agent must not keep.
        meta.insert(
            "managedFields".into(),
            json!([{"manager": "kubectl", "operation": "Update", "apiVersion": resource.api_version(),
                    "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]),
        );
        meta.entry("annotations")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("annotations")
            .insert(
                "kubectl.kubernetes.io/last-applied-configuration".into(),
                "{\"apiVersion\":\"v1\"}".into(),
            );
        let old = self
            .objects
            .entry(resource)
            .or_default()
            .insert(key(&object), Stored::new(object.clone()))
            .map(|old| old.value);
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.record(resource, kind, old, object);
    }

    /// Deletes an object by `namespace/name` (or `name`).
    pub fn delete(&mut self, resource: Resource, name: &str) {
        let mut object = self
            .objects
            .entry(resource)
            .or_default()
            .remove(name)
            .unwrap_or_else(|| panic!("no {resource:?} {name}"))
            .value;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.record(resource, "DELETED", Some(object.clone()), object);
    }

    pub fn serve(&mut self, resource: Resource, served: bool) {
        if served {
            self.served.insert(resource);
        } else {
            self.served.remove(&resource);
        }
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that asked for them.
    pub fn bookmark(&mut self) {
        let rv = self.rv;
        self.watchers.retain_mut(|w| {
            if !w.bookmarks {
                return true;
            }
            w.sent = rv;
            let object = json!({
                "kind": w.resource.kind(),
                "apiVersion": w.resource.api_version(),
                "metadata": {"resourceVersion": rv.to_string()},
            });
            w.tx.send(Frame::Line(line("BOOKMARK", &object))).is_ok()
        });
    }

    /// Forgets the event history: watches from an older resourceVersion get `410 Expired`.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
    }

    /// Ends every open watch.
    pub fn end_watches(&mut self, how: End) {
        self.last_disconnect.clear();
        for w in self.watchers.drain(..) {
            self.last_disconnect.insert(w.resource, w.sent);
            let _ = match how {
                End::Drop => w.tx.send(Frame::Drop),
                End::Close => w.tx.send(Frame::Close),
                End::Expire => {
                    let expired = status(
                        410,
                        "Expired",
                        &format!("too old resource version: {} ({})", w.sent, self.rv),
                    );
                    let _ = w.tx.send(Frame::Line(line("ERROR", &expired)));
                    w.tx.send(Frame::Close)
                }
            };
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Serialises every object's list item now (see [`Stored`]), so the next lists only copy
    /// bytes: the benchmarks call it after loading a cluster, outside what they time, as a
    /// real API server on another machine has its objects at hand before an agent starts.
    pub fn warm_lists(&self) {
        for object in self.objects.values().flat_map(BTreeMap::values) {
            object.item();
        }
    }

    pub fn expire_next_continue(&mut self) {
        self.expire_next_continue = true;
    }

    fn list(&mut self, resource: Resource, query: &Query) -> (StatusCode, Body) {
        let (rv, mut items) = if let Some(token) = &query.continue_token {
            if std::mem::take(&mut self.expire_next_continue) {
                self.pages.remove(token);
                return (
                    StatusCode::GONE,
                    Body::from(
                        status(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a \
                             consistent list result. You can start a new list without the \
                             continue parameter.",
                        )
                        .to_string(),
                    ),
                );
            }
            let Some(page) = self.pages.remove(token) else {
                return (
                    StatusCode::BAD_REQUEST,
                    Body::from(status(400, "BadRequest", "continue key is not valid").to_string()),
                );
            };
            (page.rv, page.rest)
        } else {
            let items = self
                .objects
                .get(&resource)
                .into_iter()
                .flat_map(BTreeMap::values)
                .filter(|o| matches(&query.selector, &o.value))
                .map(Stored::item)
                .collect();
            (self.rv, items)
        };
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if let Some(limit) = query.limit.filter(|l| *l > 0 && *l < items.len()) {
            let rest = items.split_off(limit);
            let token = format!(
                "{resource:?}-{rv}-{}",
                self.pages.len() + self.requests.len()
            );
            metadata["remainingItemCount"] = rest.len().into();
            metadata["continue"] = token.clone().into();
            self.pages.insert(token, Page { rv, rest });
        }
        let mut list = json!({
            "kind": format!("{}List", resource.kind()),
            "apiVersion": resource.api_version(),
            "metadata": metadata,
        })
        .to_string();
        list.pop();
        list.reserve(items.iter().map(|i| i.len() + 1).sum::<usize>() + 12);
        list.push_str(",\"items\":[");
        for (n, item) in items.iter().enumerate() {
            if n > 0 {
                list.push(',');
            }
            list.push_str(item);
        }
        list.push_str("]}");
        (StatusCode::OK, Body::from(list))
    }

    fn watch(
        &mut self,
        resource: Resource,
        query: &Query,
    ) -> Result<mpsc::UnboundedReceiver<Frame>, (StatusCode, Value)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let from = query
            .resource_version
            .as_deref()
            .filter(|v| !v.is_empty() && *v != "0")
            .map(str::parse::<u64>);
        let from = match from {
            None => None,
            Some(Ok(rv)) => Some(rv),
            Some(Err(_)) => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    status(400, "BadRequest", "invalid resourceVersion"),
                ));
            }
        };
        let mut watcher = Watcher {
            resource,
            selector: query.selector.clone(),
            bookmarks: query.bookmarks,
            sent: from.unwrap_or(self.rv),
            tx,
        };
        match from {
            Some(rv) if rv < self.compacted => {
                let expired = status(
                    410,
                    "Expired",
                    &format!("too old resource version: {rv} ({})", self.compacted),
                );
                let _ = watcher.tx.send(Frame::Line(line("ERROR", &expired)));
                let _ = watcher.tx.send(Frame::Close);
                return Ok(rx);
            }
            Some(rv) => {
                for change in self
                    .history
                    .iter()
                    .filter(|c| c.rv > rv && c.resource == resource)
                {
                    if let Some(kind) = event_for(&watcher.selector, change) {
                        watcher.sent = change.rv;
                        let _ = watcher.tx.send(Frame::Line(line(kind, &change.object)));
                    }
                }
            }
            // "Any" resourceVersion: the current state as ADDED events.
            None => {
                for object in self
                    .objects
                    .get(&resource)
                    .into_iter()
                    .flat_map(BTreeMap::values)
                {
                    if matches(&watcher.selector, &object.value) {
                        let _ = watcher.tx.send(Frame::Line(line("ADDED", &object.value)));
                    }
                }
            }
        }
        self.watchers.push(watcher);
        Ok(rx)
    }
}

#[derive(Default)]
struct Query {
    watch: bool,
    resource_version: Option<String>,
    continue_token: Option<String>,
    limit: Option<usize>,
    bookmarks: bool,
    field_selector: Option<String>,
    label_selector: Option<String>,
    selector: Selector,
}

fn parse_query(query: Option<&str>) -> Query {
    let mut q = Query::default();
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "watch" => q.watch = v == "true" || v == "1",
            "resourceVersion" => q.resource_version = Some(v.into_owned()),
            "continue" => q.continue_token = Some(v.into_owned()),
            "limit" => q.limit = v.parse().ok(),
            "allowWatchBookmarks" => q.bookmarks = v == "true",
            "fieldSelector" => {
                q.selector.fields = v
                    .split(',')
                    .filter_map(|term| term.split_once('='))
                    .map(|(f, want)| (f.to_owned(), want.to_owned()))
                    .collect();
                q.field_selector = Some(v.into_owned());
            }
            "labelSelector" => {
                q.selector.labels = v
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(LabelTerm::parse)
                    .collect();
                q.label_selector = Some(v.into_owned());
            }
            _ => {}
        }
    }
    q
}

type Shared = Arc<Mutex<Cluster>>;

fn json_response(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("response")
}

async fn handle(State(shared): State<Shared>, request: Request) -> Response {
    let uri = request.uri().clone();
    let query = parse_query(uri.query());
    let resource = Resource::from_path(uri.path());
    let mut cluster = shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let served = resource.filter(|r| cluster.served.contains(r));
    let mut seen = Seen {
        resource,
        watch: query.watch,
        resource_version: query.resource_version.clone(),
        continue_token: query.continue_token.clone(),
        field_selector: query.field_selector.clone(),
        label_selector: query.label_selector.clone(),
        status: 200,
    };
    let response = match served {
        None => {
            let body = status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
            seen.status = 404;
            json_response(StatusCode::NOT_FOUND, &body)
        }
        Some(resource) if query.watch => match cluster.watch(resource, &query) {
            Ok(rx) => {
                let body = futures::stream::unfold(rx, |mut rx| async move {
                    match rx.recv().await? {
                        Frame::Line(line) => Some((Ok(Bytes::from(line)), rx)),
                        Frame::Close => None,
                        Frame::Drop => Some((
                            Err(io::Error::new(io::ErrorKind::ConnectionAborted, "dropped")),
                            rx,
                        )),
                    }
                });
                Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from_stream(body))
                    .expect("response")
            }
            Err((code, body)) => {
                seen.status = code.as_u16();
                json_response(code, &body)
            }
        },
        Some(resource) => {
            let (code, body) = cluster.list(resource, &query);
            seen.status = code.as_u16();
            Response::builder()
                .status(code)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
                .expect("response")
        }
    };
    cluster.requests.push(seen);
    response
}

/// A running server; stops when dropped.
pub struct ApiServer {
    url: String,
    shared: Shared,
    task: JoinHandle<()>,
}

impl ApiServer {
    /// Serves every resource but `unserved`.
    pub async fn start(unserved: &[Resource]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the test API server");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let shared = Arc::new(Mutex::new(Cluster {
            rv: 100,
            served: Resource::ALL
                .into_iter()
                .filter(|r| !unserved.contains(r))
                .collect(),
            objects: HashMap::new(),
            history: Vec::new(),
            compacted: 0,
            watchers: Vec::new(),
            requests: Vec::new(),
            pages: HashMap::new(),
            expire_next_continue: false,
            last_disconnect: HashMap::new(),
        }));
        let app = Router::new().fallback(handle).with_state(shared.clone());
        // As Go's net/http (the real API server) does: without it, a watch event written
        // while the previous one is unacknowledged waits out the client's delayed ACK (40 ms).
        let listener = listener.tap_io(|stream| {
            let _ = stream.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("test API server");
        });
        Self { url, shared, task }
    }

    /// `http://127.0.0.1:PORT`, in the network namespace the server was started in.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().expect("server URL"));
        kube::Client::try_from(config).expect("client for the test API server")
    }

    /// The server's state, for changes made atomically with respect to the client.
    pub fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.cluster().requests.clone()
    }

    /// Successful list requests for `resource` (first pages only).
    pub fn lists(&self, resource: Resource) -> usize {
        self.requests()
            .iter()
            .filter(|r| {
                r.resource == Some(resource)
                    && !r.watch
                    && r.continue_token.is_none()
                    && r.status == 200
            })
            .count()
    }

    /// Watch requests for `resource`, in order.
    pub fn watches(&self, resource: Resource) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|r| r.resource == Some(resource) && r.watch)
            .collect()
    }

    pub fn live_watches(&self, resource: Resource) -> usize {
        self.cluster()
            .watchers
            .iter()
            .filter(|w| w.resource == resource && !w.tx.is_closed())
            .count()
    }

    /// Where each resource's watches stood when the last `end_watches` ended them.
    pub fn last_disconnect(&self, resource: Resource) -> Option<u64> {
        self.cluster().last_disconnect.get(&resource).copied()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
