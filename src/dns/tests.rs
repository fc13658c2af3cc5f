//! The responder's unit tests: parsing (and refusing), answers, truncation, the thread.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::message::*;
use super::*;
use crate::netdb::{LocalTables, encode_endpoint};
use crate::proto::objects::{Endpoint, PortSpec};

/// A query datagram for `name` (dotted, optional trailing dot) of `qtype`.
fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&u16::from(edns.is_some()).to_be_bytes());
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(u8::try_from(label.len()).unwrap());
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    if let Some(size) = edns {
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&[0; 6]);
    }
    out
}

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

fn task(id: &str, addr: IpAddr, ports: &[(&str, u16)]) -> TaskRecord {
    TaskRecord {
        task_id: id.into(),
        addr,
        ports: ports.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
    }
}

/// `web` on `backend`: three tasks on two nodes, ports http and admin; `db` on `backend`
/// on an IPv6 node.
fn directory() -> Directory {
    let mut d = Directory::default();
    d.insert(
        "web",
        "backend",
        task("t1", v4(1), &[("http", 8080), ("admin", 9090)]),
    );
    d.insert(
        "web",
        "backend",
        task("t2", v4(2), &[("http", 8080), ("admin", 9090)]),
    );
    d.insert("web", "backend", task("t3", v4(1), &[("http", 8081)]));
    d.insert(
        "db",
        "backend",
        task("t4", IpAddr::V6(Ipv6Addr::LOCALHOST), &[]),
    );
    d
}

fn ask(name: &str, qtype: u16) -> (Query, Answer) {
    let q = parse_query(&query(7, name, qtype, None)).expect("a good query parses");
    let a = answer(&q, &directory());
    (q, a)
}

fn addresses(answer: &Answer) -> Vec<IpAddr> {
    answer
        .answers
        .iter()
        .filter_map(|r| match r.data {
            RecordData::Address(addr) => Some(addr),
            RecordData::Srv { .. } => None,
        })
        .collect()
}

fn srv_ports(answer: &Answer) -> Vec<(u16, String)> {
    answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RecordData::Srv { port, target } => Some((
                *port,
                target
                    .iter()
                    .map(|l| String::from_utf8_lossy(l).into_owned())
                    .collect::<Vec<_>>()
                    .join("."),
            )),
            RecordData::Address(_) => None,
        })
        .collect()
}

#[test]
fn a_records_give_each_node_address_once_whatever_the_case_and_trailing_dot() {
    for name in ["web.backend", "WEB.Backend.", "web.backend."] {
        let (_, a) = ask(name, TYPE_A);
        assert_eq!(a.rcode, None, "{name}");
        assert_eq!(addresses(&a), vec![v4(1), v4(2)], "{name}");
    }
    // No IPv4 task: a known name with no data of this type.
    let (_, a) = ask("db.backend", TYPE_A);
    assert_eq!((a.rcode, a.answers.len()), (None, 0));
    let (_, a) = ask("db.backend", TYPE_AAAA);
    assert_eq!(addresses(&a), vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]);
}

#[test]
fn srv_records_name_each_task_and_port_with_the_targets_addresses() {
    let (_, a) = ask("_http._tcp.web.backend", TYPE_SRV);
    assert_eq!(
        srv_ports(&a),
        vec![
            (8080, "t1.web.backend".into()),
            (8080, "t2.web.backend".into()),
            (8081, "t3.web.backend".into())
        ]
    );
    assert_eq!(a.additional.len(), 3);
    let (_, a) = ask("web.backend", TYPE_SRV);
    assert_eq!(srv_ports(&a).len(), 5, "every task and port: {a:?}");
    // The target answers for itself.
    let (_, a) = ask("t2.web.backend", TYPE_A);
    assert_eq!(addresses(&a), vec![v4(2)]);
    // A known port name asked for an address: no data.
    let (_, a) = ask("_admin._tcp.web.backend", TYPE_A);
    assert_eq!((a.rcode, a.answers.len()), (None, 0));
}

#[test]
fn unknown_names_are_nxdomain() {
    for name in [
        "api.backend",
        "web.frontend",
        "_smtp._tcp.web.backend",
        "_http._udp.web.backend",
        "t9.web.backend",
        "backend",
        "a.b.c.d.e",
        "",
    ] {
        let (_, a) = ask(name, TYPE_A);
        assert_eq!(a.rcode, Some(Rcode::NxDomain), "{name:?}");
        assert!(a.answers.is_empty());
    }
}

#[test]
fn other_opcodes_and_classes_are_refused_not_answered() {
    let mut datagram = query(1, "web.backend", TYPE_A, None);
    datagram[2] |= 0x10; // opcode 2 (STATUS)
    let q = parse_query(&datagram).unwrap();
    assert_eq!(answer(&q, &directory()).rcode, Some(Rcode::NotImp));
    let mut datagram = query(1, "web.backend", TYPE_A, None);
    let class_at = datagram.len() - 2;
    datagram[class_at..].copy_from_slice(&3u16.to_be_bytes()); // CHAOS
    let q = parse_query(&datagram).unwrap();
    assert_eq!(answer(&q, &directory()).rcode, Some(Rcode::Refused));
}

/// Every malformed query gets FORMERR with its id, and a datagram too short for an id
/// gets nothing.
#[test]
fn malformed_queries_get_formerr() {
    let good = query(0x1234, "web.backend", TYPE_A, None);
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut d = good.clone();
        f(&mut d);
        d
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated question", good[..good.len() - 3].to_vec()),
        ("no question", with(&|d| d[5] = 0)),
        ("two questions", with(&|d| d[5] = 2)),
        ("an answer record", with(&|d| d[7] = 1)),
        ("a response", with(&|d| d[2] |= 0x80)),
        ("trailing bytes", with(&|d| d.push(0))),
        ("label of type 01", with(&|d| d[12] = 0x43)),
        ("label past the end", with(&|d| d[12] = 60)),
        ("pointer to itself", {
            let mut d = good[..12].to_vec();
            d.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
            d
        }),
        ("pointer forward", {
            let mut d = good[..12].to_vec();
            d.extend_from_slice(&[0xC0, 20, 0, 1, 0, 1, 0, 0, 0]);
            d
        }),
        ("pointer into the header", {
            let mut d = good[..12].to_vec();
            d.extend_from_slice(&[0xC0, 2, 0, 1, 0, 1]);
            d
        }),
        ("name over 255 bytes", {
            let mut d = good[..12].to_vec();
            for _ in 0..5 {
                d.push(63);
                d.extend_from_slice(&[b'a'; 63]);
            }
            d.extend_from_slice(&[0, 0, 1, 0, 1]);
            d
        }),
        ("additional record cut short", {
            let mut d = query(0x1234, "web.backend", TYPE_A, Some(1232));
            d.truncate(d.len() - 2);
            d
        }),
        ("two OPT records", {
            let mut d = query(0x1234, "web.backend", TYPE_A, Some(1232));
            let opt = d[d.len() - 11..].to_vec();
            d.extend_from_slice(&opt);
            d[11] = 2;
            d
        }),
        ("too many additional records", with(&|d| d[11] = 200)),
        ("too long", {
            let mut d = good.clone();
            d.resize(QUERY_BYTES_MAX + 1, 0);
            d
        }),
    ];
    for (what, datagram) in cases {
        assert!(parse_query(&datagram).is_err(), "{what} parsed");
        let reply = respond(&datagram, &directory()).expect("a header: an answer");
        assert_eq!(&reply[..2], &[0x12, 0x34], "{what}: the id");
        assert_eq!(reply[3] & 0x0F, Rcode::FormErr as u8, "{what}: FORMERR");
        assert_eq!(reply[2] & 0x80, 0x80, "{what}: QR");
    }
    for len in 0..12 {
        assert!(respond(&good[..len], &directory()).is_none());
    }
}

#[test]
fn a_backward_pointer_is_followed() {
    // Question name written out, then an OPT record whose (empty) owner is fine; here a
    // second name in an additional record points back at the question's second label.
    let mut d = query(9, "web.backend", TYPE_A, None);
    d[11] = 1; // one additional record
    d.extend_from_slice(&[3, b'x', b'y', b'z', 0xC0, 16]); // "xyz" + pointer to "backend"
    d.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
    let q = parse_query(&d).expect("a backward pointer is fine");
    assert_eq!(q.labels, vec![b"web".to_vec(), b"backend".to_vec()]);
}

/// Reads an answer datagram's header counts and rcode.
fn header(reply: &[u8]) -> (u8, bool, u16, u16) {
    let count = |at: usize| u16::from_be_bytes([reply[at], reply[at + 1]]);
    (reply[3] & 0x0F, reply[2] & 0x02 != 0, count(6), count(10))
}

#[test]
fn answers_fit_the_clients_size_and_say_when_cut() {
    let mut d = Directory::default();
    for i in 0..100u8 {
        d.insert(
            "big",
            "net",
            task(&format!("task{i:03}"), v4(i), &[("http", 80)]),
        );
    }
    let reply = respond(&query(1, "big.net", TYPE_A, None), &d).unwrap();
    let (rcode, truncated, answers, _) = header(&reply);
    assert!(reply.len() <= UDP_ANSWER_BYTES_DEFAULT);
    assert_eq!((rcode, truncated), (0, true));
    assert!(answers > 10 && answers < 100, "{answers}");
    let reply = respond(&query(1, "big.net", TYPE_A, Some(4096)), &d).unwrap();
    let (_, truncated, answers, additional) = header(&reply);
    assert!(reply.len() <= UDP_ANSWER_BYTES_MAX);
    assert!(truncated);
    assert_eq!(additional, 1, "the OPT record");
    assert!(answers > 40, "{answers}");
    let reply = respond(&query(1, "web.backend", TYPE_A, Some(1232)), &directory()).unwrap();
    assert_eq!(header(&reply), (0, false, 2, 1));
}

#[test]
fn random_datagrams_never_panic() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let base = query(5, "_http._tcp.web.backend", TYPE_SRV, Some(1232));
    let dir = directory();
    for _ in 0..20_000 {
        let mut d = base.clone();
        let flips = next() % 6;
        for _ in 0..flips {
            let at = usize::try_from(next() % d.len() as u64).unwrap();
            d[at] = u8::try_from(next() & 0xFF).unwrap();
        }
        let cut = usize::try_from(next() % (d.len() as u64 + 1)).unwrap();
        if next() % 4 == 0 {
            d.truncate(cut);
        }
        if let Some(reply) = respond(&d, &dir) {
            assert!(reply.len() <= UDP_ANSWER_BYTES_MAX);
        }
    }
}

fn endpoint(task: &str, service: &str, addr: &str, ports: &[(&str, u32)]) -> Bytes {
    encode_endpoint(&Endpoint {
        service_name: service.into(),
        task_id: task.into(),
        slot: 1,
        node_id: "node".into(),
        addr: addr.into(),
        ports: ports
            .iter()
            .map(|(n, p)| PortSpec {
                name: (*n).into(),
                port: *p,
                protocol: "tcp".into(),
            })
            .collect(),
        network_id: "netid".into(),
        network_name: "Backend".into(),
    })
    .unwrap()
}

#[test]
fn the_directory_follows_the_tables_and_skips_bad_entries() {
    let tables = Arc::new(LocalTables::new());
    tables.join_network("netid").unwrap();
    let put = |key: &str, value: Bytes| {
        tables
            .put("netid", crate::netdb::ENDPOINTS_TABLE, key, value)
            .unwrap();
    };
    put("t1", endpoint("t1", "Web", "10.0.0.1", &[("http", 80)]));
    put("bad", Bytes::from_static(b"\xff\xff"));
    put("noip", endpoint("t2", "web", "node-7.example", &[]));
    let mut live = LiveDirectory::new(Arc::clone(&tables) as Arc<dyn NetworkTables>);
    let first = live.current();
    assert_eq!(
        first.tasks("web", "backend").map(<[TaskRecord]>::len),
        Some(1)
    );
    assert!(
        Arc::ptr_eq(&first, &live.current()),
        "unchanged: not rebuilt"
    );
    tables
        .delete("netid", crate::netdb::ENDPOINTS_TABLE, "t1")
        .unwrap();
    assert!(live.current().tasks("web", "backend").is_none());
}

#[test]
fn the_server_answers_over_udp_and_stops() {
    let tables = Arc::new(LocalTables::new());
    tables.join_network("netid").unwrap();
    tables
        .put(
            "netid",
            crate::netdb::ENDPOINTS_TABLE,
            "t1",
            endpoint("t1", "web", "10.1.2.3", &[("http", 80)]),
        )
        .unwrap();
    let mut server =
        server::DnsServer::start("127.0.0.1:0".parse().unwrap(), tables).expect("bind");
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buffer = [0u8; 2048];
    client
        .send_to(&query(77, "web.backend", TYPE_A, None), server.local_addr())
        .unwrap();
    let len = client.recv(&mut buffer).unwrap();
    let reply = &buffer[..len];
    assert_eq!(&reply[..2], &77u16.to_be_bytes());
    assert_eq!(header(reply), (0, false, 1, 0));
    assert_eq!(&reply[len - 4..], &[10, 1, 2, 3]);
    client.send_to(&[1, 2, 3], server.local_addr()).unwrap();
    client
        .send_to(
            &query(78, "nope.backend", TYPE_A, None),
            server.local_addr(),
        )
        .unwrap();
    let len = client.recv(&mut buffer).unwrap();
    assert_eq!(
        &buffer[..2],
        &78u16.to_be_bytes(),
        "the short datagram got nothing"
    );
    assert_eq!(buffer[3] & 0x0F, Rcode::NxDomain as u8);
    let _ = len;
    server.stop();
    assert!(
        server
            .stats()
            .answered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}
