//! `--source file:PATH`: the cluster from a kubectl-style YAML file, re-read when it changes.
//!
//! The file holds the objects the agent reads (Subnet, Service, Node, ServiceCIDR, Pod) as one or
//! more YAML documents; a document may also be a `kind: List` (what `kubectl get … -o yaml` prints)
//! or a typed list such as `SubnetList` (what the API returns). [`parse_objects`] turns text into a
//! [`Snapshot`] and the objects it rejects, without I/O; [`start`] reads the file, then polls it
//! and swaps in each new version that parses. A file that cannot be read as a whole (invalid YAML,
//! not UTF-8, too large, empty) is rejected: the last good snapshot stays. One bad object (unknown
//! kind, a missing or mistyped field, a duplicate, or something the translation would skip or
//! partly ignore) is rejected alone, as Kube-OVN's controller leaves one bad Subnet unprocessed and
//! carries on: the rest of the version is applied and the object keeps its last good version if it
//! had one. Each rejection is counted on its kind and logged in one line naming the file, the
//! document and the object.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
    io::{self, Read},
    os::unix::fs::{FileTypeExt as _, MetadataExt, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service},
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use serde_saphyr::Spanned;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::{
    ClusterSource, Feed, Running, SourceStatus,
    kube::{trim_node, trim_pod, trim_service, trim_service_cidr, trim_subnet},
};
use crate::{
    cluster::{Kind, Snapshot, Subnet, ignored_by_kube_proxy, object_name},
    translate::{self, Issue},
};

/// Files larger than this are rejected unless the limit is raised.
pub const DEFAULT_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// How often the file is checked for a new version.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a version holding less than half the objects in force must stay unchanged before
/// it is applied (see [`FileOptions::shrink_hold`]).
pub const DEFAULT_SHRINK_HOLD: Duration = Duration::from_secs(30);
/// A shrink is suspicious only from this many objects in force: small test clusters shrink by
/// half legitimately.
const SHRINK_MIN_OBJECTS: usize = 10;

/// Where an object sits in a file: the 1-based YAML document, the 1-based item of a list
/// document, and the line the document starts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub document: usize,
    pub item: Option<usize>,
    pub line: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(item) = self.item {
            write!(f, " item {item}")?;
        }
        write!(f, " (line {})", self.line)
    }
}

/// A translation issue and where its object is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocatedIssue {
    pub at: Option<Position>,
    pub issue: Issue,
}

impl fmt::Display for LocatedIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.at {
            Some(at) => write!(f, "{at}: {}", self.issue),
            None => write!(f, "{}", self.issue),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {op}: {source}", file.display())]
    Io {
        op: &'static str,
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A FIFO, socket or device: opening a FIFO would block until a writer appears.
    #[error(
        "{}: not a regular file ({what}); point --source file: at a regular file (or a symlink \
         to one) and replace it by renaming a complete new file over it",
        file.display()
    )]
    NotRegular { file: PathBuf, what: &'static str },
    #[error("{}: {size} bytes is more than the limit of {limit} bytes", file.display())]
    TooLarge {
        file: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{}: not UTF-8 text (invalid byte at offset {offset})", file.display())]
    NotUtf8 { file: PathBuf, offset: usize },
    #[error("{}: invalid YAML: {message}", file.display())]
    Yaml {
        file: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
    /// An object that cannot be accepted: unknown kind, wrong apiVersion, a missing or mistyped
    /// field, a duplicate.
    #[error("{}: {at}: {object}: {problem}", file.display())]
    Object {
        file: PathBuf,
        at: Position,
        /// `Kind namespace/name`, as far as known.
        object: String,
        kind: Option<Kind>,
        problem: String,
    },
    /// Objects the translation would have to skip or partly ignore.
    #[error("{}: {}{}", file.display(), issues[0], more(issues.len()))]
    Invalid {
        file: PathBuf,
        issues: Vec<LocatedIssue>,
    },
    /// No document at all: more likely a file being written than a cluster without objects.
    #[error(
        "{}: no objects (an empty cluster is `kind: List` with `items: []`)",
        file.display()
    )]
    Empty { file: PathBuf },
    /// A version that drops more than half the objects in force, held in case it is a partial
    /// write.
    #[error(
        "{}: {after} objects where {before} are in force: held for {}s in case it is a partial \
         write, applied if it stays unchanged that long (write the file under another name and \
         rename it over)",
        file.display(),
        hold.as_secs()
    )]
    Held {
        file: PathBuf,
        before: usize,
        after: usize,
        hold: Duration,
    },
    #[error("the file source must be started from within a tokio runtime")]
    NoRuntime,
}

fn more(count: usize) -> String {
    match count {
        0 | 1 => String::new(),
        2 => " (and 1 more problem)".into(),
        n => format!(" (and {} more problems)", n - 1),
    }
}

impl FileError {
    /// The kind of the offending object, when the error is about one object.
    pub fn kind(&self) -> Option<Kind> {
        match self {
            Self::Object { kind, .. } => *kind,
            Self::Invalid { issues, .. } => issues
                .first()
                .and_then(|i| Kind::ALL.into_iter().find(|k| k.name() == i.issue.kind)),
            _ => None,
        }
    }
}

pub type Result<T, E = FileError> = std::result::Result<T, E>;

/// The kinds a file can hold, by `apiVersion` and `kind`.
fn kind_of(api_version: &str, kind: &str) -> Option<Kind> {
    match (api_version, kind) {
        ("kubeovn.io/v1", "Subnet") => Some(Kind::Subnet),
        ("v1", "Service") => Some(Kind::Service),
        ("v1", "Node") => Some(Kind::Node),
        ("v1", "Pod") => Some(Kind::Pod),
        // v1beta1 (Kubernetes 1.31–1.32) has the same shape as v1.
        ("networking.k8s.io/v1" | "networking.k8s.io/v1beta1", "ServiceCIDR") => {
            Some(Kind::ServiceCidr)
        }
        _ => None,
    }
}

fn expected_api_version(kind: &str) -> Option<&'static str> {
    match kind {
        "Subnet" => Some("kubeovn.io/v1"),
        "Service" | "Node" | "Pod" => Some("v1"),
        "ServiceCIDR" => Some("networking.k8s.io/v1"),
        _ => None,
    }
}

fn namespaced(kind: Kind) -> bool {
    matches!(kind, Kind::Service | Kind::Pod)
}

/// One object left out of a version, and why.
#[derive(Debug)]
pub struct Rejected {
    /// Its kind and `namespace/name`, when the file says enough to know them: a rejected
    /// object that was in force keeps its last good version.
    pub key: Option<(Kind, String)>,
    /// A [`FileError::Object`], or a [`FileError::Invalid`] with this object's issues.
    pub error: FileError,
}

/// A version of the file: the objects accepted and the ones rejected one by one.
#[derive(Debug, Default)]
pub struct Parsed {
    pub snapshot: Snapshot,
    pub rejected: Vec<Rejected>,
}

/// Parses kubectl-style YAML into the objects that decode and pass [`translate::validate`],
/// rejecting the others one by one. `file` only names the source in errors. An error is a
/// problem with the text as a whole.
pub fn parse_objects(text: &str, file: &Path) -> Result<Parsed> {
    let mut parser = Parser {
        file,
        snapshot: Snapshot::default(),
        seen: HashMap::new(),
        rejected: Vec::new(),
    };
    let documents = documents(text, file)?;
    if documents.is_empty() {
        return Err(FileError::Empty {
            file: file.to_owned(),
        });
    }
    for (index, document) in documents.into_iter().enumerate() {
        let at = Position {
            document: index + 1,
            item: None,
            line: document.referenced.line(),
        };
        if let Err(error) = parser.document(document.value, at) {
            parser.rejected.push(Rejected { key: None, error });
        }
    }
    // What the translation would skip or partly ignore is rejected whole, per object.
    let mut by_object: Vec<((Kind, String), Vec<LocatedIssue>)> = Vec::new();
    for issue in translate::validate(&parser.snapshot) {
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.name() == issue.kind) else {
            continue;
        };
        let located = LocatedIssue {
            at: parser
                .seen
                .get(&(issue.kind, issue.object.clone()))
                .copied(),
            issue: issue.clone(),
        };
        match by_object
            .iter_mut()
            .find(|(key, _)| *key == (kind, issue.object.clone()))
        {
            Some((_, issues)) => issues.push(located),
            None => by_object.push(((kind, issue.object), vec![located])),
        }
    }
    for ((kind, name), issues) in by_object {
        remove(&mut parser.snapshot, kind, &name);
        parser.rejected.push(Rejected {
            key: Some((kind, name)),
            error: FileError::Invalid {
                file: file.to_owned(),
                issues,
            },
        });
    }
    Ok(Parsed {
        snapshot: parser.snapshot,
        rejected: parser.rejected,
    })
}

/// Parses like [`parse_objects`] but accepts only a version without a single rejected object:
/// the first object error, or every translation issue, is the error. The unit tests read each
/// rejection's message through it.
#[cfg(test)]
fn parse(text: &str, file: &Path) -> Result<Snapshot> {
    let parsed = parse_objects(text, file)?;
    let mut issues = Vec::new();
    for rejected in parsed.rejected {
        match rejected.error {
            FileError::Invalid { issues: some, .. } => issues.extend(some),
            error => return Err(error),
        }
    }
    if !issues.is_empty() {
        issues.sort_by_key(|i| i.at.map(|at| (at.document, at.item)));
        return Err(FileError::Invalid {
            file: file.to_owned(),
            issues,
        });
    }
    Ok(parsed.snapshot)
}

/// Removes the object `kind` `name` (`namespace/name` or `name`) from `snapshot`.
fn remove(snapshot: &mut Snapshot, kind: Kind, name: &str) {
    fn drop_named<T>(v: &mut Vec<Arc<T>>, meta: impl Fn(&T) -> &ObjectMeta, name: &str) {
        v.retain(|o| object_name(meta(o)) != name);
    }
    match kind {
        Kind::Subnet => drop_named(&mut snapshot.subnets, |o| &o.metadata, name),
        Kind::Service => drop_named(&mut snapshot.services, |o| &o.metadata, name),
        Kind::Node => drop_named(&mut snapshot.nodes, |o| &o.metadata, name),
        Kind::ServiceCidr => drop_named(&mut snapshot.service_cidrs, |o| &o.metadata, name),
        Kind::Pod => drop_named(&mut snapshot.pods, |o| &o.metadata, name),
    }
}

/// Puts back into `new` the version in force (in `old`) of each rejected object that `new`
/// lacks: a bad edit of an object must not withdraw what it programmed. Returns, per rejected
/// object, whether its last good version was kept.
fn carry_over(new: &mut Snapshot, old: &Snapshot, rejected: &[Rejected]) -> Vec<bool> {
    fn keep<T>(
        new: &mut Vec<Arc<T>>,
        old: &[Arc<T>],
        meta: impl Fn(&T) -> &ObjectMeta,
        name: &str,
    ) -> bool {
        if new.iter().any(|o| object_name(meta(o)) == name) {
            return false;
        }
        match old.iter().find(|o| object_name(meta(o)) == name) {
            Some(o) => {
                new.push(o.clone());
                true
            }
            None => false,
        }
    }
    let mut kept = Vec::with_capacity(rejected.len());
    for key in rejected.iter().map(|r| r.key.as_ref()) {
        let Some((kind, name)) = key else {
            kept.push(false);
            continue;
        };
        let carried = match kind {
            Kind::Subnet => keep(&mut new.subnets, &old.subnets, |o| &o.metadata, name),
            Kind::Service => keep(&mut new.services, &old.services, |o| &o.metadata, name),
            Kind::Node => keep(&mut new.nodes, &old.nodes, |o| &o.metadata, name),
            Kind::ServiceCidr => keep(
                &mut new.service_cidrs,
                &old.service_cidrs,
                |o| &o.metadata,
                name,
            ),
            Kind::Pod => keep(&mut new.pods, &old.pods, |o| &o.metadata, name),
        };
        kept.push(carried);
    }
    kept
}

/// The YAML documents of `text`, each with the line it starts on.
fn documents(text: &str, file: &Path) -> Result<Vec<Spanned<Value>>> {
    // Our own byte limit bounds the input, so the parser's node, event and document budgets
    // (sized for small configuration files) scale with it; the anchor and alias limits against
    // expansion bombs stay at their defaults.
    let size = text.len();
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: size / 4 + 16,
            max_nodes: size + 1024,
            max_events: 2 * size + 1024,
            max_total_scalar_bytes: size + 1024,
        },
    };
    serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
        let location = e.location();
        FileError::Yaml {
            file: file.to_owned(),
            line: location.map_or(0, |l| l.line()),
            column: location.map_or(0, |l| l.column()),
            message: e.without_snippet().to_string(),
        }
    })
}

struct Parser<'a> {
    file: &'a Path,
    snapshot: Snapshot,
    /// (kind name, `namespace/name`) → where the object is.
    seen: HashMap<(&'static str, String), Position>,
    rejected: Vec<Rejected>,
}

impl Parser<'_> {
    fn error(
        &self,
        at: Position,
        object: String,
        kind: Option<Kind>,
        problem: String,
    ) -> FileError {
        FileError::Object {
            file: self.file.to_owned(),
            at,
            object,
            kind,
            problem,
        }
    }

    fn document(&mut self, value: Value, at: Position) -> Result<()> {
        let Value::Object(mut map) = value else {
            return Err(self.error(
                at,
                "document".into(),
                None,
                format!(
                    "expected a Kubernetes object (a mapping), found {}",
                    type_name(&value)
                ),
            ));
        };
        let (api_version, kind) = self.type_meta(&map, at)?;
        // `kind: List` (kubectl) holds any kinds, each item with its own apiVersion and kind; a
        // typed list (`SubnetList`, the API's list response) holds items of one kind, which
        // usually omit both.
        let item_type = if kind == "List" && api_version == "v1" {
            Some(None)
        } else {
            kind.strip_suffix("List")
                .filter(|k| kind_of(&api_version, k).is_some())
                .map(|k| Some((api_version.clone(), k.to_owned())))
        };
        let Some(item_type) = item_type else {
            self.object(map, &api_version, &kind, at);
            return Ok(());
        };
        let items = match map.remove("items") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(self.error(
                    at,
                    kind,
                    None,
                    format!("items: expected a list, found {}", type_name(&other)),
                ));
            }
        };
        for (index, item) in items.into_iter().enumerate() {
            let at = Position {
                item: Some(index + 1),
                ..at
            };
            // One bad item rejects that item, not the rest of the list.
            if let Err(error) = self.item(item, item_type.as_ref(), &kind, at) {
                self.rejected.push(Rejected { key: None, error });
            }
        }
        Ok(())
    }

    /// One item of a list document; `item_type` is the type a typed list gives its items.
    fn item(
        &mut self,
        item: Value,
        item_type: Option<&(String, String)>,
        list_kind: &str,
        at: Position,
    ) -> Result<()> {
        let Value::Object(mut item) = item else {
            return Err(self.error(
                at,
                format!("{list_kind} item"),
                None,
                format!("expected an object (a mapping), found {}", type_name(&item)),
            ));
        };
        let (api_version, kind) = match item_type {
            None => self.type_meta(&item, at)?,
            Some((api_version, kind)) => {
                // Items may repeat their type; it must then agree with the list's.
                for (field, expected) in [("apiVersion", api_version), ("kind", kind)] {
                    match item.get(field) {
                        None | Some(Value::Null) => {}
                        Some(Value::String(s)) if s == expected => {}
                        Some(other) => {
                            return Err(self.error(
                                at,
                                format!("{kind} {}", name_hint(&item)),
                                kind_of(api_version, kind),
                                format!("{field} {other} in a {kind}List; expected {expected:?}"),
                            ));
                        }
                    }
                }
                item.remove("apiVersion");
                item.remove("kind");
                (api_version.clone(), kind.clone())
            }
        };
        self.object(item, &api_version, &kind, at);
        Ok(())
    }

    /// `apiVersion` and `kind` of an object, both required.
    fn type_meta(&self, map: &Map<String, Value>, at: Position) -> Result<(String, String)> {
        let field = |name: &str| match map.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            None | Some(Value::Null) => Err(format!("{name} is missing")),
            Some(other) => Err(format!("{name}: expected a string, found {other}")),
        };
        let kind = field("kind");
        let object = format!("{} {}", kind.as_deref().unwrap_or("object"), name_hint(map));
        let kind = kind.map_err(|problem| self.error(at, object.clone(), None, problem))?;
        let api_version =
            field("apiVersion").map_err(|problem| self.error(at, object, None, problem))?;
        Ok((api_version, kind))
    }

    /// Accepts one object or rejects it alone (named, when the file names it).
    fn object(&mut self, map: Map<String, Value>, api_version: &str, kind: &str, at: Position) {
        let key = kind_of(api_version, kind).and_then(|k| Some((k, key_hint(&map, k)?)));
        if let Err(error) = self.accept(map, api_version, kind, at) {
            self.rejected.push(Rejected { key, error });
        }
    }

    fn accept(
        &mut self,
        mut map: Map<String, Value>,
        api_version: &str,
        kind: &str,
        at: Position,
    ) -> Result<()> {
        let object = format!("{kind} {}", name_hint(&map));
        let Some(known) = kind_of(api_version, kind) else {
            let problem = match expected_api_version(kind) {
                Some(expected) => format!("apiVersion {api_version:?}; expected {expected:?}"),
                None => format!(
                    "unknown kind {kind:?} (apiVersion {api_version:?}); a cluster file holds \
                     Subnet (kubeovn.io/v1), Service, Node, Pod (v1), ServiceCIDR \
                     (networking.k8s.io/v1) and lists of them"
                ),
            };
            return Err(self.error(at, object, None, problem));
        };
        // Checked above; k8s-openapi would also reject the v1beta1 ServiceCIDR.
        map.remove("apiVersion");
        map.remove("kind");
        let value = Value::Object(map);
        match known {
            Kind::Subnet => {
                let mut subnet: Subnet = self.decode(value, known, &object, at)?;
                if let Some(problem) = subnet.decode_error.take() {
                    return Err(self.error(at, object, Some(known), problem));
                }
                let mut subnet = self.identify(subnet, |s| &mut s.metadata, known, at)?;
                trim_subnet(&mut subnet);
                if subnet.spec.cidr_block.trim().is_empty() {
                    // Required by Kube-OVN's Subnet CRD.
                    return Err(self.required(at, known, &subnet.metadata, "spec.cidrBlock"));
                }
                self.snapshot.subnets.push(Arc::new(subnet));
            }
            Kind::Service => {
                let service: Service = self.decode(value, known, &object, at)?;
                let mut service = self.identify(service, |s| &mut s.metadata, known, at)?;
                // Kept as the kube source keeps it: only what the translation reads.
                trim_service(&mut service);
                let ports = service.spec.as_ref().and_then(|s| s.ports.as_ref());
                // k8s-openapi decodes a missing (required) port as 0, which the API rejects.
                if let Some(i) = ports.into_iter().flatten().position(|p| p.port == 0) {
                    let field = format!("spec.ports[{i}].port");
                    return Err(self.required(at, known, &service.metadata, &field));
                }
                // Left out as kube-proxy's label selector leaves it out (the kube source lists
                // with the same selector).
                if !ignored_by_kube_proxy(&service.metadata) {
                    self.snapshot.services.push(Arc::new(service));
                }
            }
            Kind::Node => {
                let node: Node = self.decode(value, known, &object, at)?;
                let mut node = self.identify(node, |n| &mut n.metadata, known, at)?;
                self.check_addresses(&node, at)?;
                trim_node(&mut node);
                self.snapshot.nodes.push(Arc::new(node));
            }
            Kind::ServiceCidr => {
                let cidr: ServiceCIDR = self.decode(value, known, &object, at)?;
                let mut cidr = self.identify(cidr, |c| &mut c.metadata, known, at)?;
                trim_service_cidr(&mut cidr);
                self.snapshot.service_cidrs.push(Arc::new(cidr));
            }
            Kind::Pod => {
                let pod: Pod = self.decode(value, known, &object, at)?;
                let mut pod = self.identify(pod, |p| &mut p.metadata, known, at)?;
                trim_pod(&mut pod);
                self.snapshot.pods.push(Arc::new(pod));
            }
        }
        Ok(())
    }

    fn decode<T: DeserializeOwned>(
        &self,
        value: Value,
        kind: Kind,
        object: &str,
        at: Position,
    ) -> Result<T> {
        serde_json::from_value(value)
            .map_err(|e| self.error(at, object.to_owned(), Some(kind), e.to_string()))
    }

    /// Checks the name, defaults the namespace as `kubectl create` does, rejects duplicates.
    fn identify<T>(
        &mut self,
        mut object: T,
        meta: impl Fn(&mut T) -> &mut ObjectMeta,
        kind: Kind,
        at: Position,
    ) -> Result<T> {
        let m = meta(&mut object);
        if m.name.as_deref().is_none_or(str::is_empty) {
            return Err(self.error(
                at,
                format!("{} <unnamed>", kind.name()),
                Some(kind),
                "metadata.name is missing".into(),
            ));
        }
        if namespaced(kind) {
            if m.namespace.as_deref().is_none_or(str::is_empty) {
                m.namespace = Some("default".into());
            }
        } else {
            // The API server ignores a namespace on a cluster-scoped object.
            m.namespace = None;
        }
        let name = object_name(m);
        if let Some(first) = self.seen.get(&(kind.name(), name.clone())) {
            let problem = format!("defined twice (first at {first})");
            return Err(self.error(at, format!("{} {name}", kind.name()), Some(kind), problem));
        }
        self.seen.insert((kind.name(), name), at);
        Ok(object)
    }

    fn required(&self, at: Position, kind: Kind, meta: &ObjectMeta, field: &str) -> FileError {
        self.error(
            at,
            format!("{} {}", kind.name(), object_name(meta)),
            Some(kind),
            format!("{field} is missing"),
        )
    }

    /// Node InternalIPs must be IP addresses (the translation would skip a malformed one).
    fn check_addresses(&self, node: &Node, at: Position) -> Result<()> {
        let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        let bad = addresses.into_iter().flatten().find(|a| {
            a.type_ == "InternalIP" && a.address.trim().parse::<std::net::IpAddr>().is_err()
        });
        match bad {
            None => Ok(()),
            Some(bad) => Err(self.error(
                at,
                format!("Node {}", object_name(&node.metadata)),
                Some(Kind::Node),
                format!(
                    "status.addresses: InternalIP {:?} is not an IP address",
                    bad.address
                ),
            )),
        }
    }
}

/// The `namespace/name` (or `name`) an object of `kind` would be known by once accepted: the
/// namespace defaults as [`Parser::identify`] defaults it. `None` without a name.
fn key_hint(map: &Map<String, Value>, kind: Kind) -> Option<String> {
    let meta = map.get("metadata")?;
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())?;
    if !namespaced(kind) {
        return Some(name.to_owned());
    }
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    Some(format!("{namespace}/{name}"))
}

/// `namespace/name` of a raw object, for messages before it is decoded.
fn name_hint(map: &Map<String, Value>) -> String {
    let meta = map.get("metadata");
    let field = |f: &str| meta.and_then(|m| m.get(f)).and_then(Value::as_str);
    match (field("namespace"), field("name")) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.to_owned(),
        _ => "<unnamed>".into(),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn read(path: &Path, max_bytes: u64) -> Result<String> {
    let io = |op| {
        move |source| FileError::Io {
            op,
            file: path.to_owned(),
            source,
        }
    };
    // Non-blocking, so a FIFO cannot hold the open until a writer appears; refused below.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io("open"))?;
    let meta = file.metadata().map_err(io("stat"))?;
    if !meta.is_file() {
        let kind = meta.file_type();
        return Err(FileError::NotRegular {
            file: path.to_owned(),
            what: if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_socket() {
                "a socket"
            } else if kind.is_dir() {
                "a directory"
            } else {
                "a device"
            },
        });
    }
    let size = meta.len();
    let too_large = |size| FileError::TooLarge {
        file: path.to_owned(),
        size,
        limit: max_bytes,
    };
    if size > max_bytes {
        return Err(too_large(size));
    }
    // The file may grow between stat and read: never read more than the limit.
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io("read"))?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| FileError::NotUtf8 {
        file: path.to_owned(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// How to read and watch the file.
#[derive(Clone, Debug)]
pub struct FileOptions {
    pub path: PathBuf,
    /// Larger files are rejected.
    pub max_bytes: u64,
    pub poll_interval: Duration,
    /// A new version with less than half the objects in force (a truncated write that still
    /// parses looks like that) is applied only after it stayed unchanged this long.
    pub shrink_hold: Duration,
    /// When set, only Pods with this `spec.nodeName` are kept (as the kube source watches them).
    pub node_name: Option<String>,
}

impl FileOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            poll_interval: DEFAULT_POLL_INTERVAL,
            shrink_hold: DEFAULT_SHRINK_HOLD,
            node_name: None,
        }
    }
}

/// What identifies a version of the file: a rename or a symlink swap (`ConfigMap` volumes) changes
/// the inode, an in-place write the modification time or size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    size: u64,
}

fn version(path: &Path) -> io::Result<Version> {
    // Follows symlinks: a ConfigMap's `..data` swap shows as a new target inode.
    let m = std::fs::metadata(path)?;
    Ok(Version {
        dev: m.dev(),
        ino: m.ino(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        size: m.size(),
    })
}

/// Reads the file once (an unreadable or invalid file is an error), then re-reads it whenever it
/// changes. Every kind counts as listed from the first read on.
pub fn start(options: FileOptions) -> Result<Running> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| FileError::NoRuntime)?;
    let (feed, changes) = Feed::new(&Kind::ALL);
    let seen = version(&options.path).ok();
    // Read on a thread of its own, as later versions are (on the blocking pool): the text and
    // YAML tree then sit in that thread's arena, which is free as a whole once the thread is
    // done, and the dense copies `apply` makes here do not land among their freed pages.
    // Read on this thread, 100 000 Services kept 732 MiB resident after the first read; on its
    // own thread, 204 MiB (release build, `cargo xtask bench memory`).
    let (parsed, digest) = std::thread::scope(|scope| {
        scope
            .spawn(|| read_version(&options))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    info!(
        file = %options.path.display(),
        "cluster file loaded: {}",
        counts(&parsed.snapshot)
    );
    let shared = Arc::new(Shared {
        snapshot: RwLock::new(Snapshot::default()),
        feed,
        journal: super::Journal::default(),
    });
    let snapshot = shared.settle(parsed);
    shared.apply(snapshot);
    let task = runtime.spawn(poll(shared.clone(), options, seen, digest));
    Ok(Running {
        source: Arc::new(FileSource {
            shared,
            task: task.abort_handle(),
        }),
        changes,
    })
}

/// Reads, parses and validates one version; returns it with a digest of the text.
fn read_version(options: &FileOptions) -> Result<(Parsed, u64)> {
    let text = read(&options.path, options.max_bytes)?;
    let mut parsed = parse_objects(&text, &options.path)?;
    if let Some(node) = &options.node_name {
        parsed.snapshot.pods.retain(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
        });
    }
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    Ok((parsed, hasher.finish()))
}

fn total(snapshot: &Snapshot) -> usize {
    snapshot.subnets.len()
        + snapshot.services.len()
        + snapshot.nodes.len()
        + snapshot.service_cidrs.len()
        + snapshot.pods.len()
}

fn counts(snapshot: &Snapshot) -> String {
    format!(
        "{} Subnets, {} Services, {} Nodes, {} ServiceCIDRs, {} Pods",
        snapshot.subnets.len(),
        snapshot.services.len(),
        snapshot.nodes.len(),
        snapshot.service_cidrs.len(),
        snapshot.pods.len()
    )
}

struct Shared {
    snapshot: RwLock<Snapshot>,
    feed: Arc<Feed>,
    /// Every applied version counts as a new view (its objects are all new allocations).
    journal: super::Journal,
}

impl Shared {
    /// Marks every kind listed with its count and wakes the reconciler.
    fn publish(&self) {
        let snapshot = self
            .snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (kind, objects) in [
            (Kind::Subnet, snapshot.subnets.len()),
            (Kind::Service, snapshot.services.len()),
            (Kind::Node, snapshot.nodes.len()),
            (Kind::ServiceCidr, snapshot.service_cidrs.len()),
            (Kind::Pod, snapshot.pods.len()),
        ] {
            self.feed.listed(kind, objects);
        }
        drop(snapshot);
        self.feed.changed();
    }

    fn objects_in_force(&self) -> usize {
        total(
            &self
                .snapshot
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The snapshot a parsed version stands for: its accepted objects plus the version in force
    /// of each object it rejected. Logs and counts each rejection.
    fn settle(&self, parsed: Parsed) -> Snapshot {
        let Parsed {
            mut snapshot,
            rejected,
        } = parsed;
        let kept = {
            let current = self
                .snapshot
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            carry_over(&mut snapshot, &current, &rejected)
        };
        let mut per_kind: BTreeMap<Kind, usize> = Kind::ALL.into_iter().map(|k| (k, 0)).collect();
        for (rejected, kept) in rejected.iter().zip(kept) {
            let message = rejected.error.to_string();
            let outcome = if kept {
                "its last good version stays in force"
            } else {
                "left out"
            };
            // Object names come from the file: a newline in one must not start a log line.
            warn!(
                "{}; rejected this object alone: {outcome}",
                crate::faults::escape(&message)
            );
            match rejected.error.kind() {
                Some(kind) => {
                    *per_kind.entry(kind).or_default() += 1;
                    self.feed.rejected(kind, message);
                }
                // Not one of our kinds (or not an object at all): on every kind.
                None => {
                    for kind in Kind::ALL {
                        self.feed.rejected(kind, message.clone());
                    }
                }
            }
        }
        for (kind, count) in per_kind {
            self.feed.rejected_now(kind, count);
        }
        snapshot
    }

    /// Counts an error on the offending object's kind, or on every kind when it is about the
    /// whole file.
    fn count(&self, error: &FileError, message: String) {
        match error.kind() {
            Some(kind) => self.feed.error(kind, message),
            None => {
                for kind in Kind::ALL {
                    self.feed.error(kind, message.clone());
                }
            }
        }
    }

    /// Swaps in a new version and publishes it.
    fn apply(&self, snapshot: Snapshot) {
        // The objects were decoded on the reading thread amid the text and YAML tree of the
        // whole file, now freed: the pages they sit on would stay resident for them. Copies
        // made here are dense (and in this thread's arena), and the reading thread's arena is
        // then free as a whole to give back.
        let snapshot = compacted(snapshot);
        let previous = std::mem::replace(
            &mut *self
                .snapshot
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            snapshot,
        );
        // The version read (its text and YAML tree) is gone; the previous one goes now (unless
        // the reconciler still holds it for a pass under way), before the reconciler is woken.
        drop(previous);
        super::release_freed_memory();
        self.journal.reset();
        self.publish();
    }

    /// Counts a rejected version: on the offending object's kind, or on every kind when the
    /// whole file is unusable.
    fn reject(&self, error: &FileError) {
        let message = error.to_string();
        // Object names come from the file: a newline in one must not start a log line.
        warn!(
            "{}; keeping the last good cluster state",
            crate::faults::escape(&message)
        );
        self.count(error, message);
    }
}

/// `snapshot` with every object copied into a new allocation (the originals are dropped).
#[expect(
    clippy::needless_pass_by_value,
    reason = "the originals are freed here"
)]
fn compacted(snapshot: Snapshot) -> Snapshot {
    fn copied<T: Clone>(objects: &[Arc<T>]) -> Vec<Arc<T>> {
        objects.iter().map(|o| Arc::new(T::clone(o))).collect()
    }
    Snapshot {
        subnets: copied(&snapshot.subnets),
        services: copied(&snapshot.services),
        nodes: copied(&snapshot.nodes),
        service_cidrs: copied(&snapshot.service_cidrs),
        pods: copied(&snapshot.pods),
    }
}

/// A version read but not applied yet: it dropped more than half the objects.
struct Held {
    snapshot: Snapshot,
    digest: u64,
    since: tokio::time::Instant,
}

impl Held {
    /// Applies the held version once it stayed for the whole hold; returns its digest.
    fn release(self, shared: &Shared, options: &FileOptions) -> u64 {
        info!(
            file = %options.path.display(),
            "cluster file stayed shrunk for {}s: applied: {}",
            options.shrink_hold.as_secs(),
            counts(&self.snapshot)
        );
        shared.apply(self.snapshot);
        self.digest
    }
}

/// Polls the file. A version is read only once it looked the same on two consecutive polls (a
/// writer still at work changes size or mtime in between), and applied only if it is unchanged
/// across the read. A version that drops more than half the objects is held for
/// `shrink_hold` and applied only if it stays. A read that fails (out of descriptors, say)
/// leaves the version unseen, so the next poll tries again.
async fn poll(
    shared: Arc<Shared>,
    options: FileOptions,
    mut seen: Option<Version>,
    mut digest: u64,
) {
    let mut ticks = tokio::time::interval(options.poll_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut missing = false;
    // A changed version waiting for the next poll to show it settled.
    let mut settling: Option<Version> = None;
    let mut held: Option<Held> = None;
    let mut last_read_error: Option<String> = None;
    loop {
        ticks.tick().await;
        let current = match version(&options.path) {
            Ok(v) => v,
            Err(source) => {
                // Report once; an editor's unlink-and-create passes unnoticed.
                if !missing {
                    missing = true;
                    shared.reject(&FileError::Io {
                        op: "stat",
                        file: options.path.clone(),
                        source,
                    });
                }
                continue;
            }
        };
        missing = false;
        if seen == Some(current) {
            if let Some(h) = held.take_if(|h| h.since.elapsed() >= options.shrink_hold) {
                digest = h.release(&shared, &options);
            }
            continue;
        }
        if settling != Some(current) {
            settling = Some(current);
            continue;
        }
        let read = {
            let options = options.clone();
            tokio::task::spawn_blocking(move || read_version(&options)).await
        };
        if version(&options.path).ok() != Some(current) {
            // Written while we read it: read the finished version once it settles.
            continue;
        }
        settling = None;
        match read {
            Ok(Ok((parsed, new_digest))) => {
                seen = Some(current);
                last_read_error = None;
                if new_digest == digest {
                    held = None;
                    continue;
                }
                let snapshot = shared.settle(parsed);
                let before = shared.objects_in_force();
                let after = total(&snapshot);
                if before >= SHRINK_MIN_OBJECTS && after * 2 < before {
                    if held.as_ref().is_none_or(|h| h.digest != new_digest) {
                        shared.reject(&FileError::Held {
                            file: options.path.clone(),
                            before,
                            after,
                            hold: options.shrink_hold,
                        });
                        held = Some(Held {
                            snapshot,
                            digest: new_digest,
                            since: tokio::time::Instant::now(),
                        });
                    }
                    continue;
                }
                held = None;
                digest = new_digest;
                info!(
                    file = %options.path.display(),
                    "cluster file changed: {}",
                    counts(&snapshot)
                );
                shared.apply(snapshot);
            }
            Ok(Err(error @ FileError::Io { .. })) => {
                // Transient (EMFILE, EINTR, …) or not, the version was not read: try it again
                // on the next poll, reporting the error once.
                let message = error.to_string();
                if last_read_error.as_ref() != Some(&message) {
                    shared.reject(&error);
                    last_read_error = Some(message);
                }
            }
            Ok(Err(error)) => {
                seen = Some(current);
                held = None;
                shared.reject(&error);
            }
            Err(join) => warn!("reading {}: {join}", options.path.display()),
        }
    }
}

/// A running file source. Dropping it stops the polling.
pub struct FileSource {
    shared: Arc<Shared>,
    task: AbortHandle,
}

impl ClusterSource for FileSource {
    fn snapshot(&self) -> Snapshot {
        self.shared
            .snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn status(&self) -> SourceStatus {
        self.shared.feed.status()
    }

    fn take_changes(&self) -> super::Changes {
        self.shared.journal.take()
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write as _, path::Path};

    use super::*;
    use crate::{
        testing::objects::spec_cluster,
        translate::{KubeProxySets, NodeFacts, Options, translate},
    };

    const EXAMPLE: &str = include_str!("../../../deploy/examples/cluster.yaml");

    fn file() -> &'static Path {
        Path::new("/etc/kube-ovn/cluster.yaml")
    }

    fn ok(text: &str) -> Snapshot {
        parse(text, file()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> FileError {
        match parse(text, file()) {
            Ok(s) => panic!("accepted: {s:?}"),
            Err(e) => e,
        }
    }

    /// The objects of a snapshot as JSON, each kind sorted by name.
    fn objects(s: &Snapshot) -> Value {
        fn sorted<T: serde::Serialize>(v: &[Arc<T>]) -> Vec<Value> {
            let mut v: Vec<Value> = v
                .iter()
                .map(|o| serde_json::to_value(&**o).unwrap())
                .collect();
            v.sort_by_key(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            });
            v
        }
        serde_json::json!({
            "subnets": sorted(&s.subnets),
            "services": sorted(&s.services),
            "nodes": sorted(&s.nodes),
            "serviceCidrs": sorted(&s.service_cidrs),
            "pods": sorted(&s.pods),
        })
    }

    fn options() -> [Options; 2] {
        let ranges = vec![
            "10.96.0.0/12".parse().unwrap(),
            "fd00:10:96::/112".parse().unwrap(),
        ];
        [
            Options {
                service_cluster_ip_range: ranges.clone(),
                kube_proxy_sets: KubeProxySets::IPVS,
                ..Options::default()
            },
            Options {
                service_cluster_ip_range: ranges,
                ..Options::default()
            },
        ]
    }

    #[test]
    fn example_file_translates_like_the_spec_cluster() {
        let from_file = ok(EXAMPLE);
        let built = spec_cluster();
        for node in ["n1", "n2", "n3"] {
            let facts = NodeFacts {
                node_name: node.into(),
                ..NodeFacts::default()
            };
            for options in options() {
                let file = translate(&from_file, &facts, &options);
                assert!(file.issues.is_empty(), "{:?}", file.issues);
                assert_eq!(
                    file.desired,
                    translate(&built, &facts, &options).desired,
                    "node {node}, {options:?}"
                );
            }
        }
        // Same objects, not just the same sets.
        let names = |s: &Snapshot| {
            let mut n: Vec<String> = s
                .subnets
                .iter()
                .map(|o| object_name(&o.metadata))
                .chain(s.services.iter().map(|o| object_name(&o.metadata)))
                .chain(s.nodes.iter().map(|o| object_name(&o.metadata)))
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&from_file), names(&built));
        for (a, b) in from_file.subnets.iter().zip(&built.subnets) {
            assert_eq!(a.metadata.name, b.metadata.name);
            // ovn-default has natOutgoing in spec §5.1; the translation ignores it.
            let mut a = a.spec.clone();
            a.nat_outgoing = b.spec.nat_outgoing;
            assert_eq!(a, b.spec, "{:?}", b.metadata.name);
        }
        for node in &from_file.nodes {
            let built = built
                .nodes
                .iter()
                .find(|n| n.metadata.name == node.metadata.name);
            assert_eq!(
                node.status.as_ref().unwrap().addresses,
                built.unwrap().status.as_ref().unwrap().addresses
            );
        }
    }

    /// The example re-shaped: one `kind: List`, and one typed list per kind (items without
    /// apiVersion/kind, as the API returns them).
    fn as_lists(text: &str) -> (String, String) {
        let docs: Vec<Value> = serde_saphyr::from_multiple(text).unwrap();
        let list = serde_json::json!({
            "apiVersion": "v1",
            "kind": "List",
            "metadata": {"resourceVersion": ""},
            "items": docs,
        });
        let mut typed = String::new();
        for (api_version, kind) in [
            ("kubeovn.io/v1", "Subnet"),
            ("v1", "Service"),
            ("v1", "Node"),
        ] {
            let items: Vec<Value> = docs
                .iter()
                .filter(|d| d["kind"] == kind)
                .map(|d| {
                    let mut d = d.clone();
                    let map = d.as_object_mut().unwrap();
                    map.remove("apiVersion");
                    map.remove("kind");
                    d
                })
                .collect();
            let doc = serde_json::json!({
                "apiVersion": api_version,
                "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": "12345"},
                "items": items,
            });
            typed.push_str("---\n");
            typed.push_str(&serde_saphyr::to_string(&doc).unwrap());
        }
        (serde_saphyr::to_string(&list).unwrap(), typed)
    }

    #[test]
    fn multi_document_list_and_typed_lists_agree() {
        let (list, typed) = as_lists(EXAMPLE);
        assert!(list.contains("kind: List"), "{list}");
        assert!(typed.contains("kind: SubnetList"), "{typed}");
        let expected = objects(&ok(EXAMPLE));
        assert_eq!(objects(&ok(&list)), expected);
        assert_eq!(objects(&ok(&typed)), expected);
        // An explicitly empty list is an empty cluster, unlike an empty file.
        let empty = ok("apiVersion: v1\nkind: List\nitems: []\n");
        assert!(empty.services.is_empty());
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let snapshot = ok(r"
apiVersion: kubeovn.io/v1
kind: Subnet
metadata:
  name: s
  uid: 1b3f
  futureMeta: x
spec:
  cidrBlock: 10.1.0.0/16
  vpc: ovn-cluster
  enableEcmp: true
  namespaces: [a, b]
  acls: [{action: drop, match: ip4.src==1.1.1.1, priority: 1}]
status:
  v4availableIPs: 65533
  conditions: [{type: Ready, status: 'True'}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.3.3
  futureSpecField: {a: 1}
  ports: [{port: 80, appProtocol: http, futurePortField: true}]
status:
  loadBalancer: {}
  somethingNew: 1
futureTopLevel: ok
");
        assert_eq!(snapshot.subnets[0].spec.cidr_block, "10.1.0.0/16");
        // A Service without a namespace lands in `default`, as with `kubectl create -f`.
        assert_eq!(object_name(&snapshot.services[0].metadata), "default/web");
    }

    #[test]
    fn pods_and_service_cidrs_parse() {
        let snapshot = ok(r"
apiVersion: v1
kind: Pod
metadata:
  name: p
  namespace: ns
  annotations: {ovn.kubernetes.io/logical_switch: vpc1-sub}
spec:
  nodeName: n1
  containers:
  - name: c
    ports: [{name: health, containerPort: 8080}]
    livenessProbe: {tcpSocket: {port: health}}
status:
  podIPs: [{ip: 10.0.1.5}]
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: [10.96.0.0/12, fd00:10:96::/112]}
status:
  conditions:
  - {type: Ready, status: 'True', lastTransitionTime: '2025-01-01T00:00:00Z', reason: '', message: ''}
");
        assert_eq!(snapshot.pods.len(), 1);
        assert_eq!(snapshot.service_cidrs.len(), 1);
    }

    fn object_error(e: &FileError) -> (Position, &str, &str) {
        match e {
            FileError::Object {
                at,
                object,
                problem,
                ..
            } => (*at, object, problem),
            other => panic!("expected an object error, got {other:?}"),
        }
    }

    const GOOD_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n";

    #[test]
    fn invalid_yaml_reports_the_position() {
        let text =
            format!("{GOOD_SERVICE}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [b\n");
        let e = err(&text);
        let FileError::Yaml { line, column, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!((*line, *column), (9, 9), "{e}");
        let message = e.to_string();
        assert!(
            message.starts_with("/etc/kube-ovn/cluster.yaml: invalid YAML"),
            "{message}"
        );
        assert!(message.contains("line 9"), "{message}");
        assert!(!message.contains('\n'), "one line: {message}");
    }

    #[test]
    fn unknown_kind_and_wrong_api_version_are_rejected() {
        let text = format!(
            "{GOOD_SERVICE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: ns}}\n"
        );
        let e = err(&text);
        let (at, object, problem) = object_error(&e);
        assert_eq!(
            at,
            Position {
                document: 2,
                item: None,
                line: 6
            }
        );
        assert_eq!(object, "Deployment ns/web");
        assert!(problem.contains("unknown kind \"Deployment\""), "{problem}");
        assert!(
            e.to_string()
                .starts_with("/etc/kube-ovn/cluster.yaml: document 2 (line 6): Deployment ns/web:"),
            "{e}"
        );

        let e = err("apiVersion: kubeovn.io/v2\nkind: Subnet\nmetadata: {name: s}\n");
        let (_, object, problem) = object_error(&e);
        assert_eq!(object, "Subnet s");
        assert!(problem.contains("expected \"kubeovn.io/v1\""), "{problem}");

        let e = err(
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Secret, metadata: {name: x}}\n",
        );
        let (at, object, _) = object_error(&e);
        assert_eq!((at.document, at.item, object), (1, Some(1), "Secret x"));
    }

    #[test]
    fn missing_required_fields_are_rejected() {
        let e = err("apiVersion: v1\nkind: Node\nmetadata: {labels: {a: b}}\n");
        let (_, object, problem) = object_error(&e);
        assert_eq!(
            (object, problem),
            ("Node <unnamed>", "metadata.name is missing")
        );

        let e = err("apiVersion: v1\nmetadata: {name: n1}\n");
        let (_, object, problem) = object_error(&e);
        assert_eq!((object, problem), ("object n1", "kind is missing"));

        let e = err("kind: Node\nmetadata: {name: n1}\n");
        let (_, object, problem) = object_error(&e);
        assert_eq!((object, problem), ("Node n1", "apiVersion is missing"));

        // ServicePort.port is required by the API.
        let e = err(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec: {ports: [{protocol: TCP}]}\n",
        );
        let (_, object, problem) = object_error(&e);
        assert_eq!(object, "Service ns/s");
        assert_eq!(problem, "spec.ports[0].port is missing");

        let e = err(
            "apiVersion: kubeovn.io/v1\nkind: Subnet\nmetadata: {name: s}\nspec: {vpc: ovn-cluster}\n",
        );
        let (_, object, problem) = object_error(&e);
        assert_eq!((object, problem), ("Subnet s", "spec.cidrBlock is missing"));

        // A typed list's item without a name.
        let e =
            err("apiVersion: v1\nkind: NodeList\nitems:\n- metadata: {name: a}\n- metadata: {}\n");
        let (at, object, _) = object_error(&e);
        assert_eq!((at.item, object), (Some(2), "Node <unnamed>"));
    }

    #[test]
    fn mistyped_and_duplicate_objects_are_rejected() {
        let e = err(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec: {ports: [{port: eighty}]}\n",
        );
        let (_, object, problem) = object_error(&e);
        assert_eq!(object, "Service ns/s");
        assert!(problem.contains("eighty"), "{problem}");

        let e = err(&format!("{GOOD_SERVICE}---\n{GOOD_SERVICE}"));
        let (at, object, problem) = object_error(&e);
        assert_eq!((at.document, object), (2, "Service ns/a"));
        assert_eq!(problem, "defined twice (first at document 1 (line 1))");

        let e = err("just a string\n");
        let (_, object, problem) = object_error(&e);
        assert_eq!(object, "document");
        assert!(problem.contains("found a string"), "{problem}");

        let e = err("apiVersion: v1\nkind: List\nitems: {a: 1}\n");
        assert!(object_error(&e).2.contains("items: expected a list"), "{e}");

        let e = err(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n9}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.300}]}\n",
        );
        let (_, object, problem) = object_error(&e);
        assert_eq!(object, "Node n9");
        assert!(
            problem.contains("\"192.168.0.300\" is not an IP address"),
            "{problem}"
        );
    }

    fn invalid(text: &str) -> Vec<LocatedIssue> {
        match err(text) {
            FileError::Invalid { issues, .. } => issues,
            other => panic!("expected translation issues, got {other:?}"),
        }
    }

    #[test]
    fn what_the_translation_would_skip_is_rejected() {
        let text = format!(
            "{GOOD_SERVICE}---\napiVersion: kubeovn.io/v1\nkind: Subnet\nmetadata: {{name: bad}}\n\
             spec: {{vpc: ovn-cluster, cidrBlock: 10.16.0.0/33}}\n"
        );
        let issues = invalid(&text);
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].issue.kind, "Subnet");
        assert_eq!(issues[0].issue.object, "bad");
        assert_eq!(
            issues[0].at,
            Some(Position {
                document: 2,
                item: None,
                line: 6
            })
        );
        let message = parse(&text, file()).unwrap_err().to_string();
        assert!(
            message.starts_with("/etc/kube-ovn/cluster.yaml: document 2 (line 6): Subnet bad: spec.cidrBlock: invalid CIDR \"10.16.0.0/33\""),
            "{message}"
        );

        let issues = invalid(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
        );
        assert_eq!(issues[0].issue.object, "ns/s");
        assert!(
            issues[0].issue.message.contains("invalid clusterIP"),
            "{issues:?}"
        );

        let issues = invalid(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 80, protocol: HTTP}]}\n",
        );
        assert!(
            issues[0]
                .issue
                .message
                .contains("unknown port protocol \"HTTP\""),
            "{issues:?}"
        );

        // Several problems: the message names the first and counts the rest.
        let mut text = String::new();
        for n in 0..3 {
            write!(
                text,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{n}}}\nspec: {{clusterIP: bogus, ports: [{{port: 80}}]}}\n"
            )
            .unwrap();
        }
        let message = parse(&text, file()).unwrap_err().to_string();
        assert!(message.ends_with("(and 2 more problems)"), "{message}");
    }

    #[test]
    fn bad_objects_are_rejected_one_by_one_and_named() {
        let text = "apiVersion: v1\nkind: List\nitems:\n\
            - {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}}\n\
            - just a string\n\
            - {apiVersion: kubeovn.io/v1, kind: Subnet, metadata: {name: s1}, spec: {vpc: ovn-cluster}}\n\
            - {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.2, ports: [{port: 81}]}}\n\
            - {apiVersion: v1, kind: Service, metadata: {name: b, namespace: ns}, spec: {clusterIP: bogus, ports: [{port: 80}]}}\n\
            - {apiVersion: v1, kind: Service, metadata: {name: c}, spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}}\n\
            ---\n\
            apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
        let parsed = parse_objects(text, file()).unwrap();
        let names: Vec<_> = parsed
            .snapshot
            .services
            .iter()
            .map(|s| object_name(&s.metadata))
            .collect();
        assert_eq!(names, ["default/a", "default/c"], "the first a, and c");
        assert!(parsed.snapshot.subnets.is_empty());
        let rejected: Vec<_> = parsed
            .rejected
            .iter()
            .map(|r| (r.key.clone(), r.error.to_string()))
            .collect();
        let key = |k: Kind, n: &str| Some((k, n.to_owned()));
        let expect = [
            (
                None,
                "document 1 item 2 (line 1): List item: expected an object",
            ),
            (
                key(Kind::Subnet, "s1"),
                "document 1 item 3 (line 1): Subnet s1: spec.cidrBlock is missing",
            ),
            (
                key(Kind::Service, "default/a"),
                "document 1 item 4 (line 1): Service default/a: defined twice",
            ),
            (None, "document 2 (line 11): Deployment d: unknown kind"),
            (
                key(Kind::Service, "ns/b"),
                "document 1 item 5 (line 1): Service ns/b: invalid clusterIP",
            ),
        ];
        assert_eq!(rejected.len(), expect.len(), "{rejected:#?}");
        for ((key, message), (want_key, want)) in rejected.iter().zip(expect) {
            assert_eq!(*key, want_key, "{message}");
            assert!(message.contains(want), "{message} lacks {want}");
        }
        // The strict parse refuses the version at its first problem.
        assert!(
            err(text)
                .to_string()
                .contains("List item: expected an object")
        );
    }

    #[test]
    fn a_rejected_object_keeps_its_last_good_version() {
        let old = ok(&format!(
            "{GOOD_SERVICE}---\napiVersion: kubeovn.io/v1\nkind: Subnet\nmetadata: {{name: s1}}\n\
             spec: {{vpc: ovn-cluster, cidrBlock: 10.16.0.0/16}}\n"
        ));
        let mut parsed = parse_objects(
            "apiVersion: kubeovn.io/v1\nkind: Subnet\nmetadata: {name: s1}\n\
             spec: {vpc: ovn-cluster, cidrBlock: 10.16.0.0/61}\n---\n\
             apiVersion: kubeovn.io/v1\nkind: Subnet\nmetadata: {name: s2}\nspec: {vpc: ovn-cluster}\n",
            file(),
        )
        .unwrap();
        assert!(parsed.snapshot.subnets.is_empty());
        let kept = carry_over(&mut parsed.snapshot, &old, &parsed.rejected);
        // s2 (no cidrBlock) is rejected while parsing, s1 (invalid CIDR) by validation after it.
        assert_eq!(kept, [false, true], "s2 never was in force, s1 was");
        assert_eq!(parsed.snapshot.subnets.len(), 1);
        assert_eq!(parsed.snapshot.subnets[0].spec.cidr_block, "10.16.0.0/16");
        assert!(
            parsed.snapshot.services.is_empty(),
            "only rejected objects are kept"
        );
    }

    #[test]
    fn an_empty_file_is_not_an_empty_cluster() {
        // A file truncated by a writer must not wipe the maps.
        let e = err("# nothing yet\n---\n");
        assert!(matches!(e, FileError::Empty { .. }), "{e:?}");
        assert!(e.to_string().contains("no objects"), "{e}");
    }

    /// `count` minimal Services in `default`, s0 … s{count-1}.
    fn services(count: usize) -> String {
        let mut text = String::new();
        for i in 0..count {
            let _ = write!(
                text,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\n\
                 spec:\n  clusterIP: 10.96.5.{i}\n  ports: [{{port: 80}}]\n"
            );
        }
        text
    }

    fn temp_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kovn-file-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("cluster.yaml")
    }

    fn fast(path: &Path) -> FileOptions {
        FileOptions {
            poll_interval: Duration::from_millis(20),
            ..FileOptions::new(path)
        }
    }

    #[tokio::test]
    async fn a_truncated_version_that_still_parses_is_not_applied_at_once() {
        let path = temp_file("truncated");
        std::fs::write(&path, format!("{EXAMPLE}{}", services(20))).unwrap();
        let running = start(fast(&path)).unwrap();
        assert_eq!(running.source.snapshot().services.len(), 24);
        // A writer that stopped after the first documents: valid YAML, most objects missing.
        std::fs::write(&path, EXAMPLE).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            running.source.snapshot().services.len(),
            24,
            "a sudden shrink to {} objects was applied at once",
            EXAMPLE.matches("\nkind: ").count()
        );
        let status = running.source.status();
        let error = status.kinds["Service"]
            .last_error
            .clone()
            .unwrap_or_default();
        assert!(error.contains("held"), "{error:?}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn a_shrink_that_stays_is_applied_after_the_hold_and_a_return_cancels_it() {
        let path = temp_file("shrink");
        let full = format!("{EXAMPLE}{}", services(20));
        std::fs::write(&path, &full).unwrap();
        let running = start(FileOptions {
            shrink_hold: Duration::from_millis(600),
            ..fast(&path)
        })
        .unwrap();
        // Shrunk, then back before the hold ends: never applied.
        std::fs::write(&path, EXAMPLE).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::write(&path, &full).unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(running.source.snapshot().services.len(), 24);
        // Shrunk and left so: applied once the hold is over.
        std::fs::write(&path, EXAMPLE).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(running.source.snapshot().services.len(), 24, "held");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(running.source.snapshot().services.len(), 4, "applied");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
