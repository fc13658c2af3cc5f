//! The node's DNS responder: service discovery answered locally from the node's own
//! endpoint tables, never by asking a manager.
//!
//! - [`message`]: the wire format, sans-IO (parse one query, write one answer), strict and
//!   bounded.
//! - [`Directory`]: the endpoints by `(service, network)`, built from the node's
//!   [`NetworkTables`] (every network it is attached to, table
//!   [`crate::netdb::ENDPOINTS_TABLE`]) and rebuilt when their generation changes.
//! - [`answer`]: what a query gets, from a directory:
//!   - `A` / `AAAA` for `<service>.<network>`: the addresses of the nodes that run its tasks
//!     (each address once);
//!   - `SRV` for `<service>.<network>`: one record per task and port; for
//!     `_<port>._tcp.<service>.<network>`: one per task with that port; the target is
//!     `<task id>.<service>.<network>`, whose address goes in the additional section (and
//!     which answers `A`/`AAAA` itself);
//!   - NXDOMAIN for any other name (a service with no running task has no name), NOERROR
//!     with no record for a known name and another type, FORMERR for a malformed query,
//!     NOTIMP for an opcode other than QUERY, REFUSED for a class other than IN.
//! - [`server`]: the `flotilla-dns` thread and its UDP socket (default
//!   [`DNS_LISTEN_DEFAULT`]).
//!
//! Names match case-insensitively; a trailing dot is the root and changes nothing. Must
//! never block on anything but its socket, nor ask a manager.

pub mod message;
pub mod server;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::netdb::{ENDPOINTS_TABLE, NetworkTables, decode_endpoint};
use message::{
    Answer, CLASS_ANY, CLASS_IN, Query, Rcode, Record, RecordData, TYPE_A, TYPE_AAAA, TYPE_ANY,
    TYPE_SRV,
};

/// Where the responder listens unless `--dns-listen` says otherwise.
pub const DNS_LISTEN_DEFAULT: &str = "127.0.0.1:5354";
/// The environment variable that tells a task where its node's resolver is.
pub const DNS_ENV_VAR: &str = "FLOTILLA_DNS";
/// Time to live of every record: endpoints change as tasks come and go, so clients must
/// not keep them long.
pub const RECORD_TTL_S: u32 = 5;
/// Endpoints the directory holds at most (bounds its memory whatever the tables hold).
pub const DIRECTORY_ENDPOINTS_MAX: usize = 65_536;

/// One running task, as the responder answers with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRecord {
    /// The task id (its SRV target's first label).
    pub task_id: String,
    /// Its node's address.
    pub addr: IpAddr,
    /// Its ports: name and number.
    pub ports: Vec<(String, u16)>,
}

/// The endpoints by `(service, network)` (both lowercased).
#[derive(Clone, Debug, Default)]
pub struct Directory {
    by_name: HashMap<(String, String), Vec<TaskRecord>>,
}

impl Directory {
    /// The directory of every endpoint the tables hold, in every network this node is
    /// attached to. Entries that do not decode, or whose address is not an IP address, are
    /// skipped (logged at debug level); past [`DIRECTORY_ENDPOINTS_MAX`] the rest is left
    /// out (logged).
    pub fn from_tables(tables: &dyn NetworkTables) -> Directory {
        let mut directory = Directory::default();
        let mut held = 0usize;
        for network in tables.networks() {
            for (key, value) in tables.entries(&network, ENDPOINTS_TABLE) {
                if held >= DIRECTORY_ENDPOINTS_MAX {
                    log::warn!(
                        "more than {DIRECTORY_ENDPOINTS_MAX} endpoints; the DNS responder \
                         leaves the rest out"
                    );
                    return directory;
                }
                let endpoint = match decode_endpoint(&value) {
                    Ok(endpoint) => endpoint,
                    Err(error) => {
                        log::debug!("endpoint {key} in network {network}: {error}");
                        continue;
                    }
                };
                let Ok(addr) = endpoint.addr.parse::<IpAddr>() else {
                    log::debug!("endpoint {key}: address {:?} is no IP", endpoint.addr);
                    continue;
                };
                let ports = endpoint
                    .ports
                    .iter()
                    .filter_map(|p| {
                        Some((p.name.to_ascii_lowercase(), u16::try_from(p.port).ok()?))
                    })
                    .collect();
                let record = TaskRecord {
                    task_id: endpoint.task_id.to_ascii_lowercase(),
                    addr,
                    ports,
                };
                directory.insert(&endpoint.service_name, &endpoint.network_name, record);
                held += 1;
            }
        }
        directory
    }

    /// Adds one task of `service` on `network`.
    pub fn insert(&mut self, service: &str, network: &str, record: TaskRecord) {
        let key = (service.to_ascii_lowercase(), network.to_ascii_lowercase());
        let tasks = self.by_name.entry(key).or_default();
        tasks.push(record);
        // A stable order: the same query gets the same answer.
        tasks.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    }

    /// The running tasks of `service` on `network` (lowercase), if any.
    pub fn tasks(&self, service: &str, network: &str) -> Option<&[TaskRecord]> {
        self.by_name
            .get(&(service.to_string(), network.to_string()))
            .map(Vec::as_slice)
            .filter(|tasks| !tasks.is_empty())
    }
}

/// A [`Directory`] kept in step with the tables: rebuilt when their generation moved.
pub struct LiveDirectory {
    tables: Arc<dyn NetworkTables>,
    built: Option<(u64, Arc<Directory>)>,
}

impl LiveDirectory {
    /// A directory over `tables`, built at the first query.
    pub fn new(tables: Arc<dyn NetworkTables>) -> Self {
        LiveDirectory {
            tables,
            built: None,
        }
    }

    /// The directory as the tables are now.
    pub fn current(&mut self) -> Arc<Directory> {
        let generation = self.tables.generation();
        if let Some((built_at, directory)) = &self.built
            && *built_at == generation
        {
            return Arc::clone(directory);
        }
        let directory = Arc::new(Directory::from_tables(self.tables.as_ref()));
        self.built = Some((generation, Arc::clone(&directory)));
        directory
    }
}

/// What the question names.
enum Subject<'a> {
    /// `<service>.<network>`
    Service { service: &'a str, network: &'a str },
    /// `_<port>._tcp.<service>.<network>`
    Port {
        port: &'a str,
        service: &'a str,
        network: &'a str,
    },
    /// `<task id>.<service>.<network>` (an SRV target)
    Task {
        task: &'a str,
        service: &'a str,
        network: &'a str,
    },
}

fn subject(labels: &[String]) -> Option<Subject<'_>> {
    match labels {
        [service, network] => Some(Subject::Service { service, network }),
        [port, proto, service, network] if proto == "_tcp" => Some(Subject::Port {
            port: port.strip_prefix('_')?,
            service,
            network,
        }),
        [task, service, network] => Some(Subject::Task {
            task,
            service,
            network,
        }),
        _ => None,
    }
}

/// The answer to `query` from `directory`.
pub fn answer(query: &Query, directory: &Directory) -> Answer {
    if query.opcode != 0 {
        return Answer {
            rcode: Some(Rcode::NotImp),
            ..Answer::default()
        };
    }
    if query.qclass != CLASS_IN && query.qclass != CLASS_ANY {
        return Answer {
            rcode: Some(Rcode::Refused),
            ..Answer::default()
        };
    }
    let nxdomain = Answer {
        rcode: Some(Rcode::NxDomain),
        ..Answer::default()
    };
    // Lowercased text labels; a label that is not UTF-8 names nothing here.
    let Some(labels) = query
        .labels
        .iter()
        .map(|l| std::str::from_utf8(l).ok().map(str::to_ascii_lowercase))
        .collect::<Option<Vec<String>>>()
    else {
        return nxdomain;
    };
    let Some(subject) = subject(&labels) else {
        return nxdomain;
    };
    match subject {
        Subject::Service { service, network } => {
            let Some(tasks) = directory.tasks(service, network) else {
                return nxdomain;
            };
            service_answer(query, tasks, service, network, None)
        }
        Subject::Port {
            port,
            service,
            network,
        } => {
            let Some(tasks) = directory.tasks(service, network) else {
                return nxdomain;
            };
            if !tasks.iter().any(|t| t.ports.iter().any(|(p, _)| p == port)) {
                return nxdomain;
            }
            if query.qtype != TYPE_SRV && query.qtype != TYPE_ANY {
                return Answer::default();
            }
            service_answer(query, tasks, service, network, Some(port))
        }
        Subject::Task {
            task,
            service,
            network,
        } => {
            let Some(record) = directory
                .tasks(service, network)
                .and_then(|tasks| tasks.iter().find(|t| t.task_id == task))
            else {
                return nxdomain;
            };
            Answer {
                answers: address_records(query.qtype, &query.labels, [record.addr]),
                ..Answer::default()
            }
        }
    }
}

/// Address records of `addrs` that `qtype` asks for (A: IPv4, AAAA: IPv6, ANY: both).
fn address_records(
    qtype: u16,
    name: &[Vec<u8>],
    addrs: impl IntoIterator<Item = IpAddr>,
) -> Vec<Record> {
    addrs
        .into_iter()
        .filter(|addr| match addr {
            IpAddr::V4(_) => qtype == TYPE_A || qtype == TYPE_ANY,
            IpAddr::V6(_) => qtype == TYPE_AAAA || qtype == TYPE_ANY,
        })
        .map(|addr| Record {
            name: name.to_vec(),
            ttl_s: RECORD_TTL_S,
            data: RecordData::Address(addr),
        })
        .collect()
}

fn target(task: &TaskRecord, service: &str, network: &str) -> Vec<Vec<u8>> {
    [task.task_id.as_str(), service, network]
        .iter()
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// The answer for a service name: addresses (each once) or SRV records (every port, or
/// only `port`), with the targets' addresses as additional records.
fn service_answer(
    query: &Query,
    tasks: &[TaskRecord],
    service: &str,
    network: &str,
    port: Option<&str>,
) -> Answer {
    let mut answer = Answer::default();
    if query.qtype != TYPE_SRV {
        let mut addrs: Vec<IpAddr> = Vec::new();
        for task in tasks {
            if !addrs.contains(&task.addr) {
                addrs.push(task.addr);
            }
        }
        answer.answers = address_records(query.qtype, &query.labels, addrs);
        if query.qtype != TYPE_ANY {
            return answer;
        }
    }
    for task in tasks {
        let ports = task
            .ports
            .iter()
            .filter(|(name, _)| port.is_none_or(|wanted| wanted == name));
        let mut any = false;
        for (_, number) in ports {
            any = true;
            answer.answers.push(Record {
                name: query.labels.clone(),
                ttl_s: RECORD_TTL_S,
                data: RecordData::Srv {
                    port: *number,
                    target: target(task, service, network),
                },
            });
        }
        if any {
            answer.additional.push(Record {
                name: target(task, service, network),
                ttl_s: RECORD_TTL_S,
                data: RecordData::Address(task.addr),
            });
        }
    }
    answer
}

/// The answer datagram to `datagram`, or nothing for one too short to carry an id.
pub fn respond(datagram: &[u8], directory: &Directory) -> Option<Vec<u8>> {
    match message::parse_query(datagram) {
        Ok(query) => {
            let bytes_max = query
                .edns_udp_bytes
                .map_or(message::UDP_ANSWER_BYTES_DEFAULT, |b| {
                    usize::from(b).clamp(
                        message::UDP_ANSWER_BYTES_DEFAULT,
                        message::UDP_ANSWER_BYTES_MAX,
                    )
                });
            Some(message::write_answer(
                &query,
                &answer(&query, directory),
                bytes_max,
            ))
        }
        Err(error) => {
            log::debug!("malformed DNS query: {error}");
            message::header_id(datagram).map(message::write_format_error)
        }
    }
}

#[cfg(test)]
mod tests;
