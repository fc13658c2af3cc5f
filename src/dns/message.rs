//! DNS wire format (RFC 1035), the small strict part a local responder needs: parse one
//! query, write one answer.
//!
//! Parsing is bounded: the datagram is at most [`QUERY_BYTES_MAX`] bytes, a name at most
//! [`NAME_BYTES_MAX`] bytes in at most 127 labels of at most 63 bytes, a compression pointer
//! must point strictly before the name that uses it (so no loop: each jump goes backwards)
//! and at most [`POINTERS_MAX`] are followed per name, at most [`ADDITIONAL_RECORDS_MAX`]
//! additional records are read (a client's EDNS OPT record), and nothing is read past the
//! end. Anything else is [`ParseError`], which the responder answers with FORMERR.
//!
//! Must never panic on any input, allocate more than the input's size per name, or follow a
//! pointer forward.

use std::net::IpAddr;

/// The largest query read (bytes beyond it are not received).
pub const QUERY_BYTES_MAX: usize = 4096;
/// The longest name on the wire (RFC 1035 §2.3.4).
pub const NAME_BYTES_MAX: usize = 255;
/// The longest label.
pub const LABEL_BYTES_MAX: usize = 63;
/// Compression pointers followed in one name at most.
pub const POINTERS_MAX: usize = 16;
/// Additional records read in a query at most (a client sends one: its EDNS OPT record).
pub const ADDITIONAL_RECORDS_MAX: u16 = 4;
/// The size of a UDP answer to a client that did not say it takes more (RFC 1035).
pub const UDP_ANSWER_BYTES_DEFAULT: usize = 512;
/// The largest UDP answer sent, whatever a client's EDNS record says (DNS flag day 2020).
pub const UDP_ANSWER_BYTES_MAX: usize = 1232;
/// An OPT record without options: root name, type, class, TTL, RDLENGTH.
const OPT_RECORD_BYTES: usize = 11;
/// The header's size.
const HEADER_BYTES: usize = 12;

/// Record types this responder knows.
pub const TYPE_A: u16 = 1;
/// IPv6 address.
pub const TYPE_AAAA: u16 = 28;
/// Service location (RFC 2782).
pub const TYPE_SRV: u16 = 33;
/// EDNS (RFC 6891).
pub const TYPE_OPT: u16 = 41;
/// Any type.
pub const TYPE_ANY: u16 = 255;
/// The Internet class.
pub const CLASS_IN: u16 = 1;
/// Any class.
pub const CLASS_ANY: u16 = 255;

/// Response codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rcode {
    /// No error (possibly no data).
    NoError = 0,
    /// The query could not be parsed.
    FormErr = 1,
    /// The name does not exist.
    NxDomain = 3,
    /// Not implemented (an opcode other than QUERY).
    NotImp = 4,
    /// Refused (a class other than IN).
    Refused = 5,
}

/// Why a query could not be parsed (answered with FORMERR).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than a header: nothing can be answered (no id).
    #[error("{0} bytes: shorter than a DNS header")]
    NoHeader(usize),
    /// Longer than [`QUERY_BYTES_MAX`].
    #[error("{0} bytes: longer than {QUERY_BYTES_MAX}")]
    TooLong(usize),
    /// The header says this is an answer.
    #[error("not a query (QR set)")]
    NotAQuery,
    /// Not exactly one question, or answer/authority records in a query.
    #[error("{0}")]
    BadCounts(&'static str),
    /// A name, record or field runs past the end or breaks a limit.
    #[error("{0}")]
    Malformed(&'static str),
}

/// A parsed query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The client's id.
    pub id: u16,
    /// The opcode (0: QUERY).
    pub opcode: u8,
    /// Recursion desired (copied into the answer).
    pub recursion_desired: bool,
    /// The question's name, labels in order, as received (not lowercased).
    pub labels: Vec<Vec<u8>>,
    /// The question's type.
    pub qtype: u16,
    /// The question's class.
    pub qclass: u16,
    /// The UDP payload size the client's EDNS record offers, if it sent one.
    pub edns_udp_bytes: Option<u16>,
}

/// The id of a datagram long enough to carry a header (to answer FORMERR to it).
pub fn header_id(datagram: &[u8]) -> Option<u16> {
    (datagram.len() >= HEADER_BYTES).then(|| u16::from_be_bytes([datagram[0], datagram[1]]))
}

/// A bounded reader over the datagram.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, ParseError> {
        let byte = *self
            .bytes
            .get(self.at)
            .ok_or(ParseError::Malformed("truncated"))?;
        self.at += 1;
        Ok(byte)
    }

    fn u16(&mut self) -> Result<u16, ParseError> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn skip(&mut self, len: usize) -> Result<(), ParseError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(ParseError::Malformed("record data runs past the end"))?;
        self.at = end;
        Ok(())
    }

    /// Reads a name at the cursor (following compression pointers backwards only), leaving
    /// the cursor after the name's bytes at this position.
    fn name(&mut self) -> Result<Vec<Vec<u8>>, ParseError> {
        let mut labels = Vec::new();
        let mut wire_bytes = 0usize;
        let mut pos = self.at;
        // The position a pointer must stay below: the start of the bytes already read.
        let mut limit = self.at;
        let mut jumped = false;
        let mut pointers = 0usize;
        loop {
            let len = *self
                .bytes
                .get(pos)
                .ok_or(ParseError::Malformed("name runs past the end"))?;
            match len & 0xC0 {
                0x00 => {
                    let len = usize::from(len);
                    wire_bytes += 1 + len;
                    if wire_bytes > NAME_BYTES_MAX {
                        return Err(ParseError::Malformed("name longer than 255 bytes"));
                    }
                    if len == 0 {
                        if !jumped {
                            self.at = pos + 1;
                        }
                        return Ok(labels);
                    }
                    let label = self
                        .bytes
                        .get(pos + 1..pos + 1 + len)
                        .ok_or(ParseError::Malformed("label runs past the end"))?;
                    labels.push(label.to_vec());
                    pos += 1 + len;
                }
                0xC0 => {
                    let low = *self
                        .bytes
                        .get(pos + 1)
                        .ok_or(ParseError::Malformed("pointer runs past the end"))?;
                    let target = (usize::from(len & 0x3F) << 8) | usize::from(low);
                    pointers += 1;
                    if pointers > POINTERS_MAX {
                        return Err(ParseError::Malformed("too many compression pointers"));
                    }
                    // Strictly backwards from where this name (or the last jump) began:
                    // a loop would need a pointer that does not.
                    if target >= limit || target < HEADER_BYTES {
                        return Err(ParseError::Malformed(
                            "compression pointer does not point backwards",
                        ));
                    }
                    if !jumped {
                        self.at = pos + 2;
                        jumped = true;
                    }
                    limit = target;
                    pos = target;
                }
                _ => return Err(ParseError::Malformed("unknown label type")),
            }
        }
    }
}

/// Parses one query datagram.
///
/// # Errors
/// [`ParseError`]; every error but [`ParseError::NoHeader`] is answered with FORMERR.
pub fn parse_query(datagram: &[u8]) -> Result<Query, ParseError> {
    if datagram.len() < HEADER_BYTES {
        return Err(ParseError::NoHeader(datagram.len()));
    }
    if datagram.len() > QUERY_BYTES_MAX {
        return Err(ParseError::TooLong(datagram.len()));
    }
    let mut reader = Reader {
        bytes: datagram,
        at: 0,
    };
    let id = reader.u16()?;
    let flags = reader.u16()?;
    let (qdcount, ancount, nscount, arcount) =
        (reader.u16()?, reader.u16()?, reader.u16()?, reader.u16()?);
    if flags & 0x8000 != 0 {
        return Err(ParseError::NotAQuery);
    }
    let opcode = u8::try_from((flags >> 11) & 0x0F).expect("four bits fit a byte");
    if qdcount != 1 {
        return Err(ParseError::BadCounts("a query holds exactly one question"));
    }
    if ancount != 0 || nscount != 0 {
        return Err(ParseError::BadCounts(
            "a query holds no answer or authority records",
        ));
    }
    if arcount > ADDITIONAL_RECORDS_MAX {
        return Err(ParseError::BadCounts("too many additional records"));
    }
    let labels = reader.name()?;
    let qtype = reader.u16()?;
    let qclass = reader.u16()?;
    let mut edns_udp_bytes = None;
    for _ in 0..arcount {
        let name = reader.name()?;
        let rtype = reader.u16()?;
        let class = reader.u16()?;
        reader.skip(4)?; // TTL (for OPT: extended rcode, version, flags)
        let rdlength = usize::from(reader.u16()?);
        reader.skip(rdlength)?;
        if rtype == TYPE_OPT {
            if !name.is_empty() || edns_udp_bytes.is_some() {
                return Err(ParseError::Malformed(
                    "an OPT record must be unique and owned by the root",
                ));
            }
            edns_udp_bytes = Some(class);
        }
    }
    if reader.at != datagram.len() {
        return Err(ParseError::Malformed("bytes after the last record"));
    }
    Ok(Query {
        id,
        opcode,
        recursion_desired: flags & 0x0100 != 0,
        labels,
        qtype,
        qclass,
        edns_udp_bytes,
    })
}

/// One answer record's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordData {
    /// An address (A or AAAA by its family).
    Address(IpAddr),
    /// A service location: port and target name (labels).
    Srv {
        /// The port.
        port: u16,
        /// The target's labels.
        target: Vec<Vec<u8>>,
    },
}

/// One resource record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The owner name's labels.
    pub name: Vec<Vec<u8>>,
    /// Time to live, seconds.
    pub ttl_s: u32,
    /// The data.
    pub data: RecordData,
}

/// What to answer a query with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// The response code.
    pub rcode: Option<Rcode>,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Additional section (addresses of SRV targets).
    pub additional: Vec<Record>,
}

fn write_name(out: &mut Vec<u8>, labels: &[Vec<u8>]) {
    for label in labels {
        // Labels come from a parsed query or from names checked by the spec rules (≤ 63).
        let len = u8::try_from(label.len().min(LABEL_BYTES_MAX)).expect("at most 63");
        out.push(len);
        out.extend_from_slice(&label[..usize::from(len)]);
    }
    out.push(0);
}

fn write_record(out: &mut Vec<u8>, record: &Record) {
    write_name(out, &record.name);
    let (rtype, rdata) = match &record.data {
        RecordData::Address(IpAddr::V4(v4)) => (TYPE_A, v4.octets().to_vec()),
        RecordData::Address(IpAddr::V6(v6)) => (TYPE_AAAA, v6.octets().to_vec()),
        RecordData::Srv { port, target } => {
            let mut rdata = Vec::with_capacity(8 + target.len() * 16);
            rdata.extend_from_slice(&0u16.to_be_bytes()); // priority
            rdata.extend_from_slice(&1u16.to_be_bytes()); // weight: all equal
            rdata.extend_from_slice(&port.to_be_bytes());
            // RFC 2782: the target is never compressed.
            write_name(&mut rdata, target);
            (TYPE_SRV, rdata)
        }
    };
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&record.ttl_s.to_be_bytes());
    let rdlength = u16::try_from(rdata.len()).expect("an SRV target name is at most 255 bytes");
    out.extend_from_slice(&rdlength.to_be_bytes());
    out.extend_from_slice(&rdata);
}

/// The answer datagram to `query`: authoritative, the question echoed, then as many
/// answer and additional records as fit in `bytes_max` (TC set if an answer record did not
/// fit; additional records are left out silently, as they may be).
pub fn write_answer(query: &Query, answer: &Answer, bytes_max: usize) -> Vec<u8> {
    let rcode = answer.rcode.unwrap_or(Rcode::NoError);
    let mut out = Vec::with_capacity(bytes_max.min(UDP_ANSWER_BYTES_MAX));
    out.extend_from_slice(&query.id.to_be_bytes());
    out.extend_from_slice(&[0, 0]); // flags, set below
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0; 6]); // counts, set below
    write_name(&mut out, &query.labels);
    out.extend_from_slice(&query.qtype.to_be_bytes());
    out.extend_from_slice(&query.qclass.to_be_bytes());
    // The OPT record echoed to a client that sent one (RFC 6891), kept room for.
    let opt_bytes = if query.edns_udp_bytes.is_some() {
        OPT_RECORD_BYTES
    } else {
        0
    };
    let bytes_max = bytes_max.saturating_sub(opt_bytes);
    let mut truncated = false;
    let mut answered = 0u16;
    for record in &answer.answers {
        let mark = out.len();
        write_record(&mut out, record);
        if out.len() > bytes_max {
            out.truncate(mark);
            truncated = true;
            break;
        }
        answered += 1;
    }
    let mut added = 0u16;
    if !truncated {
        for record in &answer.additional {
            let mark = out.len();
            write_record(&mut out, record);
            if out.len() > bytes_max {
                out.truncate(mark);
                break;
            }
            added += 1;
        }
    }
    if query.edns_udp_bytes.is_some() {
        out.push(0); // root
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        let udp_bytes = u16::try_from(UDP_ANSWER_BYTES_MAX).expect("1232 fits");
        out.extend_from_slice(&udp_bytes.to_be_bytes());
        out.extend_from_slice(&[0; 6]); // extended rcode, version, flags, no options
        added += 1;
    }
    let flags = header_flags(query, rcode, truncated);
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&answered.to_be_bytes());
    out[10..12].copy_from_slice(&added.to_be_bytes());
    out
}

fn header_flags(query: &Query, rcode: Rcode, truncated: bool) -> u16 {
    let mut flags: u16 = 0x8000 | 0x0400; // QR, AA
    flags |= (u16::from(query.opcode) & 0x0F) << 11;
    if truncated {
        flags |= 0x0200;
    }
    if query.recursion_desired {
        flags |= 0x0100;
    }
    flags | rcode as u16
}

/// The FORMERR answer to a datagram that had a header (`id`) but did not parse: the header
/// alone, no question.
pub fn write_format_error(id: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES);
    out.extend_from_slice(&id.to_be_bytes());
    let flags: u16 = 0x8000 | Rcode::FormErr as u16;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}
