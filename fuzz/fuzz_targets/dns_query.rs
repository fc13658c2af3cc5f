//! Feeds arbitrary datagrams to the DNS responder, as its UDP socket would.
//!
//! Properties checked on every input: parsing and answering never panic; a datagram too
//! short for a header gets no answer, any other gets one, with the query's id, the QR bit,
//! and at most the UDP answer limit; a query that parses is answered with its own
//! question, and one that does not with FORMERR.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flotilla::dns::message::{UDP_ANSWER_BYTES_MAX, parse_query};
use flotilla::dns::{Directory, TaskRecord, respond};
use libfuzzer_sys::fuzz_target;

fn directory() -> Directory {
    let mut directory = Directory::default();
    for (i, addr) in [
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]
    .into_iter()
    .enumerate()
    {
        directory.insert(
            "web",
            "backend",
            TaskRecord {
                task_id: format!("task{i}"),
                addr,
                ports: vec![("http".into(), 8080), ("admin".into(), 9090)],
            },
        );
    }
    directory
}

fuzz_target!(|data: &[u8]| {
    let directory = directory();
    let reply = respond(data, &directory);
    if data.len() < 12 {
        assert!(reply.is_none());
        return;
    }
    let reply = reply.expect("every datagram with a header is answered");
    assert!(reply.len() >= 12 && reply.len() <= UDP_ANSWER_BYTES_MAX);
    assert_eq!(reply[..2], data[..2], "the answer carries the query's id");
    assert_eq!(reply[2] & 0x80, 0x80, "QR set");
    match parse_query(data) {
        Ok(query) => {
            assert_ne!(reply[3] & 0x0F, 1, "a parsed query is not FORMERR");
            let question = parse_query(&as_query(&reply)).expect("the echoed question parses");
            assert_eq!(question.labels, query.labels);
            assert_eq!(question.qtype, query.qtype);
        }
        Err(_) => assert_eq!(reply[3] & 0x0F, 1, "FORMERR"),
    }
});

/// The answer's header and question alone, turned back into a query (QR cleared, no
/// records), so the question can be parsed again.
fn as_query(reply: &[u8]) -> Vec<u8> {
    let mut end = 12;
    while reply[end] != 0 {
        end += 1 + usize::from(reply[end]);
    }
    end += 1 + 4;
    let mut query = reply[..end].to_vec();
    query[2] &= 0x7F;
    query[3] &= 0xF0;
    query[6..12].fill(0);
    query
}
