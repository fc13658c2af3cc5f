//! Object kinds and the [`Record`] trait that lets the store treat them alike.
//!
//! Owns the mapping between the generated protobuf types and the store's tables and indexes.
//! Must never hold state: it only describes objects.

use std::fmt;
use std::sync::Arc;

use crate::proto::objects::{
    Cluster, Config, Meta, Network, Node, ObjectKind, Secret, Service, StoreObject, Task,
    store_object,
};

use super::table::{IndexKey, Table, Tables};

/// The kinds of object the store holds (`ObjectKind` without its unspecified value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A cluster member (manager or worker).
    Node,
    /// A declared workload.
    Service,
    /// One instance of a service, placed on a node.
    Task,
    /// An overlay network.
    Network,
    /// The cluster-wide settings (one object).
    Cluster,
    /// A secret (its value sealed with the cluster's secrets key).
    Secret,
    /// A config (a value given to tasks as a file).
    Config,
}

impl Kind {
    /// Every kind, in snapshot order.
    pub const ALL: [Kind; 7] = [
        Kind::Node,
        Kind::Service,
        Kind::Task,
        Kind::Network,
        Kind::Cluster,
        Kind::Secret,
        Kind::Config,
    ];

    /// The kind carried on the wire as `value`, or `None` for unspecified or unknown values.
    pub fn from_proto(value: i32) -> Option<Self> {
        match ObjectKind::try_from(value).ok()? {
            ObjectKind::Unspecified => None,
            ObjectKind::Node => Some(Self::Node),
            ObjectKind::Service => Some(Self::Service),
            ObjectKind::Task => Some(Self::Task),
            ObjectKind::Network => Some(Self::Network),
            ObjectKind::Cluster => Some(Self::Cluster),
            ObjectKind::Secret => Some(Self::Secret),
            ObjectKind::Config => Some(Self::Config),
        }
    }

    /// The wire value of this kind.
    pub fn to_proto(self) -> ObjectKind {
        match self {
            Self::Node => ObjectKind::Node,
            Self::Service => ObjectKind::Service,
            Self::Task => ObjectKind::Task,
            Self::Network => ObjectKind::Network,
            Self::Cluster => ObjectKind::Cluster,
            Self::Secret => ObjectKind::Secret,
            Self::Config => ObjectKind::Config,
        }
    }

    /// The lower-case name operators see (`service`, `task`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Service => "service",
            Self::Task => "task",
            Self::Network => "network",
            Self::Cluster => "cluster",
            Self::Secret => "secret",
            Self::Config => "config",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::proto::objects::Node {}
    impl Sealed for crate::proto::objects::Service {}
    impl Sealed for crate::proto::objects::Task {}
    impl Sealed for crate::proto::objects::Network {}
    impl Sealed for crate::proto::objects::Cluster {}
    impl Sealed for crate::proto::objects::Secret {}
    impl Sealed for crate::proto::objects::Config {}
}

/// An object type the store keeps in a table. Sealed: implemented for the seven kinds only.
pub trait Record:
    sealed::Sealed + prost::Message + Clone + Default + PartialEq + Send + Sync + 'static
{
    /// The kind of this type.
    const KIND: Kind;

    /// The object's id (unique within its kind).
    fn id(&self) -> &str;

    /// The store-owned metadata, if set.
    fn meta(&self) -> Option<&Meta>;

    /// Replaces the store-owned metadata.
    fn set_meta(&mut self, meta: Meta);

    /// The version the store last wrote (0 before the object was ever stored).
    fn version(&self) -> u64 {
        self.meta().map_or(0, |meta| meta.version)
    }

    /// The name that must be unique within the kind (case-insensitive), if the kind has one.
    fn unique_name(&self) -> Option<&str> {
        None
    }

    /// The secondary index entries of this object.
    #[doc(hidden)]
    fn secondary_keys(&self, _out: &mut Vec<IndexKey>) {}

    /// Wraps a shared object of this type as an [`Object`].
    fn into_object(object: Arc<Self>) -> Object;

    /// This type's object inside `object`, if it is of this kind.
    fn from_object(object: &Object) -> Option<&Arc<Self>>;

    /// Wraps an owned object as the protobuf union used in transactions.
    fn into_store_object(self) -> StoreObject;

    /// This kind's table.
    #[doc(hidden)]
    fn table(tables: &Tables) -> &Table<Self>;

    /// This kind's table, mutably.
    #[doc(hidden)]
    fn table_mut(tables: &mut Tables) -> &mut Table<Self>;
}

/// Lower-cases a unique name so `Web` and `web` collide, as operators expect. ASCII only:
/// Unicode case tables change between releases, and every manager must decide alike.
pub(crate) fn name_key(name: &str) -> String {
    name.to_ascii_lowercase()
}

impl Record for Node {
    const KIND: Kind = Kind::Node;
    fn id(&self) -> &str {
        &self.id
    }
    fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }
    fn set_meta(&mut self, meta: Meta) {
        self.meta = Some(meta);
    }
    fn secondary_keys(&self, out: &mut Vec<IndexKey>) {
        out.push(IndexKey::Role(self.role));
        if let Some(spec) = &self.spec
            && !spec.hostname.is_empty()
        {
            out.push(IndexKey::Hostname(spec.hostname.clone()));
        }
    }
    fn into_object(object: Arc<Self>) -> Object {
        Object::Node(object)
    }
    fn from_object(object: &Object) -> Option<&Arc<Self>> {
        match object {
            Object::Node(node) => Some(node),
            _ => None,
        }
    }
    fn into_store_object(self) -> StoreObject {
        StoreObject {
            object: Some(store_object::Object::Node(self)),
        }
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.nodes
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.nodes
    }
}

impl Record for Service {
    const KIND: Kind = Kind::Service;
    fn id(&self) -> &str {
        &self.id
    }
    fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }
    fn set_meta(&mut self, meta: Meta) {
        self.meta = Some(meta);
    }
    fn unique_name(&self) -> Option<&str> {
        self.spec.as_ref().map(|spec| spec.name.as_str())
    }
    fn into_object(object: Arc<Self>) -> Object {
        Object::Service(object)
    }
    fn from_object(object: &Object) -> Option<&Arc<Self>> {
        match object {
            Object::Service(service) => Some(service),
            _ => None,
        }
    }
    fn into_store_object(self) -> StoreObject {
        StoreObject {
            object: Some(store_object::Object::Service(self)),
        }
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.services
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.services
    }
}

impl Record for Task {
    const KIND: Kind = Kind::Task;
    fn id(&self) -> &str {
        &self.id
    }
    fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }
    fn set_meta(&mut self, meta: Meta) {
        self.meta = Some(meta);
    }
    fn secondary_keys(&self, out: &mut Vec<IndexKey>) {
        if !self.service_id.is_empty() {
            out.push(IndexKey::ServiceId(self.service_id.clone()));
            out.push(IndexKey::Slot(self.service_id.clone(), self.slot));
        }
        if !self.node_id.is_empty() {
            out.push(IndexKey::NodeId(self.node_id.clone()));
        }
        out.push(IndexKey::DesiredState(self.desired_state));
        out.push(IndexKey::TaskState(
            self.status.as_ref().map_or(0, |status| status.state),
        ));
    }
    fn into_object(object: Arc<Self>) -> Object {
        Object::Task(object)
    }
    fn from_object(object: &Object) -> Option<&Arc<Self>> {
        match object {
            Object::Task(task) => Some(task),
            _ => None,
        }
    }
    fn into_store_object(self) -> StoreObject {
        StoreObject {
            object: Some(store_object::Object::Task(self)),
        }
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.tasks
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.tasks
    }
}

impl Record for Network {
    const KIND: Kind = Kind::Network;
    fn id(&self) -> &str {
        &self.id
    }
    fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }
    fn set_meta(&mut self, meta: Meta) {
        self.meta = Some(meta);
    }
    fn unique_name(&self) -> Option<&str> {
        self.spec.as_ref().map(|spec| spec.name.as_str())
    }
    fn into_object(object: Arc<Self>) -> Object {
        Object::Network(object)
    }
    fn from_object(object: &Object) -> Option<&Arc<Self>> {
        match object {
            Object::Network(network) => Some(network),
            _ => None,
        }
    }
    fn into_store_object(self) -> StoreObject {
        StoreObject {
            object: Some(store_object::Object::Network(self)),
        }
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.networks
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.networks
    }
}

impl Record for Cluster {
    const KIND: Kind = Kind::Cluster;
    fn id(&self) -> &str {
        &self.id
    }
    fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }
    fn set_meta(&mut self, meta: Meta) {
        self.meta = Some(meta);
    }
    fn unique_name(&self) -> Option<&str> {
        self.spec.as_ref().map(|spec| spec.name.as_str())
    }
    fn into_object(object: Arc<Self>) -> Object {
        Object::Cluster(object)
    }
    fn from_object(object: &Object) -> Option<&Arc<Self>> {
        match object {
            Object::Cluster(cluster) => Some(cluster),
            _ => None,
        }
    }
    fn into_store_object(self) -> StoreObject {
        StoreObject {
            object: Some(store_object::Object::Cluster(self)),
        }
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.clusters
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.clusters
    }
}

impl Record for Secret {
    const KIND: Kind = Kind::Secret;
    fn id(&self) -> &str {
        &self.id
    }
    fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }
    fn set_meta(&mut self, meta: Meta) {
        self.meta = Some(meta);
    }
    fn unique_name(&self) -> Option<&str> {
        self.spec.as_ref().map(|spec| spec.name.as_str())
    }
    fn into_object(object: Arc<Self>) -> Object {
        Object::Secret(object)
    }
    fn from_object(object: &Object) -> Option<&Arc<Self>> {
        match object {
            Object::Secret(o) => Some(o),
            _ => None,
        }
    }
    fn into_store_object(self) -> StoreObject {
        StoreObject {
            object: Some(store_object::Object::Secret(self)),
        }
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.secrets
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.secrets
    }
}

impl Record for Config {
    const KIND: Kind = Kind::Config;
    fn id(&self) -> &str {
        &self.id
    }
    fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }
    fn set_meta(&mut self, meta: Meta) {
        self.meta = Some(meta);
    }
    fn unique_name(&self) -> Option<&str> {
        self.spec.as_ref().map(|spec| spec.name.as_str())
    }
    fn into_object(object: Arc<Self>) -> Object {
        Object::Config(object)
    }
    fn from_object(object: &Object) -> Option<&Arc<Self>> {
        match object {
            Object::Config(o) => Some(o),
            _ => None,
        }
    }
    fn into_store_object(self) -> StoreObject {
        StoreObject {
            object: Some(store_object::Object::Config(self)),
        }
    }
    fn table(tables: &Tables) -> &Table<Self> {
        &tables.configs
    }
    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.configs
    }
}

/// A stored object of any kind, shared (cloning copies a pointer, not the object).
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A node.
    Node(Arc<Node>),
    /// A service.
    Service(Arc<Service>),
    /// A task.
    Task(Arc<Task>),
    /// A network.
    Network(Arc<Network>),
    /// The cluster object.
    Cluster(Arc<Cluster>),
    /// A secret.
    Secret(Arc<Secret>),
    /// A config.
    Config(Arc<Config>),
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Node(_) => Kind::Node,
            Self::Service(_) => Kind::Service,
            Self::Task(_) => Kind::Task,
            Self::Network(_) => Kind::Network,
            Self::Cluster(_) => Kind::Cluster,
            Self::Secret(_) => Kind::Secret,
            Self::Config(_) => Kind::Config,
        }
    }

    /// The object's id.
    pub fn id(&self) -> &str {
        match self {
            Self::Node(o) => o.id(),
            Self::Service(o) => o.id(),
            Self::Task(o) => o.id(),
            Self::Network(o) => o.id(),
            Self::Cluster(o) => o.id(),
            Self::Secret(o) => o.id(),
            Self::Config(o) => o.id(),
        }
    }

    /// The version the store last wrote.
    pub fn version(&self) -> u64 {
        match self {
            Self::Node(o) => o.version(),
            Self::Service(o) => o.version(),
            Self::Task(o) => o.version(),
            Self::Network(o) => o.version(),
            Self::Cluster(o) => o.version(),
            Self::Secret(o) => o.version(),
            Self::Config(o) => o.version(),
        }
    }

    /// A protobuf copy of the object (clones it).
    pub fn to_store_object(&self) -> StoreObject {
        match self {
            Self::Node(o) => o.as_ref().clone().into_store_object(),
            Self::Service(o) => o.as_ref().clone().into_store_object(),
            Self::Task(o) => o.as_ref().clone().into_store_object(),
            Self::Network(o) => o.as_ref().clone().into_store_object(),
            Self::Cluster(o) => o.as_ref().clone().into_store_object(),
            Self::Secret(o) => o.as_ref().clone().into_store_object(),
            Self::Config(o) => o.as_ref().clone().into_store_object(),
        }
    }

    /// The encoded size of [`Self::to_store_object`], without building it.
    pub fn encoded_len(&self) -> usize {
        use prost::Message;
        // A StoreObject holds one field: tag (1 byte for fields 1..15) + length + message.
        let inner = match self {
            Self::Node(o) => o.encoded_len(),
            Self::Service(o) => o.encoded_len(),
            Self::Task(o) => o.encoded_len(),
            Self::Network(o) => o.encoded_len(),
            Self::Cluster(o) => o.encoded_len(),
            Self::Secret(o) => o.encoded_len(),
            Self::Config(o) => o.encoded_len(),
        };
        1 + prost::length_delimiter_len(inner) + inner
    }

    /// Encodes the object as a `StoreObject` into `buf` without cloning it.
    pub fn encode_store_object(&self, buf: &mut Vec<u8>) {
        use prost::Message;
        let field_number = match self {
            Self::Node(_) => 1,
            Self::Service(_) => 2,
            Self::Task(_) => 3,
            Self::Network(_) => 4,
            Self::Cluster(_) => 5,
            Self::Secret(_) => 6,
            Self::Config(_) => 7,
        };
        prost::encoding::encode_key(
            field_number,
            prost::encoding::WireType::LengthDelimited,
            buf,
        );
        match self {
            Self::Node(o) => o.encode_length_delimited(buf),
            Self::Service(o) => o.encode_length_delimited(buf),
            Self::Task(o) => o.encode_length_delimited(buf),
            Self::Network(o) => o.encode_length_delimited(buf),
            Self::Cluster(o) => o.encode_length_delimited(buf),
            Self::Secret(o) => o.encode_length_delimited(buf),
            Self::Config(o) => o.encode_length_delimited(buf),
        }
        .expect("a Vec grows as needed, so encoding cannot run out of space");
    }

    /// Takes the object out of its protobuf union, or `None` if the union is empty.
    pub fn from_store_object(object: StoreObject) -> Option<Self> {
        Some(match object.object? {
            store_object::Object::Node(o) => Self::Node(Arc::new(o)),
            store_object::Object::Service(o) => Self::Service(Arc::new(o)),
            store_object::Object::Task(o) => Self::Task(Arc::new(o)),
            store_object::Object::Network(o) => Self::Network(Arc::new(o)),
            store_object::Object::Cluster(o) => Self::Cluster(Arc::new(o)),
            store_object::Object::Secret(o) => Self::Secret(Arc::new(o)),
            store_object::Object::Config(o) => Self::Config(Arc::new(o)),
        })
    }
}
